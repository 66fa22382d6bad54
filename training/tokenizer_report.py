"""Tokenizer quality report: code utilisation, collisions, reconstruction, embedding collapse,
CF alignment (LETTER Table 4) and code-frequency plots (LETTER Figure 6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.item_tokenizer import ItemTokenizer


def level_stats(codes: np.ndarray, codebook_size: int) -> list[dict[str, Any]]:
    """Per level: codes used, assignment entropy (nats), perplexity, largest load."""
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log(p)).sum())
        out.append(
            {
                "level": level,
                "used": int((counts > 0).sum()),
                "codebook_size": codebook_size,
                "entropy": entropy,
                "perplexity": float(np.exp(entropy)),
                "max_load": int(counts.max()),
            }
        )
    return out


def effective_rank(x: np.ndarray) -> tuple[float, np.ndarray]:
    """Roy & Vetterli's effective rank of centred x [n, d] and its singular values."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum())), s


def cf_code_overlap(codes: np.ndarray, cf: np.ndarray, chunk: int = 2048) -> float:
    """LETTER Table 4: mean fraction of positions whose code an item shares with its nearest
    neighbour in CF space (cosine, excluding itself)."""
    z = torch.nn.functional.normalize(torch.as_tensor(cf, dtype=torch.float32), dim=-1)
    nn_idx = np.empty(len(z), dtype=np.int64)
    for s in range(0, len(z), chunk):
        sim = z[s : s + chunk] @ z.t()  # [c, n]
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -2.0
        nn_idx[s : s + chunk] = sim.argmax(-1).numpy()
    return float((codes == codes[nn_idx]).mean())


@torch.no_grad()
def reconstruction_error(
    tok: ItemTokenizer, embeddings: np.ndarray, codes: np.ndarray
) -> np.ndarray:
    """Per-item MSE of decoding the given codes, in the model's input space. -> [n]."""
    x = tok.prepare(embeddings)
    levels = len(tok.model.codebooks)  # an extra disambiguation level has no codebook
    z = sum(tok.model.codebooks[lv][torch.as_tensor(codes[:, lv])] for lv in range(levels))
    recon = tok.model.decoder(z)
    return ((recon - x) ** 2).mean(-1).cpu().numpy()


def tokenizer_report(
    tok: ItemTokenizer,
    embeddings: np.ndarray,
    codes: np.ndarray,
    greedy_codes: np.ndarray,
    moved: np.ndarray,
    cf: np.ndarray | None,
) -> dict[str, Any]:
    n = len(codes)
    err_final = reconstruction_error(tok, embeddings, codes)
    err_greedy = reconstruction_error(tok, embeddings, greedy_codes)
    latents = tok.latents(embeddings).numpy()
    erank, spectrum = effective_rank(latents)
    unique_greedy = len({tuple(r) for r in greedy_codes.tolist()})
    report: dict[str, Any] = {
        "items": n,
        "unique_ids": len({tuple(r) for r in codes.tolist()}),
        "levels": level_stats(codes, tok.codebook_size),
        "collisions": {
            "unique_before": unique_greedy,
            "items_colliding_before": int(n - unique_greedy),
            "items_moved": int(len(moved)),
            "recon_mse_moved_before": float(err_greedy[moved].mean()) if len(moved) else 0.0,
            "recon_mse_moved_after": float(err_final[moved].mean()) if len(moved) else 0.0,
        },
        "recon_mse": float(err_final.mean()),
        "latent_effective_rank": erank,
        "latent_dim": int(latents.shape[1]),
        "latent_singular_values": [float(v) for v in spectrum],
    }
    if cf is not None:
        report["cf_code_overlap"] = cf_code_overlap(codes, cf)
    return report


def plot_code_frequency(reports: dict[str, np.ndarray], codebook_size: int, path: Path) -> None:
    """LETTER Fig. 6: items per level-0 code, codes sorted by load, one line per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, codes in reports.items():
        counts = np.sort(np.bincount(codes[:, 0], minlength=codebook_size))[::-1]
        ax.plot(np.arange(codebook_size), counts, label=name)
    ax.set_xlabel("level-1 code (sorted by load)")
    ax.set_ylabel("items assigned")
    ax.set_yscale("log")
    ax.set_title("Code assignment distribution (LETTER Fig. 6)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectrum(spectra: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in spectra.items():
        s_arr = np.asarray(s)
        ax.plot(np.arange(1, len(s_arr) + 1), s_arr / s_arr[0], marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalised singular value")
    ax.set_title("Latent spectrum (embedding collapse check)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
