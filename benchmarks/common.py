"""What every benchmark result carries: command, commit, machine, created_at."""

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


def header() -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": git_commit(Path(__file__).resolve().parent),
        "machine": machine(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def md_header(title: str, head: dict[str, Any]) -> str:
    m = head["machine"]
    where = m.get("gpu") or f"{m.get('cpus')} x {m.get('cpu_model')}"
    return (
        f"# {title}\n\n"
        f"- command: `{head['command']}`\n"
        f"- commit: `{head['commit']}`\n"
        f"- machine: {where}, {m.get('memory_gb')} GB, torch {m.get('torch')}\n"
        f"- created: {head['created_at']}\n\n"
    )


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
