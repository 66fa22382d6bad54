"""Prometheus configuration, alert rules (promtool, with its rule unit tests) and the Grafana
dashboard's PromQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import (
    DEPLOY,
    DOCKER,
    METRICS,
    PROMETHEUS_DIR,
    assert_ok,
    run,
    sync_rules,
    tool,
)

ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "letterrec.json"
REQUIRED_ALERTS = {
    "LetterrecRecommendLatencyHigh",  # p99 over the 100 ms objective
    "LetterrecErrorRatioHigh",  # 5xx ratio
    "LetterrecRedisUnreachable",  # Redis errors
    "LetterrecNoReadyReplicas",  # letterrec_ready
}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_config() -> None:
    # Also loads and checks the rule files the config names.
    assert_ok(run([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")]))


def test_promtool_check_rules() -> None:
    assert_ok(run([tool("promtool"), "check", "rules", str(ALERTS)]))


def test_promtool_rule_unit_tests() -> None:
    out = run([tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR)
    assert_ok(out)
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The rule tests are not vacuous: a wrong expected annotation fails them."""
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text())
    broken = (PROMETHEUS_DIR / "alerts.test.yml").read_text().replace("248.5ms", "1s")
    assert broken != (PROMETHEUS_DIR / "alerts.test.yml").read_text()
    (tmp_path / "t.yml").write_text(broken)
    out = run([tool("promtool"), "test", "rules", "t.yml"], cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr


def test_required_alerts_have_for_severity_and_annotations() -> None:
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: needs a `for:` duration"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), name
    assert "0.1" in alerts["LetterrecRecommendLatencyHigh"]["expr"], "the 100 ms objective"
    assert "letterrec_redis_errors_total" in alerts["LetterrecRedisUnreachable"]["expr"]
    assert "letterrec_ready" in alerts["LetterrecNoReadyReplicas"]["expr"]


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    tested = {
        t["alertname"]
        for case in tests
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")  # a case where it fires, not only where it stays quiet
    }
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts <= tested, f"alerts without a firing test: {sorted(alerts - tested)}"


def test_prometheusrule_matches_alerts_yml() -> None:
    target = DEPLOY / "base" / "prometheusrule.yaml"
    assert target.read_text() == sync_rules.render(), "run: python deploy/sync_rules.py"
    groups = yaml.safe_load(target.read_text())["spec"]["groups"]
    assert groups == yaml.safe_load(ALERTS.read_text())["groups"]


def test_promtool_checks_the_prometheusrule_groups(tmp_path: Path) -> None:
    groups = yaml.safe_load((DEPLOY / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    f = tmp_path / "operator-rules.yml"
    f.write_text(yaml.safe_dump({"groups": groups}))
    assert_ok(run([tool("promtool"), "check", "rules", str(f)]))


# ---- Grafana -----------------------------------------------------------------------------------


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"] == "letterrec"


@pytest.mark.parametrize(
    "title_words",
    [
        ("request rate",),
        ("p50", "p95", "p99"),
        ("batch size",),
        ("queue wait",),
        ("error",),
        ("catalogue",),
        ("redis errors",),
        ("in-flight",),
        ("ready",),
    ],
)
def test_dashboard_has_the_panels_operators_expect(title_words: tuple[str, ...]) -> None:
    titles = [t.lower() for t, _ in _dashboard_exprs()]
    assert any(all(w in t for w in title_words) for t in titles), (title_words, titles)


def test_dashboard_shows_every_metric() -> None:
    exprs = " ".join(e for _, e in _dashboard_exprs())
    missing = [m for m in METRICS if m not in exprs]
    assert not missing, f"metrics on no panel: {missing}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses each panel query, Grafana's variables replaced by what they expand to."""
    subst = {"$__rate_interval": "1m", "$instance": ".*", "$route": "/recommend"}
    rules = []
    for i, (title, expr) in enumerate(_dashboard_exprs()):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    f = tmp_path / "dashboard.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(run([tool("promtool"), "check", "rules", str(f)]))


def test_grafana_provisioning_points_at_the_compose_prometheus() -> None:
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/letterrec.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
