"""Datasets: loaders for the two formats of this field, and the leave-one-out split.

- LC-Rec / LETTER JSON: a directory with `X.inter.json` ({user: [item, ...]} in chronological
  order) and `X.item.json` ({item: {"title", "description", ...}}).
- RecBole atomic files: `X.inter` (tab-separated, typed header `user_id:token item_id:token
  timestamp:float ...`) and `X.item` (`item_id:token` plus text fields).
- `ml-100k`: the RecBole atomic copy of MovieLens-100k shipped inside the `recbole` wheel.

Ordering rule: RecBole interactions are sorted per user by timestamp; ties keep the order of the
rows in the file (a stable sort), so the same file always gives the same sequences.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EMBEDDED = {"ml-100k"}


class DataError(ValueError):
    """A dataset file is malformed or inconsistent; the message names the file and record."""


@dataclass
class Dataset:
    name: str
    item_ids: list[str]
    """Row -> external item id (string)."""
    items: list[dict[str, Any]]
    """Row -> item fields; always has `title` (possibly empty) and `description`."""
    user_ids: list[str]
    sequences: list[list[int]]
    """User -> item rows, oldest first."""
    source: str = ""
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for iid, it in zip(self.item_ids, self.items, strict=True):
            h.update(f"{iid}\x1f{it.get('title', '')}\x1f{it.get('description', '')}\x1e".encode())
        for uid, seq in zip(self.user_ids, self.sequences, strict=True):
            h.update(f"{uid}:{','.join(map(str, seq))};".encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "users": len(self.user_ids),
            "items": self.n_items,
            "interactions": self.n_interactions,
            "fingerprint": self.fingerprint(),
            **self.stats,
        }


# ---------------------------------------------------------------- LC-Rec JSON


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def load_lcrec(inter_path: Path, item_path: Path, name: str) -> Dataset:
    raw_items = _read_json(item_path)
    if not isinstance(raw_items, dict):
        raise DataError(
            f"{item_path}: expected an object {{item_id: {{title, ...}}}}, got {type(raw_items).__name__}"
        )
    item_ids: list[str] = []
    items: list[dict[str, Any]] = []
    for iid, fields in raw_items.items():
        if not isinstance(fields, dict):
            raise DataError(
                f"{item_path}: item '{iid}': expected an object of fields, got {type(fields).__name__}"
            )
        item_ids.append(str(iid))
        items.append({k: v for k, v in fields.items() if v is not None})
    row = {iid: i for i, iid in enumerate(item_ids)}

    raw_inter = _read_json(inter_path)
    if not isinstance(raw_inter, dict):
        raise DataError(
            f"{inter_path}: expected an object {{user_id: [item_id, ...]}}, got {type(raw_inter).__name__}"
        )
    user_ids, sequences = [], []
    for uid, seq in raw_inter.items():
        if not isinstance(seq, list):
            raise DataError(
                f"{inter_path}: user '{uid}': expected a list of item ids, got {type(seq).__name__}"
            )
        rows = []
        for pos, iid in enumerate(seq):
            if isinstance(iid, bool) or not isinstance(iid, int | str):
                raise DataError(
                    f"{inter_path}: user '{uid}', position {pos}: item id {iid!r} is not an int or string"
                )
            r = row.get(str(iid))
            if r is None:
                raise DataError(
                    f"{inter_path}: user '{uid}', position {pos}: item '{iid}' is not in {item_path.name}"
                )
            rows.append(r)
        user_ids.append(str(uid))
        sequences.append(rows)
    return _finish(
        Dataset(name, item_ids, items, user_ids, sequences, source=str(inter_path.parent))
    )


# ---------------------------------------------------------------- RecBole atomic


def _read_atomic(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header field names (without `:type`) and rows; errors name the line."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration as e:
            raise DataError(
                f"{path}: empty file (a typed header like 'user_id:token' is expected)"
            ) from e
        names = [h.split(":", 1)[0] for h in header]
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            if not rec or rec == [""]:
                continue
            if len(rec) != len(names):
                raise DataError(
                    f"{path}: line {lineno}: {len(rec)} fields, header has {len(names)}"
                )
            rows.append(rec)
    return names, rows


def _require(path: Path, names: list[str], wanted: list[str]) -> list[int]:
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DataError(f"{path}: header lacks field(s) {missing}; it has {names}")
    return [names.index(w) for w in wanted]


def _item_fields(names: list[str], rec: list[str]) -> dict[str, Any]:
    fields = {n: v for n, v in zip(names, rec, strict=True) if n != "item_id" and v != ""}
    title_key = next((n for n in names if "title" in n or n == "name"), None)
    title = fields.pop(title_key, "") if title_key else ""
    desc = fields.pop("description", "")
    if not desc:
        desc = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in fields.items())
    return {"title": title, "description": desc, **fields}


def load_atomic(inter_path: Path, item_path: Path | None, name: str) -> Dataset:
    names, rows = _read_atomic(inter_path)
    u_col, i_col = _require(inter_path, names, ["user_id", "item_id"])
    t_col = names.index("timestamp") if "timestamp" in names else None

    item_ids: list[str] = []
    items: list[dict[str, Any]] = []
    row_of: dict[str, int] = {}
    if item_path is not None and item_path.exists():
        inames, irows = _read_atomic(item_path)
        (iid_col,) = _require(item_path, inames, ["item_id"])
        for lineno, rec in enumerate(irows, start=2):
            iid = rec[iid_col]
            if iid in row_of:
                raise DataError(f"{item_path}: line {lineno}: duplicate item_id '{iid}'")
            row_of[iid] = len(item_ids)
            item_ids.append(iid)
            items.append(_item_fields(inames, rec))

    per_user: dict[str, list[tuple[float, int, int]]] = {}
    for lineno, rec in enumerate(rows, start=2):
        iid = rec[i_col]
        if iid not in row_of:
            if item_path is not None and item_path.exists():
                raise DataError(
                    f"{inter_path}: line {lineno}: item '{iid}' is not in {item_path.name}"
                )
            row_of[iid] = len(item_ids)
            item_ids.append(iid)
            items.append({"title": "", "description": ""})
        ts = 0.0
        if t_col is not None:
            try:
                ts = float(rec[t_col])
            except ValueError as e:
                raise DataError(
                    f"{inter_path}: line {lineno}: timestamp {rec[t_col]!r} is not a number"
                ) from e
        per_user.setdefault(rec[u_col], []).append((ts, lineno, row_of[iid]))
    user_ids = list(per_user)
    sequences = [[r for _, _, r in sorted(per_user[u])] for u in user_ids]
    return _finish(
        Dataset(name, item_ids, items, user_ids, sequences, source=str(inter_path.parent))
    )


def _finish(ds: Dataset) -> Dataset:
    no_text = 0
    for it in ds.items:
        it.setdefault("title", "")
        it.setdefault("description", "")
        if not str(it["title"]).strip():
            no_text += 1
    ds.stats["items_without_title"] = no_text
    return ds


# ---------------------------------------------------------------- discovery


def embedded_path(name: str) -> Path:
    if name != "ml-100k":
        raise DataError(f"unknown embedded dataset '{name}'; embedded: {sorted(EMBEDDED)}")
    try:
        import recbole
    except ImportError as e:
        raise DataError("the embedded ml-100k needs `pip install --no-deps recbole`") from e
    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


def load_dataset(spec: str | Path) -> Dataset:
    """A directory in either format (auto-detected), or an embedded dataset name."""
    path = Path(spec)
    if str(spec) in EMBEDDED and not path.exists():
        path = embedded_path(str(spec))
    if not path.is_dir():
        raise DataError(f"{spec}: not a directory and not an embedded dataset ({sorted(EMBEDDED)})")
    json_inter = sorted(path.glob("*.inter.json"))
    if json_inter:
        stem = json_inter[0].name[: -len(".inter.json")]
        item = path / f"{stem}.item.json"
        if not item.exists():
            raise DataError(f"{path}: found {json_inter[0].name} but no {item.name}")
        return load_lcrec(json_inter[0], item, stem)
    atomic = sorted(path.glob("*.inter"))
    if atomic:
        stem = atomic[0].stem
        return load_atomic(atomic[0], path / f"{stem}.item", stem)
    raise DataError(f"{path}: no X.inter.json (LC-Rec JSON) or X.inter (RecBole atomic) file found")


# ---------------------------------------------------------------- filtering and split


def k_core(ds: Dataset, k: int) -> Dataset:
    """Iteratively drop users and items with fewer than k interactions (items stay in the
    catalogue; only their interactions go)."""
    if k <= 1:
        return ds
    seqs = [list(s) for s in ds.sequences]
    users = list(ds.user_ids)
    while True:
        counts: dict[int, int] = {}
        for s in seqs:
            for r in s:
                counts[r] = counts.get(r, 0) + 1
        new = [[r for r in s if counts[r] >= k] for s in seqs]
        keep = [i for i, s in enumerate(new) if len(s) >= k]
        new_seqs = [new[i] for i in keep]
        users = [users[i] for i in keep]
        if new_seqs == seqs:
            break
        seqs = new_seqs
    out = Dataset(ds.name, ds.item_ids, ds.items, users, seqs, ds.source, dict(ds.stats))
    out.stats["k_core"] = k
    return out


@dataclass
class Split:
    """Leave-one-out: last item test, second-to-last validation, the rest training."""

    train: list[list[int]]
    """Per user: the training prefix (all but the last two items)."""
    valid: list[tuple[list[int], int]]
    """(history, target) with history = the training prefix."""
    test: list[tuple[list[int], int]]
    """(history, target) with history = all but the last item."""
    users: list[int]
    """Dataset user index of each entry."""


def leave_one_out(ds: Dataset, max_history: int = 20, min_len: int = 3) -> Split:
    """Users with fewer than `min_len` items are skipped (they have nothing to validate on)."""
    train, valid, test, users = [], [], [], []
    for u, seq in enumerate(ds.sequences):
        if len(seq) < min_len:
            continue
        train.append(seq[:-2])
        valid.append((seq[:-2][-max_history:], seq[-2]))
        test.append((seq[:-1][-max_history:], seq[-1]))
        users.append(u)
    return Split(train, valid, test, users)
