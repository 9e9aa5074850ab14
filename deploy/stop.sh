#!/usr/bin/env bash
# Stops the `imagefn up` started by deploy/demo.sh. imagefn drains in-flight work and
# removes its containers itself; this only signals it and waits. Safe to run again.
# The function networks and their firewall rules stay, like the registry, the broker and
# the object store (other installations on this engine, tests included, use them): `deploy/network.sh
# remove` takes them away once no instance is attached.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PIDFILE=.imagefn/up.pid
GRACE_S=40

# Only signal the pid if it still is `imagefn up` (pids are reused after an exit).
is_imagefn_up() {
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q 'imagefn up'
}

if [ ! -f "$PIDFILE" ]; then
  echo "imagefn is not running (no $PIDFILE)"
  exit 0
fi
pid="$(cat "$PIDFILE")"
if ! is_imagefn_up "$pid"; then
  echo "imagefn is not running (pid $pid has exited)"
  rm -f "$PIDFILE"
  exit 0
fi

# SIGTERM, not SIGINT: a process started in the background by a script ignores SIGINT.
echo "==> stopping imagefn (pid $pid), waiting up to $GRACE_S s for it to drain"
kill -TERM "$pid"
deadline=$((SECONDS + GRACE_S))
while is_imagefn_up "$pid" && ((SECONDS < deadline)); do
  sleep 0.5
done
if is_imagefn_up "$pid"; then
  echo "stop: still running after $GRACE_S s; killing it. Its containers may be left:" >&2
  echo "      see 'docker ps' and .imagefn/up.log" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "killed"
  exit 1
fi
rm -f "$PIDFILE"
echo "stopped"
