#!/usr/bin/env bash
# Prepares a Debian 12 machine (fresh, or already set up) to run and test imagefn:
# system packages, the Docker engine, Redis, the Python venv, every local image, and the
# private registry.
# Idempotent: a second run finds everything in place and takes a few seconds.
# Runs as root; no systemd is assumed (daemons are started in the background).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DOCKERD_LOG=/var/log/imagefn-dockerd.log

step() { echo "==> $*"; }
die() { echo "setup: $*" >&2; exit 1; }

# wait_for SECONDS CMD...: retry CMD every half second until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# --- system packages ---------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for pkg in docker.io redis-server docker-registry openssl debootstrap busybox-static curl python3 \
  python3-venv; do
  installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  [ "$(id -u)" -eq 0 ] || die "must run as root to install: ${missing[*]}"
  step "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# --- Docker engine -----------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  step "starting dockerd (log: $DOCKERD_LOG)"
  # A pid file left by a dockerd that died would stop the new one from starting.
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  wait_for 60 docker info || { tail -n 20 "$DOCKERD_LOG" >&2; die "dockerd did not answer within 60 s"; }
fi

# --- function networks and their firewall rules -------------------------------------
# Instances run only there, fenced off from each other, the host and the platform's
# services (workers refuse to start without them). `deploy/network.sh remove` undoes it.
bash deploy/network.sh

# --- Redis (ACL user per role, default user off, bounded memory) ----------------------
bash deploy/redis.sh

# --- Python venv -------------------------------------------------------------------
STAMP=.venv/.imagefn-installed
if ! .venv/bin/python -c '' 2>/dev/null; then
  step "creating .venv"
  rm -rf .venv
  python3 -m venv .venv
fi
if [ ! -x .venv/bin/imagefn ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  step "installing imagefn and its dev tools into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev,broker,objectstore]'
  touch "$STAMP"
fi

# --- images ------------------------------------------------------------------------
step "building images"
bash deploy/build-base-image.sh
build() {  # build NAME DIR; the output is shown only when the build fails
  local out
  out="$(docker build -q -t "$1" "$2" 2>&1)" || { echo "$out" >&2; die "building $1 failed"; }
  echo "    $1"
}
for dir in examples/*/ tests/images/*/; do
  [ -f "$dir/Dockerfile" ] || continue
  case "$dir" in
    examples/*) build "imagefn-examples/$(basename "$dir"):latest" "$dir" ;;
    tests/images/*) build "imagefn-test/$(basename "$dir"):latest" "$dir" ;;
  esac
done
# --- private registry (token auth; keys and credentials under /var/lib/imagefn) -----
bash deploy/registry.sh
# --- Kafka-protocol broker (invocation queue backend "kafka", container logs) -------
bash deploy/kafka.sh
# --- object store (SeaweedFS; its filer's change feed goes to the broker: after it) --
bash deploy/seaweedfs.sh
step "setup done"
