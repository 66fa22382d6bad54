"""What every benchmark result carries: command, commit, machine, created_at; and, for the
benchmarks that run a recommender, which model it was (`model_info`)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.bundle import git_commit

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_flags": cpu_flags(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gb"] = round(int(mem) / 1024**2, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""CPU features that decide which kernels run fast: AVX2/AVX-512 float32 GEMMs, native bfloat16
dot products (AVX512_BF16) and the AMX tile units that make bfloat16 matmuls several times faster;
without them bfloat16 is emulated and slower than float32."""


def cpu_flags() -> list[str] | None:
    """Which of SPEED_FLAGS this CPU reports (/proc/cpuinfo); None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def lm_shape(lm_dir: Path) -> dict[str, Any]:
    """hidden / layers / heads / intermediate of a Hugging Face model directory (None each when
    its config.json is missing)."""
    cfg = _read_json(lm_dir / "config.json")
    return {
        "hidden": cfg.get("hidden_size"),
        "layers": cfg.get("num_hidden_layers"),
        "heads": cfg.get("num_attention_heads"),
        "intermediate": cfg.get("intermediate_size"),
    }


def random_model_info(lm_dir: Path) -> dict[str, Any]:
    """`model_info` of a randomly initialised model built by the benchmark itself."""
    return {
        "model_profile": "random",
        "weights": "random",
        "model": {**lm_shape(lm_dir), "bundle": None},
    }


def model_info(bundle_dir: Path) -> dict[str, Any]:
    """Which model a bundle holds, for result files: `model_profile` (the training profile),
    `weights` ('trained' or 'unknown') and `model` (its shape, the bundle path, and where each
    answer came from).

    The profile: the manifest config's `profile` entry when it has one; else the profile whose
    whole configuration the manifest config equals (training device aside); else the profile
    whose recommender has this model's shape (the config was an experiment file); else 'custom'.
    The weights are 'trained' when training left its record (lm/letterrec.json written by the
    pipeline or LoRA training, or report/lm.json), 'unknown' otherwise."""
    from training.config import PROFILES  # lazily: it imports torch, which load.py does not need

    bundle_dir = Path(bundle_dir)
    config = _read_json(bundle_dir / "manifest.json").get("config", {})
    shape = lm_shape(bundle_dir / "lm")
    device = (config.get("lm") or {}).get("device", "cpu")
    profile, how = "custom", "neither the manifest config nor the model shape match a profile"
    if isinstance(config.get("profile"), str):
        profile, how = config["profile"], "manifest config 'profile'"
    elif match := [n for n, p in PROFILES.items() if p.with_device(device).to_dict() == config]:
        profile, how = match[0], "manifest config equals the profile"
    elif match := [n for n, p in PROFILES.items() if _same_shape(p.lm.model, shape)]:
        profile, how = match[0], "model shape (the manifest config differs from the profile)"
    record = _read_json(bundle_dir / "lm" / "letterrec.json")
    if "train" in record or "lora" in record:
        weights, evidence = "trained", "lm/letterrec.json"
    elif (bundle_dir / "report" / "lm.json").exists():
        weights, evidence = "trained", "report/lm.json"
    else:
        weights, evidence = "unknown", "no training record (lm/letterrec.json, report/lm.json)"
    return {
        "model_profile": profile,
        "weights": weights,
        "model": {
            **shape,
            "bundle": str(bundle_dir),
            "profile_from": how,
            "weights_from": evidence,
        },
    }


def _same_shape(model: Any, shape: dict[str, Any]) -> bool:
    return (model.hidden, model.layers, model.heads, model.intermediate) == (
        shape["hidden"],
        shape["layers"],
        shape["heads"],
        shape["intermediate"],
    )


def header() -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": git_commit(Path(__file__).resolve().parent),
        "machine": machine(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def machine_text(m: dict[str, Any]) -> tuple[str, str]:
    """(where, CPU flags) of a `machine()` record, as reports print them."""
    where = m.get("gpu") or f"{m.get('cpus')} x {m.get('cpu_model')}"
    flags = m.get("cpu_flags")
    flags = "unknown" if flags is None else ", ".join(flags) or "none of " + ", ".join(SPEED_FLAGS)
    return where, flags


def md_header(title: str, head: dict[str, Any]) -> str:
    m = head["machine"]
    where, flags = machine_text(m)
    text = (
        f"# {title}\n\n"
        f"- command: `{head['command']}`\n"
        f"- commit: `{head['commit']}`\n"
        f"- machine: {where}, {m.get('memory_gb')} GB, torch {m.get('torch')}; "
        f"CPU flags: {flags}\n"
    )
    if "model_profile" in head:
        mo = head["model"]
        text += (
            f"- model: profile {head['model_profile']}, {head['weights']} weights, "
            f"hidden {mo.get('hidden')}, {mo.get('layers')} layers, "
            + (f"bundle `{mo['bundle']}`\n" if mo.get("bundle") else "no bundle\n")
        )
    return text + f"- created: {head['created_at']}\n\n"


def md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_result(
    name: str, payload: dict[str, Any], markdown: str, results: Path = RESULTS
) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (results / f"{name}.md").write_text(markdown)
    return path


def rows_figure(rows: list[dict[str, Any]], metrics: tuple[str, str]) -> tuple[Any, Any]:
    """A report figure: each row's two `metrics` as horizontal bars with +-2 standard errors
    (`se_<metric>`) on the left; the right axis is left to the caller. Returns (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
    for j, m in enumerate(metrics):
        y = [i + 0.4 * j for i in range(len(rows))]
        axes[0].barh(
            y,
            [r[m] for r in rows],
            height=0.4,
            xerr=[2 * r.get(f"se_{m}", 0.0) for r in rows],
            label=f"{m} (test, +-2 se)",
        )
    axes[0].set_yticks([i + 0.2 for i in range(len(rows))], [r["model"] for r in rows])
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8)
    return fig, axes
