"""Service settings: one pydantic-settings class, read from `LETTERREC_*` environment variables.

Built in the app's lifespan (or passed to `create_app`), never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.keys import KeyRing, is_placeholder_key

__all__ = ["Settings", "is_placeholder_key"]


class Settings(BaseSettings):
    """Everything the recommendation service can be told; env var = `LETTERREC_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix="LETTERREC_",
        extra="ignore",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    bundle: Path | None = None
    """Bundle directory written by the offline pipeline (manifest.json, catalogue, lm/, ...)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the recommender runs; `auto` picks cuda when torch sees a GPU, else cpu."""

    engine: str = Field(default="torch", min_length=1, max_length=32)
    """Decoding engine name from `service.engines` (torch or vllm)."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weight dtype for the decoding engine."""

    beam_width: int = Field(default=20, ge=1, le=512)
    """Beam width of the trie-constrained beam search."""

    torch_threads: int = Field(default=0, ge=0, le=1024)
    """CPU threads torch may use for decoding (0: torch's default, one per core). On a small CPU
    the event loop and HTTP parsing compete with decoding; fewer threads can lower tail latency."""

    decode_process: bool = True
    """Run the torch engine in a child process (service/engines/subprocess_engine.py), so that
    decoding and the event loop do not share one GIL. Measured on 2 CPU cores (Yelp bundle,
    1 torch thread, open loop at 100 requests/s): p99 56 ms against 101-156 ms in process, and
    221 against 173 requests/s at 32 connections (closed loop). Start-up takes a few seconds
    longer; the vllm engine already decodes in its own processes and ignores this."""

    decode_workers: int = Field(default=0, ge=0, le=64)
    """With decode_process: how many child decode processes, each decoding whole batches, so
    that up to this many batches decode at once. 0 (auto): 2 on a CPU with at least 2 usable
    cores, else 1 (one on CUDA, where one batch fills the device). With more than one and
    torch_threads 0, each child takes an equal share of the cores. Measured on 2 cores (ml-100k,
    the `full` profile's trained model, float32, benchmarks/results/load-cpu-intel-ml100k-full*):
    2 children of 1 thread: p99 106 ms at 100 requests/s and 203 requests/s at 32 connections
    (medians of 3 runs), against 263 ms and 147 for one child of 2 threads, 334 ms and 105 for
    one child of 1 thread."""

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Most user requests decoded together in one batch."""

    max_wait_ms: float = Field(default=0.0, ge=0.0, le=1000.0)
    """How long the first request of a batch waits for company before decoding starts. 0 (the
    default) decodes as soon as the engine is free: requests that arrive during a decode still
    form the next batch together, so batches grow with load without delaying a lone request.
    Measured on 2 CPU cores (Yelp bundle, 1 torch thread): 5 ms cost a lone request 6 ms
    (closed loop, 1 connection: p50 21 -> 15 ms) and bought no throughput at 32 connections."""

    queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    """Requests allowed to wait for decoding; beyond it the service answers 503 + Retry-After."""

    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Open connections and in-flight requests uvicorn accepts (its limit_concurrency); beyond
    it new requests get 503 at once, so an overload cannot exhaust memory."""

    decode_timeout_s: float = Field(default=120.0, gt=0.0, le=3600.0)
    """With decode_process: a batch the decode child has not answered within this many seconds
    fails (503 for its requests) and the child is killed and restarted, so a hung child cannot
    block decoding for good."""

    max_waiting_writes: int = Field(default=32, ge=1, le=100_000)
    """/tokenize calls allowed to wait for the catalogue writer (writes are serialized); beyond
    it the service answers 503 + Retry-After at once. Each waits at most request_timeout_s."""

    request_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """Per-request limit on queueing plus decoding; past it the request gets 504."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Largest accepted request body; larger bodies get 413."""

    redis_url: SecretStr | None = None
    """Redis URL (redis://host:port/db). Unset: the catalogue and trie live in-process only."""

    redis_namespace: str = Field(default="letterrec", min_length=1, max_length=64)
    """Key prefix in Redis; the bundle fingerprint is appended so bundles never mix."""

    redis_timeout_s: float = Field(default=1.0, gt=0.0, le=60.0)
    """Socket connect/read timeout for Redis calls, so a dead Redis fails fast."""

    sync_interval_s: float = Field(default=0.25, gt=0.0, le=60.0)
    """Version-polling period towards Redis (pub/sub wakes replicas sooner)."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Comma-separated API keys accepted as `Authorization: Bearer <key>` on write routes. There
    is no default key: with none here nor in api_keys_file, write routes refuse every call."""

    api_keys_file: Path | None = None
    """A file of API keys (one per line or comma-separated; `#` comments) or a directory of such
    files (a mounted Kubernetes Secret), accepted besides api_keys. Re-read within a second of
    a change, without a restart: a rotated or revoked key takes effect at once."""

    write_rate_per_s: float = Field(default=10.0, ge=0.0, le=1_000_000.0)
    """Writes (/tokenize calls) allowed per API key and second on average (token bucket); past
    it 429 with Retry-After. 0 turns the limit off."""

    write_burst: int = Field(default=20, ge=1, le=1_000_000)
    """Writes one API key may make at once before write_rate_per_s paces it."""

    require_key_for_recommend: bool = False
    """Also demand an API key on /recommend and /recommend/batch."""

    tokenizer_device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Where the item tokenizer (text encoder + RQ-VAE) runs for /tokenize."""

    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """Log level of the service and of uvicorn."""

    shutdown_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """On shutdown, how long queued requests may take to finish before they are failed."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _workers_need_child_processes(self) -> Settings:
        if self.decode_workers > 1 and self._decodes_in_process():
            raise ValueError(
                f"decode_workers={self.decode_workers} needs decode_process (torch engines in "
                "child processes); the vllm engine schedules its own batches"
            )
        return self

    def _decodes_in_process(self) -> bool:
        """No decode child: decode_process off, or vllm (which runs its own processes)."""
        return not self.decode_process or self.engine == "vllm"

    def resolved_decode_workers(self) -> int:
        """The decode child processes to start (0 for engines decoded in process)."""
        if self._decodes_in_process():
            return 0
        if self.decode_workers:
            return self.decode_workers
        if self.resolved_device() != "cpu":
            return 1
        return 2 if usable_cores() >= 2 else 1

    def resolved_device(self) -> str:
        """`auto` -> cuda when available, else cpu."""
        return _resolve(self.device)

    def resolved_tokenizer_device(self) -> str:
        return _resolve(self.tokenizer_device)

    def key_ring(self) -> KeyRing:
        """The accepted keys (environment and file). The development placeholders that the
        repository once shipped are public, so they are never accepted: a deployment that keeps
        them has writes closed (and logs why) instead of open to anyone who read the code."""
        return KeyRing([k.get_secret_value() for k in self.api_keys], self.api_keys_file)

    def key_values(self) -> list[bytes]:
        """The keys accepted now, as bytes."""
        return self.key_ring().values()

    def placeholder_keys(self) -> int:
        return self.key_ring().placeholders


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resolve(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
