"""docker/compose.yaml, parsed and normalised by Docker Compose v2 itself (`docker-compose
config`, which checks the file against the Compose specification and needs no engine), then
checked for what the stack promises."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import DOCKER, assert_ok, compose_binary, run

COMPOSE = DOCKER / "compose.yaml"
# Only what Compose needs: the defaults of the file are under test, not this shell's variables.
# The two secrets have no default in the file, so every run has to give them.
BARE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", "/tmp"),
}
SECRETS = {"LETTERREC_API_KEYS": "test-key-1,test-key-2", "GRAFANA_ADMIN_PASSWORD": "test-pw"}
CLEAN_ENV = {**BARE_ENV, **SECRETS}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    out = run([compose_binary(), "-f", str(COMPOSE), "config", "--format", "json"], env=CLEAN_ENV)
    assert_ok(out)
    return json.loads(out.stdout)


def _settings_fields() -> set[str]:
    from service.settings import Settings

    return {f"LETTERREC_{name.upper()}" for name in Settings.model_fields}


def test_compose_config_quiet_passes() -> None:
    assert_ok(run([compose_binary(), "-f", str(COMPOSE), "config", "-q"], env=CLEAN_ENV))


def test_compose_rejects_an_unknown_key(tmp_path: Path) -> None:
    """The schema check is real: a misspelt key fails."""
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["redis"]["comand"] = ["redis-server"]
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = run([compose_binary(), "-f", str(bad), "config", "-q"], env=CLEAN_ENV)
    assert out.returncode != 0 and "comand" in out.stderr, out.stderr


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(secret: str) -> None:
    """No default API key or password: without one, Compose stops and names the variable."""
    env = {k: v for k, v in CLEAN_ENV.items() if k != secret}
    out = run([compose_binary(), "-f", str(COMPOSE), "config", "-q"], env=env)
    assert out.returncode != 0 and secret in out.stderr, out.stderr


def test_no_default_secret_in_the_deployment_files() -> None:
    for path in [COMPOSE, *(DOCKER.parent / "deploy").rglob("*.yaml")]:
        text = path.read_text()
        for marker in ("dev-insecure", "API_KEYS:-", "PASSWORD:-"):
            assert marker not in text, f"{path}: a default secret ({marker}...)"


def test_stack_has_the_four_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"letterrec", "redis", "prometheus", "grafana"}


def test_service_runs_the_cpu_image_with_env_configuration(config: dict[str, Any]) -> None:
    svc = config["services"]["letterrec"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert Path(svc["build"]["context"]) == DOCKER.parent
    env = svc["environment"]
    assert env["LETTERREC_BUNDLE"] == "/bundle"
    assert env["LETTERREC_REDIS_URL"].startswith("redis://redis:6379")
    assert env["LETTERREC_API_KEYS"] == SECRETS["LETTERREC_API_KEYS"], "keys come from outside"
    unknown = set(env) - _settings_fields()
    assert not unknown, f"not settings of service/settings.py: {sorted(unknown)}"
    (bundle,) = [v for v in svc["volumes"] if v["target"] == "/bundle"]
    assert bundle["read_only"] is True
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert "/healthz" in " ".join(svc["healthcheck"]["test"])
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # Two replicas, each on its own host port from the range.
    assert svc["deploy"]["replicas"] == 2
    (port,) = svc["ports"]
    assert port["target"] == 8000 and port["published"] == "8000-8001"
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-pw"


def test_redis_and_prometheus_images_can_be_replaced(config: dict[str, Any]) -> None:
    """The official images by default; REDIS_IMAGE / PROMETHEUS_IMAGE point at the stand-ins
    (docker/Dockerfile.redis, docker/Dockerfile.prometheus) where no registry is reachable."""
    assert config["services"]["redis"]["image"] == "redis:7.4-alpine"
    assert config["services"]["prometheus"]["image"] == "prom/prometheus:v2.55.1"
    env = {**CLEAN_ENV, "REDIS_IMAGE": "r:1", "PROMETHEUS_IMAGE": "p:1"}
    out = run([compose_binary(), "-f", str(COMPOSE), "config", "--format", "json"], env=env)
    assert_ok(out)
    services = json.loads(out.stdout)["services"]
    assert (services["redis"]["image"], services["prometheus"]["image"]) == ("r:1", "p:1")


def test_redis_persists_with_aof_on_a_volume(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    (data,) = redis["volumes"]
    assert data["type"] == "volume" and data["target"] == "/data"
    assert data["source"] in config["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_prometheus_and_grafana_mount_files_that_exist(config: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for vol in config["services"][name]["volumes"]:
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} does not exist"
                assert vol.get("read_only"), f"{name}: config mounts are read-only"
    prom = config["services"]["prometheus"]
    targets = {v["target"] for v in prom["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= targets
    grafana = config["services"]["grafana"]
    targets = {v["target"] for v in grafana["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= targets


def test_prometheus_scrapes_the_compose_service() -> None:
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "letterrec"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["letterrec"] and sd["port"] == 8000
    assert prom["rule_files"] == ["alerts.yml"]
