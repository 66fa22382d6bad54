"""scripts/validate_deploy.sh, the one-command check CI and people run, keeps working."""

from __future__ import annotations

from tests.deploy.helpers import ROOT, assert_ok, run


def test_validate_deploy_script_passes() -> None:
    # --no-install: the tools are there already (bootstrap); --no-tests: this is the test run.
    out = run(
        ["bash", "scripts/validate_deploy.sh", "--no-install", "--no-tests"], cwd=ROOT, timeout=300
    )
    assert_ok(out)
    assert "validate_deploy: all checks passed" in out.stdout


def test_validate_deploy_script_rejects_unknown_arguments() -> None:
    out = run(["bash", "scripts/validate_deploy.sh", "--frobnicate"], cwd=ROOT)
    assert out.returncode == 2 and "--no-install" in out.stderr
