"""Batch recommendation: the top-K of every user of a file, as /recommend would answer them.

The nightly "precompute top-K for all users" job. Requests are built by the service's own
`ServingRecommend.build` (prompt from the known history, the bundle's default mode, exclusions,
new-item bonus) and decoded by its `TorchEngine` over the bundle's trie, so an answer here is
/recommend's answer for the same bundle and history. One per-batch function,
`BatchRecommender.recommend_table`, serves both runners: `run_local` (this process) and
`service.batch_ray.run_ray` (a Ray Data actor pool, one engine per actor).

Output: a directory of Parquet parts (user_id, rank, item_id, score), one per chunk of
`chunk_size` users in input order, written atomically. A rerun of the same job skips the parts
that exist, so an interrupted job resumes where it stopped; `_job.json` records what the parts
were made from and refuses to mix in parts of another job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from models.bundle import Bundle
from service.engines.torch_engine import TorchEngine
from service.schemas import MAX_K, RecommendRequest
from service.serving import RecommendDefaults, ServingRecommend
from service.store import CatalogueStore, LiveCatalogue

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
OUTPUT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("rank", pa.int32()),
        ("item_id", pa.string()),
        ("score", pa.float64()),
    ]
)
USERS_SCHEMA = pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.string()))])
RESULT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())),
    ]
)
"""What `recommend_table` returns: one row per user (a user may get fewer than k items when
exclusions leave fewer)."""


class BatchError(ValueError):
    """Bad input or a previous job's output in the way; the message says what to do."""


