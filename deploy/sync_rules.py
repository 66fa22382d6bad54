"""Write deploy/base/prometheusrule.yaml from docker/prometheus/alerts.yml.

The compose stack and the Prometheus Operator load the same rules; alerts.yml is the source (it
has the promtool unit tests) and this copies its groups into a PrometheusRule.
tests/deploy checks that the two agree.

    python deploy/sync_rules.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "docker" / "prometheus" / "alerts.yml"
TARGET = ROOT / "deploy" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from docker/prometheus/alerts.yml by `python deploy/sync_rules.py`; edit that file
# (and its promtool tests, alerts.test.yml), then rerun. The Prometheus Operator loads these
# rules; like the ServiceMonitor, many installs select PrometheusRules by a release label.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL spread over lines) as literal blocks, as a person writes them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "letterrec",
            "labels": {
                "app.kubernetes.io/name": "letterrec",
                "app.kubernetes.io/component": "server",
            },
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python deploy/sync_rules.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
