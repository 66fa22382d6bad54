"""Data-parallel training of the from-scratch recommender on several processes.

`train_lm_parallel` starts `cfg.nproc` processes with torch.distributed's elastic launcher (the
library behind `torchrun`, with its standalone rendezvous on this machine) and runs
`training.lm.train_lm` in each, as one rank of a process group: gloo on CPU, NCCL with one GPU
per rank (LOCAL_RANK) on CUDA.

What makes N processes train the model one process trains:
- every rank draws the same global batches (the same seeded `length_batches`) and takes a
  contiguous share of each;
- the loss is a weighted mean over a batch's target tokens (per-token weights, padding at 0,
  distillation mixed in per token), so a rank's loss is the weighted sum over its own tokens
  divided by the weight of the whole batch (all-reduced), times the world size:
  DistributedDataParallel averages gradients over the ranks, and the average is the gradient of
  the whole batch's weighted mean. Clipping, AdamW and the schedule then see the same gradient
  on every rank, so the weights stay equal;
- rank 0 alone validates, writes the checkpoint (the same format as one process: either can
  resume the other's) and decides early stopping, which it broadcasts; its model is the result.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.recommender import build_model
from models.vocab import CodeVocab
from training.distill import Teacher
from training.lm import LMResult, LMTrainConfig, train_lm

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(hours=2)
"""How long a rank waits in a collective: the others wait at the end of an epoch while rank 0
validates (beam search over `eval_users`) and writes the checkpoint."""


@dataclass(frozen=True)
class DataParallel:
    """This process's rank in the training group, and the few collectives training needs."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, idx: np.ndarray) -> tuple[np.ndarray, bool]:
        """(windows, counted): this rank's contiguous share of the global batch `idx`. A rank
        left without windows (a last batch smaller than the world) gets the batch's first
        window with `counted` False: it still runs forward and backward, so that it joins the
        gradient all-reduce, but its loss weighs nothing."""
        mine = np.array_split(idx, self.world)[self.rank]
        return (mine, True) if len(mine) else (idx[:1], False)

    def wrap(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        """`model` in DistributedDataParallel (its parameters start from rank 0's); each rank
        then draws its own dropout masks."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Llama's only buffers are the rotary frequencies, equal everywhere: synced once at
        # start, not before every forward.
        net = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        torch.manual_seed(seed + 1 + self.rank)
        return net

    def loss(self, per_token: torch.Tensor, weight: torch.Tensor, counted: bool) -> torch.Tensor:
        """This rank's part of the batch loss: sum(per_token * weight) over its tokens, divided
        by the weight of the whole batch, times the world size (DDP averages gradients over
        ranks). per_token, weight: [B, T-1] of `training.lm.token_losses`."""
        if not counted:
            weight = torch.zeros_like(weight)
        total = weight.sum().detach().float()
        dist.all_reduce(total)
        return (per_token * weight).sum() * self.world / total.clamp_min(1e-9)

    def sum(self, *values: float) -> list[float]:
        """The sums over ranks of `values`."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def decide(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())


def train_lm_parallel(
    train: list[list[int]],
    valid: list[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    cfg: LMTrainConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
    teacher: Teacher | None = None,
) -> LMResult:
    """`train_lm` of the from-scratch recommender on `cfg.nproc` processes (one process:
    `train_lm` itself, here). The CPU threads of this process are split among the ranks; on
    CUDA each rank takes the GPU of its local rank. The result is rank 0's, its model on
    `cfg.device`."""
    if cfg.nproc == 1:
        return train_lm(
            train, valid, codes, vocab, cfg, checkpoint, progress=progress, teacher=teacher
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = torch.device(cfg.device)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if cfg.nproc > gpus:
            raise ValueError(
                f"lm.nproc {cfg.nproc} on {cfg.device} needs one GPU per process, {gpus} visible:"
                f" use --nproc {max(1, gpus)} or fewer"
            )
    elif device.type != "cpu":
        raise ValueError(f"lm.nproc > 1 trains on cpu or cuda, not {cfg.device}")
    threads = max(1, torch.get_num_threads() // cfg.nproc)
    # On CPU the ranks are forked: they inherit the imported modules (seconds of start-up each)
    # and the windows and teacher copy-on-write, without pickling. CUDA cannot be forked once
    # this process has used it (the teacher runs here), so CUDA ranks are spawned.
    start_method = "spawn" if device.type == "cuda" else "fork"
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.nproc,
        run_id=f"letterrec-lm-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this machine
        max_restarts=0,
        start_method=start_method,
    )
    log.info("training the recommender on %d processes (%s)", cfg.nproc, device.type)
    args = (train, valid, codes, vocab, cfg, checkpoint, progress, teacher, threads)
    try:
        results = elastic_launch(launch, _rank_main)(*args, logging.getLogger().level)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message  # the rank's error file: a dict with the exception's message
        if isinstance(message, dict):
            message = message.get("message", message)
        raise RuntimeError(
            f"recommender training failed on rank {rank} of {cfg.nproc}"
            f" (exit code {failure.exitcode}): {message}"
        ) from None
    out = results[0]
    # Any: transformers' stubs type `.to` on the class wrapper, not the instance.
    model: Any = build_model(cfg.model, vocab, cfg.seed)
    model.load_state_dict(torch.load(io.BytesIO(out.pop("state")), weights_only=True))
    return LMResult(model=model.to(device).eval(), **out)


def _rank_main(
    train: list[list[int]],
    valid: list[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    cfg: LMTrainConfig,
    checkpoint: Path | None,
    progress: bool,
    teacher: Teacher | None,
    threads: int,
    log_level: int,
) -> dict[str, Any] | None:
    """One rank (its RANK, LOCAL_RANK and WORLD_SIZE set by the launcher): rank 0 returns the
    result, its weights serialised (bytes pass between processes without shared memory)."""
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    logging.basicConfig(
        level=log_level if rank == 0 else logging.WARNING,
        format=f"%(levelname)s rank {rank} %(name)s: %(message)s",
    )
    device = torch.device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        res = train_lm(
            train,
            valid,
            codes,
            vocab,
            dataclasses.replace(cfg, device=str(device)),
            checkpoint,
            progress=progress and rank == 0,
            teacher=teacher,
            parallel=DataParallel(rank, world, device),
        )
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in res.model.state_dict().items()}, buf)
    return {
        "state": buf.getvalue(),
        "valid": res.valid,
        "epochs": res.epochs,
        "seconds": res.seconds,
        "tokens_per_s": res.tokens_per_s,
        "history": res.history,
    }
