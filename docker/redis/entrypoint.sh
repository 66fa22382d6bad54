#!/bin/sh
# Entry point of docker/Dockerfile.redis: `redis-server ARGS` runs with protected mode off, as in
# the official image (built with it off; Redis is reachable only on the stack's network).
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  exec redis-server --protected-mode no "$@"
fi
exec "$@"