@dataclass(frozen=True)
class BatchConfig:
    """How a batch job decodes; the engine settings match the service's (service.settings)."""

    bundle: Path
    """Bundle directory (manifest.json, catalogue.parquet, lm/)."""
    k: int = 10
    """Items per user (1..100, as /recommend)."""
    batch_size: int = 64
    """Users decoded together in one engine call (the service's max_batch_size default)."""
    chunk_size: int = 4096
    """Users per output part: the unit of resumption."""
    beam_width: int = 20
    """Beam width of the trie-constrained search (the service's default)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """Weight dtype of the engine: float32, bfloat16 or float16."""
    threads: int = 0
    """torch CPU threads per worker (0: torch's default)."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise BatchError(f"k must be in 1..{MAX_K} (as for /recommend), got {self.k}")
        for name in ("batch_size", "chunk_size", "beam_width"):
            if getattr(self, name) < 1:
                raise BatchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise BatchError(f"threads must be >= 0, got {self.threads}")


class BatchRecommender:
    """The bundle, its live catalogue and trie, the service's request builder and one engine."""

    def __init__(self, cfg: BatchConfig) -> None:
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        bundle = Bundle.load(cfg.bundle)
        if not bundle.has_lm():
            raise BatchError(f"{bundle.root}: the bundle has no recommender (lm/config.json)")
        self.cfg = cfg
        self.live = LiveCatalogue.from_bundle(bundle.catalogue, bundle.vocab.codebook_size)
        # build() needs only the store, the vocabulary and the defaults; decoding happens here,
        # batch by batch, instead of through the service's micro-batcher.
        self.serving = ServingRecommend(
            CatalogueStore(self.live),
            bundle.vocab,
            batcher=cast(Any, None),
            model_version="",
            timeout_s=0.0,
            defaults=RecommendDefaults.from_manifest(bundle.manifest.recommend),
        )
        self.engine = TorchEngine(
            bundle.lm_dir,
            bundle.vocab,
            device=cfg.device,
            dtype=cfg.dtype,
            beam_width=cfg.beam_width,
            max_batch=cfg.batch_size,
        )
        self.ignored_history = 0

    def recommend_table(self, users: pa.Table) -> pa.Table:
        """Top-k per user of `users` (columns user_id, history): RESULT_SCHEMA rows in input
        order. Histories longer than /recommend's 1000-id body limit are taken whole: that limit
        guards the HTTP body, and the answer depends only on the known history."""
        requests = []
        for history in users.column("history").to_pylist():
            # model_construct: the ids come from a file, not from a client; k was checked once.
            req = RecommendRequest.model_construct(history=history or [], k=self.cfg.k)
            decode, ignored = self.serving.build(req)
            self.ignored_history += len(ignored)
            requests.append(decode)
        results = self.engine.recommend(requests, self.live.trie) if requests else []
        item = self.live.item
        return pa.table(
            {
                "user_id": users.column("user_id"),
                "items": [[item(r.item_index).item_id for r in recs] for recs in results],
                "scores": [[r.score for r in recs] for recs in results],
            },
            schema=RESULT_SCHEMA,
        )

    def close(self) -> None:
        self.engine.close()


def explode(results: pa.Table) -> pa.Table:
    """RESULT_SCHEMA rows -> OUTPUT_SCHEMA rows (user_id, rank from 1, item_id, score)."""
    items = results.column("items").combine_chunks()
    scores = results.column("scores").combine_chunks()
    lengths = pc.list_value_length(items).fill_null(0).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pa.table(
        {
            "user_id": results.column("user_id").take(owner),
            "rank": pa.array(np.arange(len(owner)) - first + 1, pa.int32()),
            "item_id": items.flatten(),
            "score": scores.flatten(),
        },
        schema=OUTPUT_SCHEMA,
    )


# ---------------------------------------------------------------- users in


def read_users_parquet(path: Path) -> pa.Table:
    """A Parquet file (or directory) with columns user_id and history (list of item ids, oldest
    first); ids of any type are read as strings."""
    try:
        table = pq.read_table(path, columns=["user_id", "history"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise BatchError(
            f"{path}: cannot read user_id and history (list of item ids) from it: {e}"
        ) from e
    if not pa.types.is_list(table.schema.field("history").type) and not pa.types.is_large_list(
        table.schema.field("history").type
    ):
        raise BatchError(
            f"{path}: column history is {table.schema.field('history').type}, "
            "need a list of item ids"
        )
    return users_table(table.column("user_id").to_pylist(), table.column("history").to_pylist())


def users_table(user_ids: Sequence[Any], histories: Sequence[list[Any] | None]) -> pa.Table:
    """USERS_SCHEMA table; ids as strings (as /recommend receives them)."""
    if len(set(user_ids)) != len(user_ids):
        raise BatchError("user_id values must be unique (each user gets one list)")
    return pa.table(
        {
            "user_id": [str(u) for u in user_ids],
            "history": [[str(i) for i in h or []] for h in histories],
        },
        schema=USERS_SCHEMA,
    )


# ---------------------------------------------------------------- parts and resumption


def part_path(out: Path, chunk: int) -> Path:
    return out / f"part-{chunk:05d}.parquet"


def chunks(n_users: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(chunk, start, stop) row ranges of the input."""
    return [
        (c, s, min(s + chunk_size, n_users)) for c, s in enumerate(range(0, n_users, chunk_size))
    ]


def batches(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Engine batches of one chunk: the same split in every runner, so batch composition (and
    with it every float of the search) is the same whichever runner decodes it."""
    for s in range(start, stop, batch_size):
        yield s, min(s + batch_size, stop)


def write_part(out: Path, chunk: int, table: pa.Table) -> None:
    """Atomically: a crash mid-write leaves no part that a resume would take as done."""
    path = part_path(out, chunk)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def users_fingerprint(users: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, users.schema) as writer:
        writer.write_table(users.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def job_record(cfg: BatchConfig, users: pa.Table) -> dict[str, Any]:
    """What the parts depend on; a resume must match it."""
    manifest = json.loads((cfg.bundle / "manifest.json").read_text())
    decode = {k: v for k, v in asdict(cfg).items() if k not in ("bundle", "threads", "device")}
    return {
        "bundle": str(cfg.bundle),
        "bundle_created_at": manifest.get("created_at"),
        "bundle_commit": manifest.get("git_commit"),
        "users": users.num_rows,
        "users_fingerprint": users_fingerprint(users),
        **decode,
    }


def pending_chunks(out: Path, cfg: BatchConfig, users: pa.Table) -> list[tuple[int, int, int]]:
    """Prepare `out` and return the chunks without a part; refuse another job's output."""
    out.mkdir(parents=True, exist_ok=True)
    record = job_record(cfg, users)
    job = out / JOB_FILE
    if job.exists():
        old = json.loads(job.read_text())
        old.pop("complete", None)
        diff = sorted(k for k in record.keys() | old.keys() if record.get(k) != old.get(k))
        if diff:
            raise BatchError(
                f"{out} holds parts of another job ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} } there, { {k: record.get(k) for k in diff} } "
                "now); write to a new --out or delete that directory"
            )
    elif any(out.glob("part-*.parquet")):
        raise BatchError(f"{out} holds part files but no {JOB_FILE}; use an empty directory")
    else:
        job.write_text(json.dumps(record, indent=2) + "\n")
    todo = [c for c in chunks(users.num_rows, cfg.chunk_size) if not part_path(out, c[0]).exists()]
    log.info("%s: %d of %d chunks to do", out, len(todo), -(-users.num_rows // cfg.chunk_size))
    return todo


def mark_complete(out: Path) -> None:
    job = out / JOB_FILE
    record = json.loads(job.read_text())
    record["complete"] = True
    job.write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------- the local runner


def run_local(
    users: pa.Table,
    out: Path,
    cfg: BatchConfig,
    progress: bool = True,
    recommender: Callable[[BatchConfig], BatchRecommender] = BatchRecommender,
) -> dict[str, Any]:
    """Decode every pending chunk in this process; returns {users, done_users, chunks}."""
    todo = pending_chunks(out, cfg, users)
    done = 0
    if todo:
        rec = recommender(cfg)
        bar = tqdm(
            total=sum(stop - start for _, start, stop in todo),
            unit="user",
            desc="batch-recommend",
            disable=not progress,
        )
        try:
            for chunk, start, stop in todo:
                parts = []
                for s, e in batches(start, stop, cfg.batch_size):
                    parts.append(rec.recommend_table(users.slice(s, e - s)))
                    bar.update(e - s)
                write_part(out, chunk, explode(pa.concat_tables(parts)))
                done += stop - start
        finally:
            bar.close()
            rec.close()
    mark_complete(out)
    return {"users": users.num_rows, "done_users": done, "chunks": len(todo)}


def read_output(out: Path) -> pa.Table:
    """All parts of `out`, in input order (part by part)."""
    parts = sorted(out.glob("part-*.parquet"))
    if not parts:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=OUTPUT_SCHEMA) for p in parts])
