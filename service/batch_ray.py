"""The Ray runner of batch recommendation: Ray Data `map_batches` over an actor pool.

Each actor holds one `BatchRecommender` (bundle, trie, engine) and calls the same per-batch
function as the local runner on the same engine batches (`service.batch.batches`), so the two
runners write the same parts. Results stream back to the driver, which writes a chunk's part as
soon as all its users are in: an interrupted job keeps every finished chunk.

Ray is the optional extra `.[scale]`; nothing else imports this module.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from service.batch import (
    BatchConfig,
    BatchError,
    BatchRecommender,
    batches,
    explode,
    mark_complete,
    pending_chunks,
    write_part,
)

log = logging.getLogger(__name__)


class RecommendActor:
    """One engine per Ray actor; called with blocks of users tagged row, chunk and batch."""

    def __init__(self, cfg: BatchConfig) -> None:
        self.rec = BatchRecommender(cfg)

    def __call__(self, users: pa.Table) -> pa.Table:
        # Ray may hand several blocks to one call: decode each engine batch on its own so that
        # no batch depends on how Ray grouped the blocks.
        batch_ids = users.column("batch").to_numpy()
        cuts = np.flatnonzero(np.diff(batch_ids)) + 1
        out = []
        for start, stop in zip([0, *cuts], [*cuts, len(batch_ids)], strict=True):
            part = users.slice(start, stop - start)
            result = self.rec.recommend_table(part.select(["user_id", "history"]))
            out.append(
                result.append_column("row", part.column("row")).append_column(
                    "chunk", part.column("chunk")
                )
            )
        return pa.concat_tables(out)


def _blocks(users: pa.Table, todo: list[tuple[int, int, int]], batch_size: int) -> list[pa.Table]:
    """One block per engine batch of the pending chunks, tagged with row, chunk and batch."""
    blocks = []
    for chunk, start, stop in todo:
        for s, e in batches(start, stop, batch_size):
            rows = np.arange(s, e, dtype=np.int64)
            block = users.slice(s, e - s)
            block = block.append_column("row", pa.array(rows))
            block = block.append_column("chunk", pa.array(np.full(e - s, chunk, np.int64)))
            blocks.append(block.append_column("batch", pa.array(np.full(e - s, s, np.int64))))
    return blocks


def run_ray(
    users: pa.Table,
    out: Path,
    cfg: BatchConfig,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode every pending chunk on `workers` Ray actors, each with `cfg.threads` CPU threads
    (at least one CPU reserved) and `gpus_per_worker` GPUs; returns {users, done_users,
    chunks}. Connects to `address` (a Ray cluster), to the running Ray instance of this
    process, or starts a local one for the job."""
    try:
        import ray
    except ImportError as e:
        raise BatchError("the ray runner needs Ray: pip install 'letterrec[scale]'") from e
    if workers < 1:
        raise BatchError(f"workers must be >= 1, got {workers}")
    todo = pending_chunks(out, cfg, users)
    if not todo:
        mark_complete(out)
        return {"users": users.num_rows, "done_users": 0, "chunks": 0}
    if gpus_per_worker > 0 and cfg.device.startswith("cuda:"):
        # Ray gives each actor its own GPU(s) through CUDA_VISIBLE_DEVICES.
        cfg = dataclasses.replace(cfg, device="cuda")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        done = _run(ray, users, out, cfg, todo, workers, gpus_per_worker, progress)
    finally:
        if started:
            ray.shutdown()
    mark_complete(out)
    return {"users": users.num_rows, "done_users": done, "chunks": len(todo)}


def _run(
    ray: Any,
    users: pa.Table,
    out: Path,
    cfg: BatchConfig,
    todo: list[tuple[int, int, int]],
    workers: int,
    gpus_per_worker: float,
    progress: bool,
) -> int:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours, in users
    ds = ray.data.from_arrow(_blocks(users, todo, cfg.batch_size))
    results = ds.map_batches(
        RecommendActor,
        fn_constructor_kwargs={"cfg": cfg},
        # One call per block (each block is one engine batch; Ray may still hand several blocks
        # to a call, which the actor splits again). A row count here would make Ray re-cut the
        # rows across blocks, and a user decoded in another batch gets other float bits.
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=max(cfg.threads, 1),
        num_gpus=gpus_per_worker,
    )
    left = {chunk: stop - start for chunk, start, stop in todo}
    pending: dict[int, list[pa.Table]] = {chunk: [] for chunk in left}
    done = 0
    with tqdm(
        total=sum(left.values()), unit="user", desc="batch-recommend", disable=not progress
    ) as bar:
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            for chunk in np.unique(batch.column("chunk").to_numpy()):
                part = batch.filter(pc.equal(batch.column("chunk"), chunk))
                pending[int(chunk)].append(part)
                left[int(chunk)] -= part.num_rows
                bar.update(part.num_rows)
                if left[int(chunk)] == 0:
                    table = pa.concat_tables(pending.pop(int(chunk))).sort_by("row")
                    write_part(out, int(chunk), explode(table.drop_columns(["row", "chunk"])))
                    done += table.num_rows
    if any(left.values()):
        raise BatchError(
            f"Ray returned no results for chunks {sorted(c for c, n in left.items() if n)}"
        )
    return done
