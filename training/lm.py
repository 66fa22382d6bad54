"""Training the generative recommender on code sequences with the ranking-guided loss.

Every item position of a window of up to `window_items` items (history + target) is a
prediction target: input `[bos] + codes(items)`, next-token cross-entropy on all code tokens.
Ranking-guided generation loss (LETTER Eq. 8): cross-entropy on logits / tau.
Windows are cut from the end of each user's training sequence without overlap, so every
interaction is a target once per epoch (optionally preceded by `context_items` earlier items
that are seen but not scored); batches group windows of similar length (little
padding). Early stopping on validation NDCG@10 from the real constrained beam search.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.beam import NewItemBonus, beam_search
from models.decoders import make_decoder
from models.recommender import RecommenderConfig, build_model
from models.trie import ItemTrie
from models.vocab import CodeVocab
from training.distill import Teacher, code_targets
from training.metrics import ranks_from_lists, summarize

if TYPE_CHECKING:
    from training.ddp import DataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMTrainConfig:
    model: RecommenderConfig = field(default_factory=RecommenderConfig)
    tau: float = 1.0
    """Temperature of the ranking-guided loss; < 1 sharpens on hard negatives."""
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    warmup: float = 0.05
    """Fraction of steps with linear warm-up before the cosine decay."""
    weight_decay: float = 0.05
    window_items: int = 21
    """Items per training window (history of 20 + target, the paper's setting)."""
    context_items: int = 0
    """Items before each window fed as context without loss (0 = none). Without context a
    target sees only the window's earlier items (0 to `window_items - 1`, about half the
    history on average), while a test target sees a full history of 20: a model trained so
    rarely sees, and cannot learn to copy, an earlier visit that a target repeats. With 10,
    targets see 10 to 30 items (20 on average) for 1.5x the tokens per epoch."""
    max_windows_per_user: int = 0
    """Keep only the most recent windows of each user (0 = all); long-history datasets such as
    MovieLens train much faster with little loss of quality."""
    eval_every: int = 2
    eval_users: int = 2000
    """Validation users (a fixed random subset) scored by beam search for early stopping."""
    patience: int = 3
    min_epochs: int = 0
    """Early stopping is not checked before this many epochs. While a cosine schedule's learning
    rate is high, validation can plateau for several evaluations and then climb as it decays: a
    24-epoch Yelp run with patience 3 (evaluating every 2 epochs) stopped at epoch 8 and kept
    its epoch-2 weights."""
    beam_width: int = 20
    hidden_dropout: float = 0.0
    """Dropout on the token embeddings and on every attention and MLP block's output, in training
    only (Llama has none; see `residual_dropout`). Sparse data such as Yelp overfits without it."""
    repeat_weight: float = 1.0
    """Loss weight of target items that repeat one of the user's previous `window_items - 1`
    items (1 = plain loss). Repeat visits are rarer among training targets than at the end of a
    sequence, where validation and test targets sit (Yelp: 2.9% of training targets, 5.3% of
    validation and 6.5% of test targets), and a model trained on the plain loss puts little mass
    on history items; a weight > 1 corrects that shift of the target distribution."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights (0 = off; 0.999 averages over
    about the last 1,000 steps). Validation, early stopping and the saved model then use the
    average, which is smoother than the last step's weights on small, noisy data."""
    bf16: bool = False
    """bfloat16 autocast for the forward pass where the hardware computes in bfloat16 natively
    (CUDA with bf16, CPUs with AVX512-BF16 or AMX); elsewhere training runs in float32, since
    emulated bfloat16 is many times slower (measured on an AVX2-only EPYC: about 30x)."""
    distill: float = 0.0
    """Weight of distillation from the pipeline's SASRec (0 = off, 1 = teacher only): each code
    token's loss is (1 - distill) x cross-entropy on the true code + distill x cross-entropy
    against SASRec's item distribution mapped onto the codes that follow the true prefix
    (`training.distill`). Training only: the served model is the plain recommender."""
    distill_top_k: int = 256
    """Teacher items kept per training target (the sparse teacher)."""
    distill_temperature: float = 1.0
    """Temperature of the teacher's softmax (> 1 flattens it)."""
    code_smoothing: float = 0.0
    """Label smoothing over each code level (0 = off): every code token's cross-entropy on the
    true code becomes (1 - s) x that + s x the mean negative log-probability of the level's
    codebook_size codes. A model trained without it pushes every code it never saw as a target
    towards zero probability, so the identifier of an item added after training (POST
    /tokenize) scores far below the warm items (ml-100k: a median 29 nats below the tenth);
    smoothing keeps a floor of about log(s / codebook_size) per level under it."""
    seed: int = 0
    device: str = "cpu"
    nproc: int = 1
    """Data-parallel training processes (`training.ddp`): gloo on CPU, NCCL and one GPU each on
    CUDA. The global batch (`batch_size`), the schedule and the gradient of each step are those
    of one process; each process computes its share of every batch."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"lm.nproc must be >= 1 (processes), got {self.nproc}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainState:
    """What a checkpoint needs besides weights and optimiser to resume exactly."""

    epoch: int = 0
    best: float = -1.0
    bad: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LMResult:
    model: torch.nn.Module
    valid: dict[str, float]
    epochs: int
    seconds: float
    tokens_per_s: float
    history: list[dict[str, float]]


def window_bounds(
    train: list[list[int]], window_items: int, per_user: int = 0, context_items: int = 0
) -> list[list[tuple[int, int, int]]]:
    """Per user, the (context start, target start, end) of each of its windows, in the order
    of `windows`."""
    return [_bounds(seq, window_items, per_user, context_items) for seq in train]


def _bounds(
    seq: list[int], window_items: int, per_user: int, context_items: int
) -> list[tuple[int, int, int]]:
    """(context start, target start, end) of each window of one user's sequence: targets are
    cut from the end without overlap, each window preceded by up to `context_items` items."""
    ends = list(range(len(seq), 0, -window_items))
    out = []
    for end in ends[:per_user] if per_user > 0 else ends:
        start = max(0, end - window_items)
        out.append((max(0, start - context_items), start, end))
    return out


def windows(
    train: list[list[int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    window_items: int,
    per_user: int = 0,
    context_items: int = 0,
) -> list[np.ndarray]:
    """Token windows `[bos] + codes of <= context_items + window_items items`, their targets cut
    from the end of each user (at most `per_user` windows per user when > 0)."""
    tok = vocab.tokens(codes)  # [n_items, L]
    out = []
    for seq in train:
        for ctx, _, end in _bounds(seq, window_items, per_user, context_items):
            out.append(np.concatenate([[vocab.bos_id], tok[seq[ctx:end]].reshape(-1)]))
    return out


def instruction_windows(
    train: list[list[int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    per_user: int = 0,
    repeat_weight: float = 1.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training sequences of an LLM's prompt template (`vocab.prompt_prefix` set): one per
    target item, `prompt(history) + codes(target)`, the history being the target's previous
    `history_items` items, exactly the prompt served for it. Returns (token windows, loss
    weights per target token): the target's L codes weigh 1 (`repeat_weight` when the target
    repeats a history item), the template and history 0. Targets run from each user's newest
    (at most `per_user` per user when > 0); a user's first item has no history and no window."""
    tok = vocab.tokens(codes)  # [n_items, L]
    wins, weights = [], []
    for seq in train:
        targets = range(len(seq) - 1, 0, -1)
        for g in targets[:per_user] if per_user > 0 else targets:
            history = seq[max(0, g - vocab.history_items) : g] if vocab.history_items else []
            ids = np.array(vocab.prompt(codes[history]) + tok[seq[g]].tolist(), dtype=np.int64)
            w = np.zeros(len(ids) - 1, dtype=np.float32)
            w[-vocab.levels :] = repeat_weight if seq[g] in history else 1.0
            wins.append(ids)
            weights.append(w)
    return wins, weights


def repeat_flags(
    train: list[list[int]], window_items: int, per_user: int = 0, context_items: int = 0
) -> list[np.ndarray]:
    """Per window of `windows` (same order): for each of its items (context included),
    whether it repeats one of the user's previous `window_items - 1` items (items before the
    window count)."""
    out = []
    for seq in train:
        for ctx, _, end in _bounds(seq, window_items, per_user, context_items):
            out.append(
                np.array(
                    [seq[g] in seq[max(0, g - window_items + 1) : g] for g in range(ctx, end)],
                    dtype=bool,
                )
            )
    return out


def context_flags(
    train: list[list[int]], window_items: int, per_user: int = 0, context_items: int = 0
) -> list[np.ndarray]:
    """Per window of `windows`: for each of its items, whether it is context only (no loss)."""
    return [
        np.arange(ctx, end) < start
        for seq in train
        for ctx, start, end in _bounds(seq, window_items, per_user, context_items)
    ]


def token_weights(
    flags: np.ndarray, levels: int, weight: float, context: np.ndarray | None = None
) -> np.ndarray:
    """Loss weight of each target token of a window (`[bos] + codes`, targets = tokens 1..):
    `weight` for the code tokens of repeated items, 0 for context items, 1 otherwise."""
    w = np.where(flags, weight, 1.0)
    if context is not None:
        w = np.where(context, 0.0, w)
    return np.repeat(w, levels).astype(np.float32)


def length_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of windows with similar lengths."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(wins: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(w) for w in wins)
    ids = torch.full((len(wins), t), pad, dtype=torch.long)
    mask = torch.zeros((len(wins), t), dtype=torch.long)
    for i, w in enumerate(wins):
        ids[i, : len(w)] = torch.from_numpy(w)
        mask[i, : len(w)] = 1
    return ids, mask


def ranking_guided_loss(
    logits: torch.Tensor, targets: torch.Tensor, tau: float, ignore: int
) -> torch.Tensor:
    """Cross-entropy of logits / tau. logits [B, T, V], targets [B, T] (ignore = padding)."""
    return F.cross_entropy(
        (logits / tau).flatten(0, 1).float(), targets.flatten(), ignore_index=ignore
    )


def level_index(vocab: CodeVocab, positions: int) -> torch.Tensor:
    """[positions, N]: the token ids of the level predicted at each target position of a
    window (`[bos] + codes`, target j is level j % L)."""
    j = torch.arange(positions)
    return (
        vocab.code_offset
        + (j % vocab.levels)[:, None] * vocab.codebook_size
        + torch.arange(vocab.codebook_size)[None, :]
    )


def lm_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tau: float,
    pad: int,
    weights: torch.Tensor | None = None,
    soft: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None,
    smooth: tuple[float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Next-token ranking-guided loss over the real tokens; with `weights`, `soft` or `smooth`
    (see `token_losses`) the weighted mean of `token_losses` instead of the mean."""
    if weights is None and soft is None and smooth is None:
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return ranking_guided_loss(logits[:, :-1], targets, tau, -100)
    per_token, w = token_losses(model, ids, mask, tau, weights, soft, smooth)
    return (per_token * w).sum() / w.sum().clamp_min(1e-9)


def token_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tau: float,
    weights: torch.Tensor | None = None,
    soft: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None,
    smooth: tuple[float, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B, T-1], weight [B, T-1]) of each target token of `ids` [B, T]: the
    ranking-guided cross-entropy, and `weights` (one per target token) or 1, zero on padding.
    With `soft` = (q [B, T-1, N], has [B, T-1], weight, level_index [T-1, N]) each code token
    where `has` mixes the cross-entropy on the true token with (weight) the cross-entropy
    against q over the tokens of its level (distillation, `training.distill`). With `smooth` =
    (s, level_index [T-1, N]) the cross-entropy on the true token is label-smoothed by s over
    the tokens of its level (`LMTrainConfig.code_smoothing`), before distillation mixes."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logp = F.log_softmax((logits[:, :-1] / tau).float(), -1)  # [B, T-1, V]
    valid = targets != -100
    per_token = -logp.gather(2, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]

    cached: dict[int, torch.Tensor] = {}

    def level_logp(index: torch.Tensor) -> torch.Tensor:
        """[B, T-1, N] log-probabilities of each target position's level tokens (gathered once
        when smoothing and distillation share the index)."""
        if id(index) not in cached:
            at = index[None].expand(ids.shape[0], -1, -1).to(ids.device)
            cached[id(index)] = logp.gather(2, at)
        return cached[id(index)]

    if smooth is not None and smooth[0] > 0:
        eps, index = smooth
        per_token = (1 - eps) * per_token - eps * level_logp(index).mean(-1)
    if soft is not None:
        q, has, lam, index = soft
        kd = -(q * level_logp(index)).sum(-1)
        per_token = torch.where(has, (1 - lam) * per_token + lam * kd, per_token)
    w = (torch.ones_like(per_token) if weights is None else weights) * valid
    return per_token, w


def soft_targets(
    teacher: Teacher,
    idx: np.ndarray,
    ids: torch.Tensor,
    codes: torch.Tensor,
    vocab: CodeVocab,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, T-1, N], has [B, T-1]) for the windows `idx` of a batch `ids` [B, T]."""
    b, t = ids.shape
    n = (t - 1) // vocab.levels
    k = teacher.items.shape[1]
    items = torch.zeros(b, n, k, dtype=torch.long)
    probs = torch.zeros(b, n, k)
    for r, w in enumerate(idx):
        it, pr = teacher.window(int(w))
        items[r, : len(it)] = torch.from_numpy(it.astype(np.int64))
        probs[r, : len(pr)] = torch.from_numpy(pr)
    tok = ids[:, 1:].cpu().reshape(b, n, vocab.levels)
    target_codes = tok - vocab.code_offset - torch.arange(vocab.levels) * vocab.codebook_size
    q, has = code_targets(items, probs, target_codes, codes, vocab.codebook_size)
    return q.reshape(b, n * vocab.levels, -1), has.reshape(b, n * vocab.levels)


def history_prompts(
    histories: Sequence[Sequence[int]], codes: np.ndarray, vocab: CodeVocab
) -> list[list[int]]:
    """The prompt of each history of item rows (the template around no codes for an empty
    one: `[bos]` from scratch)."""
    return [vocab.prompt(codes[list(h)]) for h in histories]


@torch.no_grad()
def recommend(
    model: torch.nn.Module,
    histories: list[list[int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    trie: ItemTrie,
    k: int = 10,
    beam_width: int = 20,
    batch_size: int = 256,
    progress: bool = False,
    new_from: int = 0,
    new_bonus: float = 0.0,
) -> list[list[int]]:
    """Top-k item rows per history by trie-constrained beam search; with `new_bonus`, rows
    >= `new_from` are favoured by it (models.beam.NewItemBonus)."""
    model.eval()
    decoder = make_decoder(model)  # once: the fused decoder re-lays out the weights
    out: list[list[int]] = []
    starts = range(0, len(histories), batch_size)
    for s in tqdm(starts, desc="beam search", unit="batch", disable=not progress):
        prompts = history_prompts(histories[s : s + batch_size], codes, vocab)
        new = NewItemBonus(new_from, [new_bonus] * len(prompts)) if new_bonus > 0 else None
        res = beam_search(decoder, prompts, trie, vocab, beam_width=beam_width, k=k, new_items=new)
        out.extend([[i for i in row if i >= 0] for row in res.items.tolist()])
    return out


def evaluate_pairs(
    model: torch.nn.Module,
    pairs: list[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    trie: ItemTrie,
    beam_width: int = 20,
    progress: bool = False,
) -> tuple[dict[str, float], list[list[int]]]:
    recs = recommend(
        model, [h for h, _ in pairs], codes, vocab, trie, 10, beam_width, progress=progress
    )
    return summarize(ranks_from_lists(recs, [t for _, t in pairs])), recs


DROPOUT_SITES = ("embed_tokens", "self_attn.o_proj", ".mlp")
"""Module-name endings whose outputs `residual_dropout` drops: what enters the residual stream."""


def residual_dropout(model: torch.nn.Module, p: float) -> list[Any]:
    """Dropout (rate `p`) on the embeddings and on each residual branch of a Llama-family model
    while it is in training mode, as forward hooks: the model itself stays a plain Llama that
    transformers and vLLM load, and evaluation is unaffected. Returns the hook handles."""
    if p <= 0:
        return []

    def drop(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p, module.training)

    return [
        m.register_forward_hook(drop)
        for name, m in model.named_modules()
        if name.endswith(DROPOUT_SITES)
    ]


def _ema_model(model: torch.nn.Module, decay: float) -> Any:
    """torch's AveragedModel keeping an exponential moving average of `model`'s parameters
    (buffers copied), or None when `decay` is 0."""
    if decay <= 0:
        return None
    if not decay < 1:
        raise ValueError(f"lm.ema must be in [0, 1), got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def native_bf16(device: torch.device, cpu_flags: str | None = None) -> bool:
    """Whether `device` computes bfloat16 matmuls natively: CUDA with bf16 support, or a CPU
    with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo, or `cpu_flags` in tests)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if cpu_flags is None:
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpu_flags.split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def _trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: every entry of the state dict except frozen parameters
    (a LoRA-wrapped LLM's base weights, which would otherwise be copied at every improvement).
    For a model trained in full, the whole state dict."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_lm(
    train: list[list[int]],
    valid: list[tuple[list[int], int]],
    codes: np.ndarray,
    vocab: CodeVocab,
    cfg: LMTrainConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    teacher: Teacher | None = None,
    parallel: DataParallel | None = None,
) -> LMResult:
    """Train from scratch, or `model` (e.g. a LoRA-wrapped pretrained LM), or resume from
    `checkpoint`; keeps the best validation state. `teacher` (for `cfg.distill` > 0): the
    SASRec distributions of `training.distill.teacher_topk` over the same windows.
    `parallel`: this process's rank in a data-parallel group (`training.ddp`, which launches
    them): every rank draws the same global batches and trains on its share of each, with the
    gradient of the whole batch's loss; rank 0 alone validates, checkpoints and decides when to
    stop, and only its result holds the validation history."""
    if cfg.distill > 0 and teacher is None:
        raise ValueError("lm.distill > 0 needs a teacher (training.distill.teacher_topk)")
    if not 0 <= cfg.distill <= 1:
        raise ValueError(f"lm.distill must be in [0, 1], got {cfg.distill}")
    if not 0 <= cfg.code_smoothing < 1:
        raise ValueError(f"lm.code_smoothing must be in [0, 1), got {cfg.code_smoothing}")
    device = torch.device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    model = (model if model is not None else build_model(cfg.model, vocab, cfg.seed)).to(device)
    win_args = (cfg.window_items, cfg.max_windows_per_user, cfg.context_items)
    templated = vocab.prompt_prefix is not None
    if templated and (cfg.distill > 0 or cfg.context_items > 0 or cfg.code_smoothing > 0):
        raise ValueError(
            "lm.distill, lm.context_items and lm.code_smoothing apply to the from-scratch"
            " recommender's windows;"
            " set them to 0 for a prompt template (an LLM recommender)"
        )
    longest = (
        vocab.max_prompt_len + vocab.levels
        if templated
        else 1 + (cfg.window_items + cfg.context_items) * vocab.levels
    )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and longest > max_pos:
        raise ValueError(
            f"lm.window_items + lm.context_items = {cfg.window_items + cfg.context_items} items"
            f" make windows of {longest} tokens, more than the model's"
            f" max_position_embeddings {max_pos}: lower them or raise the vocabulary's"
            " history_items"
        )
    tok_w: list[np.ndarray] | None = None
    if templated:
        wins, tok_w = instruction_windows(
            train, codes, vocab, cfg.max_windows_per_user, cfg.repeat_weight
        )
    else:
        wins = windows(train, codes, vocab, *win_args)
    if teacher is not None and len(teacher.offsets) != len(wins) + 1:
        raise ValueError(
            f"the teacher covers {len(teacher.offsets) - 1} windows, training has {len(wins)}:"
            " it must be computed with the same window settings"
        )
    codes_t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    index = level_index(vocab, longest - 1)
    if not templated and (cfg.repeat_weight != 1.0 or cfg.context_items > 0):
        flags = repeat_flags(train, *win_args)
        ctx = context_flags(train, *win_args)
        tok_w = [
            token_weights(f, vocab.levels, cfg.repeat_weight, c)
            for f, c in zip(flags, ctx, strict=True)
        ]
        targets = np.concatenate(flags)[~np.concatenate(ctx)] if flags else np.zeros(1)
        log.info(
            "repeat targets: %.2f%% of training items, loss weight %g; %d context items",
            100 * targets.mean(),
            cfg.repeat_weight,
            cfg.context_items,
        )
    lengths = np.array([len(w) for w in wins])
    steps_per_epoch = -(-len(wins) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, total, max(1, int(cfg.warmup * total)))
    )
    trie = ItemTrie.from_codes(codes, vocab.codebook_size)
    pick = np.random.default_rng(cfg.seed + 1).permutation(len(valid))[: cfg.eval_users]
    valid_subset = [valid[i] for i in sorted(pick)]
    state = TrainState()
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = TrainState(**saved["state"])
        rng = saved["rng"]
        log.info("resumed from %s at epoch %d", checkpoint, state.epoch)
    main = parallel is None or parallel.main
    # Before the dropout hooks: the copy has none. Rank 0 alone validates and saves the average.
    ema = _ema_model(model, cfg.ema) if main else None
    if ema is not None and checkpoint is not None and checkpoint.exists() and "ema" in saved:
        ema.load_state_dict(saved["ema"])
    hooks = residual_dropout(model, cfg.hidden_dropout)
    net = model if parallel is None else parallel.wrap(model, cfg.seed)
    use_bf16 = cfg.bf16 and native_bf16(device)
    if cfg.bf16 and not use_bf16:
        log.warning("lm.bf16: no native bfloat16 on %s; training in float32", device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def batch(
        idx: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any, Any]:
        """(ids, mask, token weights, distillation targets, smoothing) of the windows `idx` on
        `device`."""
        ids, mask = collate([wins[i] for i in idx], vocab.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        weights = None
        if tok_w is not None:
            weights = torch.zeros(ids.shape[0], ids.shape[1] - 1)
            for r, i in enumerate(idx):
                weights[r, : len(tok_w[i])] = torch.from_numpy(tok_w[i])
            weights = weights.to(device)
        soft = None
        levels = index[: ids.shape[1] - 1]  # one tensor, so token_losses gathers once
        if cfg.distill > 0 and teacher is not None:
            q, has = soft_targets(teacher, idx, ids, codes_t, vocab)
            soft = (q.to(device), has.to(device), cfg.distill, levels)
        smooth = (cfg.code_smoothing, levels) if cfg.code_smoothing > 0 else None
        return ids, mask, weights, soft, smooth

    t0, tokens = time.perf_counter(), 0
    bar = tqdm(
        range(state.epoch, cfg.epochs),
        desc="recommender",
        unit="epoch",
        disable=not (progress and main),
    )
    for epoch in bar:
        net.train()
        total_loss, n_batches = 0.0, 0
        batches = tqdm(
            length_batches(lengths, cfg.batch_size, rng),
            desc=f"epoch {epoch + 1}",
            unit="batch",
            leave=False,
            disable=not (progress and main),
        )
        for idx in batches:
            rows, counted = (idx, True) if parallel is None else parallel.share(idx)
            ids, mask, weights, soft, smooth = batch(rows)
            with autocast:
                if parallel is None:
                    loss = lm_loss(model, ids, mask, cfg.tau, vocab.pad_id, weights, soft, smooth)
                else:
                    per_token, w = token_losses(net, ids, mask, cfg.tau, weights, soft, smooth)
                    loss = parallel.loss(per_token, w, counted)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            total_loss += loss.item()
            n_batches += 1
            tokens += int(mask.sum()) if counted else 0
            if n_batches % 20 == 0:
                batches.set_postfix(loss=f"{total_loss / n_batches:.3f}")
        if parallel is not None:  # each rank's loss is its share of the batch's, times world
            total_loss = parallel.sum(total_loss)[0] / parallel.world
        row: dict[str, float] = {"epoch": epoch + 1, "loss": total_loss / max(1, n_batches)}
        if main and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            scored = model if ema is None else ema.module
            metrics, _ = evaluate_pairs(scored, valid_subset, codes, vocab, trie, cfg.beam_width)
            row.update({f"valid_{k}": v for k, v in metrics.items()})
            if metrics["ndcg@10"] > state.best:
                state.best, state.bad = metrics["ndcg@10"], 0
                state.best_state = _trained_state(scored)
                state.best_valid = metrics
            else:
                state.bad += 1
        state.history.append(row)
        state.epoch = epoch + 1
        if main:
            log.info(
                "recommender epoch %d: %s", epoch + 1, {k: round(v, 5) for k, v in row.items()}
            )
            bar.set_postfix(loss=f"{row['loss']:.3f}", best_ndcg10=f"{max(state.best, 0):.4f}")
        if main and checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "state": asdict(state),
                    "rng": rng,
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                },
                checkpoint,
            )
        stop = state.bad >= cfg.patience and state.epoch >= cfg.min_epochs
        if parallel is not None:
            stop = parallel.decide(stop)
        if stop:
            break
    if parallel is not None:
        tokens = int(parallel.sum(float(tokens))[0])
    seconds = time.perf_counter() - t0
    for hook in hooks:
        hook.remove()
    if state.best_state is not None:
        model.load_state_dict(state.best_state, strict=False)
    model.eval()
    return LMResult(
        model, state.best_valid, state.epoch, seconds, tokens / max(seconds, 1e-9), state.history
    )
