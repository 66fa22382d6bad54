"""Settings: environment parsing, bounds, docstrings on every field."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.server import build_settings
from service.settings import Settings
from tests.service.conftest import live_server, service_settings


def test_every_field_is_documented() -> None:
    undocumented = [n for n, f in Settings.model_fields.items() if not f.description]
    assert not undocumented


def test_environment_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETTERREC_API_KEYS", "alpha, beta,,gamma")
    monkeypatch.setenv("LETTERREC_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LETTERREC_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("LETTERREC_REDIS_URL", "redis://localhost:1/0")
    s = Settings()
    assert s.key_values() == [b"alpha", b"beta", b"gamma"]
    assert s.max_batch_size == 7
    assert s.log_level == "debug"
    assert s.redis_url is not None and "localhost" in s.redis_url.get_secret_value()
    assert "alpha" not in repr(s)  # keys and the Redis URL (passwords) never show in logs


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("queue_size", 0),
        ("beam_width", 0),
        ("request_timeout_s", 0),
        ("device", "tpu"),
        ("max_wait_ms", -1),
        ("max_body_bytes", 10),
        ("torch_threads", -1),
    ],
)
def test_out_of_bounds_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert field in str(err.value)


def test_build_settings_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETTERREC_ENGINE", "vllm")
    monkeypatch.setenv("LETTERREC_BEAM_WIDTH", "5")
    s = build_settings("/tmp/bundle", engine="torch")
    assert s.engine == "torch" and s.beam_width == 5 and str(s.bundle) == "/tmp/bundle"
    with pytest.raises(ValueError, match="unknown setting"):
        build_settings("/tmp/bundle", beam=3)


def test_decode_workers_need_child_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.settings as settings_module

    assert Settings(decode_workers=3).resolved_decode_workers() == 3
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 2)
    assert Settings(device="cpu").resolved_decode_workers() == 2  # auto: one per core
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 1)
    assert Settings(device="cpu").resolved_decode_workers() == 1
    assert Settings(device="cuda").resolved_decode_workers() == 1
    assert Settings(decode_process=False).resolved_decode_workers() == 0  # in process
    assert Settings(engine="vllm").resolved_decode_workers() == 0
    with pytest.raises(ValidationError, match="decode_workers=2 needs decode_process"):
        Settings(decode_workers=2, decode_process=False)
    with pytest.raises(ValidationError, match="vllm engine schedules its own batches"):
        Settings(decode_workers=3, engine="vllm")


def test_auto_device_resolves_to_a_real_device() -> None:
    assert Settings(device="auto").resolved_device() in ("cpu", "cuda")
    assert Settings(device="cpu").resolved_device() == "cpu"


def test_torch_threads_applies_to_the_decoding_threads(tiny_bundle: Path) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    try:
        torch.set_num_threads(2)  # so that the setting has something to change
        with live_server(service_settings(tiny_bundle, torch_threads=1)) as server:
            with server.client() as client:
                assert client.post("/recommend", json={"history": [], "k": 3}).status_code == 200
            probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            probe.start()
            probe.join()
        assert seen == [1]  # a thread started later (as the decode executor's are) sees it too
    finally:
        torch.set_num_threads(before)


def test_connections_beyond_max_connections_get_503_at_once(tiny_bundle: Path) -> None:
    """uvicorn's limit_concurrency comes from the setting. uvicorn refuses a request once the
    open connections (its own included) reach the limit, so 2 leaves room for one client: a
    second one is refused with 503 while the first keeps its connection open."""
    import httpx

    with live_server(service_settings(tiny_bundle, max_connections=2)) as srv:
        with srv.client() as first, httpx.Client(base_url=srv.url, timeout=10) as second:
            assert first.get("/healthz").status_code == 200  # keep-alive: stays open
            assert second.get("/healthz").status_code == 503
        with srv.client() as again:  # the first connection closed: room again
            assert again.get("/healthz").status_code == 200


def test_service_makes_openmp_threads_wait_passively() -> None:
    """`import service` sets OMP_WAIT_POLICY=PASSIVE before torch starts OpenMP (spinning
    decode threads collapse when the host is shared), unless the operator set it."""
    import os
    import subprocess
    import sys

    code = "import service, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr
