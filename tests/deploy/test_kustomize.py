"""The Kubernetes manifests: rendered with kustomize (kubectl's), validated against the
Kubernetes OpenAPI schemas offline (kubernetes-validate, strict) and the Prometheus Operator CRD
subset, then checked for how the objects fit together."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.helpers import DEPLOY, check_manifests

Objs = list[dict[str, Any]]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objs]:
    try:
        objs = check_manifests.render(check_manifests.OVERLAYS[request.param])
    except check_manifests.ToolMissing as err:
        pytest.fail(str(err))
    return request.param, objs


def one(objs: Objs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def server(objs: Objs) -> dict[str, Any]:
    (c,) = [
        c for c in one(objs, "Deployment", "letterrec")["spec"]["template"]["spec"]["containers"]
    ]
    return c


def config_map(objs: Objs) -> dict[str, str]:
    return one(objs, "ConfigMap")["data"]


def test_objects_are_valid(overlay: tuple[str, Objs]) -> None:
    _, objs = overlay
    assert check_manifests.validate(objs) == []
    kinds = {o["kind"] for o in objs}
    assert {
        "Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment",
        "StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
        "PrometheusRule",
    } <= kinds  # fmt: skip
    assert "Secret" not in kinds, "API keys never live in the manifests: the operator creates them"
    assert one(objs, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_validation_catches_mistakes(overlay: tuple[str, Objs]) -> None:
    """Schema validation is real for built-in kinds and for the CRD subset alike."""
    _, objs = overlay
    bad = copy.deepcopy(objs)
    server(bad)["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    one(bad, "ServiceMonitor")["spec"]["endpoints"][0]["interval"] = "15 seconds"
    one(bad, "PrometheusRule")["spec"]["groups"][0]["rules"][0].pop("expr")
    errors = check_manifests.validate(bad)
    assert any("Deployment/letterrec" in e and "httpGett" in e for e in errors), errors
    assert any("ServiceMonitor/letterrec" in e and "interval" in e for e in errors), errors
    assert any("PrometheusRule/letterrec" in e and "expr" in e for e in errors), errors


def test_probes_resources_and_security(overlay: tuple[str, Objs]) -> None:
    _, objs = overlay
    pod = one(objs, "Deployment", "letterrec")["spec"]["template"]["spec"]
    c = server(objs)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "slow bundle loads"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["args"] == ["serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), container["name"]
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys(), container["name"]
    # Graceful shutdown fits inside the grace period.
    shutdown = float(config_map(objs)["LETTERREC_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown
    assert "replicas" not in one(objs, "Deployment", "letterrec")["spec"], "the HPA owns replicas"


def test_bundle_reaches_the_server_through_an_init_container(overlay: tuple[str, Objs]) -> None:
    _, objs = overlay
    pod = one(objs, "Deployment", "letterrec")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"].startswith("registry.example.com/letterrec-bundle:")
    (init_mount,) = init["volumeMounts"]
    (srv_mount,) = [m for m in server(objs)["volumeMounts"] if m["mountPath"] == "/bundle"]
    assert init_mount["name"] == srv_mount["name"] and srv_mount["readOnly"] is True
    assert init_mount["mountPath"] in " ".join(init["args"]) and "manifest.json" in init["args"][0]
    (vol,) = [v for v in pod["volumes"] if v["name"] == srv_mount["name"]]
    assert "emptyDir" in vol
    assert config_map(objs)["LETTERREC_BUNDLE"] == "/bundle"


def test_config_and_secret_are_wired_and_known_to_the_service(overlay: tuple[str, Objs]) -> None:
    from service.settings import Settings

    _, objs = overlay
    refs = server(objs)["envFrom"]
    cm = one(objs, "ConfigMap")
    # The generated name carries a content hash; kustomize rewrote the reference to match.
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in refs
    assert not [r for r in refs if "secretRef" in r], "keys come as files, not environment"
    fields = {f"LETTERREC_{n.upper()}" for n in Settings.model_fields}
    keys = set(cm["data"])
    assert keys <= fields, f"not settings of service/settings.py: {sorted(keys - fields)}"
    assert "LETTERREC_API_KEYS" not in keys, "API keys belong in the Secret, not the ConfigMap"
    # The Secret the operator creates (docs/deployment.md#secrets), by its plain name, not
    # optional (without keys the pod waits rather than starting with its write routes closed),
    # mounted read-only where LETTERREC_API_KEYS_FILE points (re-read on rotation).
    pod = one(objs, "Deployment", "letterrec")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if "secret" in v]
    assert vol["secret"]["secretName"] == "letterrec-api-keys"
    assert not vol["secret"].get("optional", False)
    assert vol["secret"]["defaultMode"] & 0o007 == 0, "not world-readable"
    (mount,) = [m for m in server(objs)["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] is True
    assert cm["data"]["LETTERREC_API_KEYS_FILE"] == mount["mountPath"]
    # The server's group can read the files (fsGroup owns secret volumes).
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_service_pdb_hpa_and_servicemonitor_select_the_server(overlay: tuple[str, Objs]) -> None:
    _, objs = overlay
    pod_labels = one(objs, "Deployment", "letterrec")["spec"]["template"]["metadata"]["labels"]
    svc = one(objs, "Service", "letterrec")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "letterrec",
    }
    assert (
        hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The alert rules select `job="letterrec"`: the ServiceMonitor's job label must say so.
    assert svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "letterrec"
    # Redis's pods are not picked up by the server's selectors.
    redis_labels = one(objs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= redis_labels.items()


def test_redis_statefulset_with_a_claim_and_headless_service(overlay: tuple[str, Objs]) -> None:
    _, objs = overlay
    sts = one(objs, "StatefulSet", "letterrec-redis")
    headless = one(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (redis,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    url = config_map(objs)["LETTERREC_REDIS_URL"]
    assert url.startswith(f"redis://{headless['metadata']['name']}:6379")


def test_overlay_engine_device_and_gpu_placement(overlay: tuple[str, Objs]) -> None:
    name, objs = overlay
    cm = config_map(objs)
    c = server(objs)
    pod = one(objs, "Deployment", "letterrec")["spec"]["template"]["spec"]
    if name == "cpu":
        assert (cm["LETTERREC_ENGINE"], cm["LETTERREC_DEVICE"]) == ("torch", "cpu")
        assert c["image"].endswith("-cpu")
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert "nodeSelector" not in pod
    else:
        assert (cm["LETTERREC_ENGINE"], cm["LETTERREC_DEVICE"]) == ("vllm", "cuda")
        assert c["image"].endswith("-cuda")
        assert (
            c["resources"]["limits"]["nvidia.com/gpu"]
            == c["resources"]["requests"]["nvidia.com/gpu"]
            == "1"
        )
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])


def test_all_namespaced_objects_land_in_the_namespace(overlay: tuple[str, Objs]) -> None:
    _, objs = overlay
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "letterrec", check_manifests.describe(o)


def test_base_renders_on_its_own() -> None:
    objs = check_manifests.render(DEPLOY / "base")
    assert check_manifests.validate(objs) == []


def workload_pods(objs: Objs) -> list[tuple[str, dict[str, Any]]]:
    return [
        (check_manifests.describe(o), o["spec"]["template"]["spec"])
        for o in objs
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
    ]


def test_every_container_is_hardened_and_bounded(overlay: tuple[str, Objs]) -> None:
    """Every container of every workload, init containers included: non-root (the pod or the
    container says runAsNonRoot with a non-zero uid), a read-only root filesystem, no privilege
    escalation, no capabilities, and CPU and memory requests and limits."""
    _, objs = overlay
    pods = workload_pods(objs)
    assert {name for name, _ in pods} >= {"Deployment/letterrec", "StatefulSet/letterrec-redis"}
    for name, pod in pods:
        pod_sc = pod.get("securityContext", {})
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name} container {c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
            assert sc.get("runAsUser", 0) != 0, f"{where}: runs as uid 0"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            for kind in ("requests", "limits"):
                got = c.get("resources", {}).get(kind, {})
                assert {"cpu", "memory"} <= got.keys(), f"{where}: {kind} lack cpu/memory: {got}"


def test_server_probes_follow_the_service_semantics(overlay: tuple[str, Objs]) -> None:
    """Liveness asks only whether the process is alive (/healthz: restarting a replica whose
    dependency is down would not help), readiness whether it can answer /recommend now
    (/readyz), and start-up gives the bundle time to load before liveness counts."""
    _, objs = overlay
    pods = dict(workload_pods(objs))
    server_containers = [c for c in pods["Deployment/letterrec"]["containers"]]
    for c in server_containers:
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", c["name"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", c["name"]
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz", c["name"]
        http_port = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] in http_port, f"{c['name']}: {probe} port"
        # Liveness must not be stricter than readiness, or a slow replica is killed before it
        # is merely taken out of the Service.
        live, ready = c["livenessProbe"], c["readinessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= (
            ready["periodSeconds"] * ready["failureThreshold"]
        ), c["name"]
    for name, pod in pods.items():
        for c in pod["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, f"{name} {c['name']}: probes"
