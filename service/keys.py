"""API keys from the environment and from files (a mounted Kubernetes Secret), reloaded without a
restart, and a per-key token bucket for write routes.

`KeyRing.values()` is called on every authenticated request: it re-reads the key file only when
a cheap `stat` (at most once a second) says it changed, so rotating a Secret takes effect within
about a second plus the kubelet's sync delay, and revoking one (deleting the file or a line) too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "dev-insecure-"
"""Keys starting with this are the repository's public development placeholders: never accepted."""


def is_placeholder_key(key: str) -> bool:
    return key.startswith(PLACEHOLDER_PREFIX)


def parse_keys(text: str) -> list[str]:
    """Keys separated by newlines or commas; blank lines and `#` comments ignored."""
    keys: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keys.extend(k.strip() for k in line.split(",") if k.strip())
    return keys


def _key_files(path: Path) -> list[Path]:
    """`path` itself, or the visible regular files of a directory (a mounted Secret: one file
    per key of the Secret; kubelet's `..data` links are hidden)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())


def _signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for p in _key_files(path):
        st = p.stat()  # follows kubelet's symlinks: a swapped Secret changes inode and mtime
        out.append((p.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class KeyRing:
    """The accepted keys: `env_keys` plus those in `path` (a file or a directory of files)."""

    def __init__(
        self, env_keys: list[str], path: Path | None = None, check_every_s: float = 1.0
    ) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._env = [k for k in env_keys if not is_placeholder_key(k)]
        self._env_placeholders = sum(map(is_placeholder_key, env_keys))
        self._file_placeholders = 0
        self._file: list[str] = []
        self._signature: object = None
        self._checked_at = -math.inf
        self._values: list[bytes] = [k.encode() for k in self._env]
        if path is not None:
            self._reload(force=True)

    def values(self) -> list[bytes]:
        """The keys now, as bytes for constant-time comparison."""
        if self.path is not None and time.monotonic() - self._checked_at >= self.check_every_s:
            self._reload()
        return self._values

    def _reload(self, force: bool = False) -> None:
        assert self.path is not None
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                sig: object = _signature(self.path)
            except OSError as e:
                sig = ("error", str(e))
            if sig == self._signature and not force:
                return
            self._signature = sig
            try:
                text = "\n".join(p.read_text("utf-8") for p in _key_files(self.path))
            except (OSError, UnicodeDecodeError) as e:
                log.warning(
                    "API key file %s unreadable (%s): only the LETTERREC_API_KEYS keys are "
                    "accepted until it is fixed",
                    self.path,
                    e,
                )
                text = ""
            keys = parse_keys(text)
            self._file_placeholders = sum(map(is_placeholder_key, keys))
            self._file = [k for k in keys if not is_placeholder_key(k)]
            self._values = [k.encode() for k in [*self._env, *self._file]]
            log.info(
                "API keys: %d from the environment, %d from %s",
                len(self._env),
                len(self._file),
                self.path,
            )

    @property
    def placeholders(self) -> int:
        """Public development placeholder keys found (and refused)."""
        return self._env_placeholders + self._file_placeholders


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per API key: `rate_per_s` writes a second on average, bursts of up to
    `burst`. Buckets are keyed by a hash of the key, never the key itself."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[bytes, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, key: bytes, now: float | None = None) -> float:
        """0 when the call may proceed (a token is spent), else the seconds until one is due."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        name = hashlib.sha256(key).digest()
        b = self._buckets.get(name)
        if b is None:
            b = self._buckets[name] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate_per_s)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate_per_s
