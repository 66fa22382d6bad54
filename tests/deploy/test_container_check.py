"""scripts/container_check.sh and what it builds besides the server image: the stand-in Redis and
Prometheus images for the compose stack. The check itself needs a Docker daemon and runs in CI
after the tests (.ci/run); these tests hold what can be checked without one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, DOCKER, ROOT, assert_ok, run, stages, tool

STANDINS = {"redis": DOCKER / "Dockerfile.redis", "prometheus": DOCKER / "Dockerfile.prometheus"}


def test_container_check_rejects_unknown_arguments() -> None:
    out = run(["bash", "scripts/container_check.sh", "--frobnicate"])
    assert out.returncode == 2 and "--no-compose" in out.stderr, out.stderr


def test_probe_finds_consecutive_free_ports() -> None:
    out = run([sys.executable, "scripts/container_probe.py", "free-port", "--consecutive", "2"])
    assert_ok(out)
    assert 1024 <= int(out.stdout) < 65535


def test_probe_refuses_an_unknown_command() -> None:
    out = run([sys.executable, "scripts/container_probe.py", "frobnicate"])
    assert out.returncode == 2 and "single" in out.stderr


@pytest.mark.parametrize("name", sorted(STANDINS))
def test_standin_images_pass_hadolint_and_run_as_non_root(name: str) -> None:
    assert_ok(run([tool("hadolint"), str(STANDINS[name])]))
    (final,) = stages(STANDINS[name])
    assert final[0] == ("FROM", "${BASE_IMAGE}")
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, users


def test_standin_redis_matches_the_official_uid_and_data_dir() -> None:
    """Same uid as redis:7.4-alpine (999, which deploy/base/redis.yaml runs as) and /data for the
    AOF, so the compose stack behaves the same on either image."""
    final = stages(STANDINS["redis"])[0]
    assert ("USER", "999:999") in final and ("WORKDIR", "/data") in final
    sts = [
        d for d in yaml.safe_load_all((DEPLOY / "base" / "redis.yaml").read_text())
        if d["kind"] == "StatefulSet"
    ][0]  # fmt: skip
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 999


def test_standin_redis_entrypoint_turns_protected_mode_off(tmp_path) -> None:
    """The compose command is `redis-server ARGS`; the entry point adds `--protected-mode no`
    (the official image's default) and passes anything else through unchanged."""
    fake = tmp_path / "redis-server"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    script = str(DOCKER / "redis" / "entrypoint.sh")
    out = subprocess.run(
        ["sh", script, "redis-server", "--appendonly", "yes"], capture_output=True, text=True,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.split() == [
        "--protected-mode", "no", "--appendonly", "yes"
    ], out  # fmt: skip
    out = subprocess.run(["sh", script, "echo", "hi"], capture_output=True, text=True, env=env)
    assert out.stdout == "hi\n"


def test_ci_runs_the_container_check_after_the_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/container_check.sh" in ci
    assert ci.index("pytest") < ci.index("scripts/container_check.sh")
