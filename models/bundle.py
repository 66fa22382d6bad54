"""The bundle directory (DESIGN.md, "Public contracts"): the one artifact training writes and
the service loads.

    manifest.json        format_version, created_at, git_commit, config, data, vocab
    catalogue.parquet    item_id (string), codes (list<int>, length L), title (string)
    tokenizer/           the LETTER item tokenizer (models.item_tokenizer)
    lm/                  the recommender, plain Hugging Face format
    report/              JSON and PNG reports
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.vocab import CodeVocab

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOGUE = "catalogue.parquet"


class BundleError(ValueError):
    """A bundle directory is missing a part or holds an inconsistent one."""


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code that wrote an artifact ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Catalogue:
    """Items with their unique identifiers; row i of `codes` is item `item_ids[i]`."""

    item_ids: list[str]
    codes: np.ndarray  # [n_items, L] int64
    titles: list[str]

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        n = len(self.item_ids)
        if self.codes.ndim != 2 or self.codes.shape[0] != n or len(self.titles) != n:
            raise BundleError(
                f"catalogue columns disagree: {n} item_ids, codes {self.codes.shape}, "
                f"{len(self.titles)} titles"
            )

    def __len__(self) -> int:
        return len(self.item_ids)

    def index(self) -> dict[str, int]:
        """item_id -> row."""
        return {item: i for i, item in enumerate(self.item_ids)}

    def save(self, path: Path) -> None:
        table = pa.table(
            {
                "item_id": pa.array(self.item_ids, type=pa.string()),
                "codes": pa.array(self.codes.tolist(), type=pa.list_(pa.int32())),
                "title": pa.array(self.titles, type=pa.string()),
            }
        )
        pq.write_table(table, path)

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        if not path.exists():
            raise BundleError(f"{path}: catalogue file is missing")
        table = pq.read_table(path)
        missing = {"item_id", "codes", "title"} - set(table.column_names)
        if missing:
            raise BundleError(f"{path}: catalogue lacks column(s) {sorted(missing)}")
        codes = table.column("codes").to_pylist()
        lengths = {len(c) for c in codes}
        if len(lengths) > 1:
            raise BundleError(f"{path}: codes have mixed lengths {sorted(lengths)}")
        return cls(
            item_ids=[str(x) for x in table.column("item_id").to_pylist()],
            codes=np.asarray(codes, dtype=np.int64).reshape(len(codes), -1),
            titles=[t or "" for t in table.column("title").to_pylist()],
        )


@dataclass
class Manifest:
    vocab: CodeVocab
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    git_commit: str = field(default_factory=git_commit)
    format_version: int = FORMAT_VERSION
    recommend: dict[str, Any] = field(default_factory=dict)
    """Recommendation defaults chosen on validation (`training.repeat`): `mode` ('plain',
    'exclude_history' or 'repeat'), `repeat_prior` (models.repeat.RepeatPrior) and the
    validation figures behind the choice; `new_item_bonus` (models.beam.NewItemBonus, fitted
    by the new-item protocol of `letterrec evaluate --cold-items`). Empty in bundles without a fitted recommender:
    the service then excludes history items, as before."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created_at": self.created_at,
            "git_commit": self.git_commit,
            "config": self.config,
            "data": self.data,
            "vocab": self.vocab.to_dict(),
            "recommend": self.recommend,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> Manifest:
        if "vocab" not in d:
            raise BundleError(f"{where}: no 'vocab' entry")
        version = int(d.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: format_version {version}, this code reads {FORMAT_VERSION}; "
                "rebuild the bundle with this version of letterrec"
            )
        return cls(
            vocab=CodeVocab.from_dict(d["vocab"]),
            config=d.get("config", {}),
            data=d.get("data", {}),
            created_at=d.get("created_at", ""),
            git_commit=d.get("git_commit", "unknown"),
            format_version=version,
            recommend=d.get("recommend", {}),
        )


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    catalogue: Catalogue

    @property
    def vocab(self) -> CodeVocab:
        return self.manifest.vocab

    @property
    def lm_dir(self) -> Path:
        return self.root / "lm"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def has_lm(self) -> bool:
        return (self.lm_dir / "config.json").exists()

    @classmethod
    def load(cls, root: str | Path) -> Bundle:
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.exists():
            raise BundleError(f"{root}: not a letterrec bundle ({MANIFEST} is missing)")
        try:
            manifest = Manifest.from_dict(json.loads(mpath.read_text()), where=str(mpath))
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: invalid JSON at line {e.lineno}: {e.msg}") from e
        catalogue = Catalogue.load(root / CATALOGUE)
        if catalogue.codes.shape[1] != manifest.vocab.levels:
            raise BundleError(
                f"{root}: catalogue codes have {catalogue.codes.shape[1]} levels, "
                f"manifest vocab says {manifest.vocab.levels}"
            )
        return cls(root=root, manifest=manifest, catalogue=catalogue)

    def save(self) -> None:
        """Writes the manifest and the catalogue, each by an atomic rename: a reader (a replica
        loading the bundle, another stage) sees the old file or the new one, never a torn one."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.manifest.to_dict(), indent=2) + "\n"
        _atomic(self.root / MANIFEST, lambda tmp: tmp.write_text(text))
        _atomic(self.root / CATALOGUE, self.catalogue.save)


def _atomic(path: Path, write: Any) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def update_recommend(root: str | Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Merge `fields` into the manifest's `recommend` of the bundle at `root`, under an exclusive
    lock on `root/.manifest.lock`: the stages that fit serving defaults (`fit-mode`, the
    new-item protocol) may run at the same time in separate processes, and each reads the
    manifest afresh inside the lock, so neither loses the other's fields. Returns the merged
    `recommend`."""
    root = Path(root)
    with open(root / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            bundle = Bundle.load(root)
            bundle.manifest.recommend = {**bundle.manifest.recommend, **fields}
            bundle.save()
            return bundle.manifest.recommend
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
