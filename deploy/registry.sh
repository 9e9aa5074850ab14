#!/usr/bin/env bash
# The private image registry: Debian's docker-registry (distribution 2.8) on 127.0.0.1
# with token authentication only (never anonymous), the gateway being the token service.
# Generates, once, the token signing key + certificate and the platform's credentials;
# none of them ever enter the repository. Idempotent; runs as root; called by setup.sh.
set -euo pipefail

BASE=/var/lib/imagefn
AUTH_DIR=$BASE/registry-auth
TOKEN_KEY=$AUTH_DIR/token.key
TOKEN_CERT=$AUTH_DIR/token.crt
CREDENTIALS=$BASE/credentials.env
REGISTRY_DIR=$BASE/registry
CONFIG=$REGISTRY_DIR/config.yml
DATA_DIR=$REGISTRY_DIR/data
PIDFILE=$REGISTRY_DIR/registry.pid
LOG=/var/log/imagefn-registry.log

ADDR=127.0.0.1:5000
REALM=http://127.0.0.1:8080/v1/registry/token
SERVICE=imagefn-registry
ISSUER=imagefn
# shellcheck source=deploy/credentials.sh
. "$(dirname "${BASH_SOURCE[0]}")/credentials.sh"

step() { echo "==> $*"; }
die() { echo "registry: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
for tool in docker-registry openssl curl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (deploy/setup.sh installs it)"
done

umask 077
mkdir -p "$BASE" "$AUTH_DIR" "$DATA_DIR"
chmod 0700 "$AUTH_DIR"

# --- token signing key and its self-signed certificate ---------------------------------
if [ ! -s "$TOKEN_KEY" ] || [ ! -s "$TOKEN_CERT" ]; then
  step "generating the registry token signing key ($AUTH_DIR)"
  tmp="$(mktemp -d "$AUTH_DIR/.new.XXXXXX")"
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -subj "/CN=imagefn registry token signer" \
    -keyout "$tmp/token.key" -out "$tmp/token.crt" 2>/dev/null \
    || { rm -rf "$tmp"; die "openssl could not generate the token key"; }
  chmod 0600 "$tmp/token.key"
  chmod 0644 "$tmp/token.crt"
  # Key and certificate are replaced together, so they always belong to each other.
  mv -f "$tmp/token.key" "$TOKEN_KEY"
  mv -f "$tmp/token.crt" "$TOKEN_CERT"
  rmdir "$tmp"
fi

# --- credentials of the deployer and the workers ----------------------------------------
# Each generated once (deploy/credentials.sh); a file from an earlier set-up keeps its
# values and only gains the variables it lacks.
ensure_credential IMAGEFN_DEPLOY_PASSWORD "$(new_secret)"
ensure_credential IMAGEFN_WORKER_SECRET "$(new_secret)"
ensure_credential IMAGEFN_TOKEN_KEY "$TOKEN_KEY"
ensure_credential IMAGEFN_TOKEN_CERT "$TOKEN_CERT"
# The bootstrap admin API key (ifn_<id>_<secret>): the CLI on this machine uses it; create
# narrower keys for everyone else with `imagefn keys create`.
ensure_credential IMAGEFN_ADMIN_KEY "ifn_$(openssl rand -hex 6)_$(openssl rand -hex 24)"
chmod 0600 "$CREDENTIALS"

# --- registry configuration ------------------------------------------------------------
new_config="$(cat <<EOF
# Written by deploy/registry.sh; edits are overwritten.
version: 0.1
log:
  level: info
  fields:
    service: imagefn-registry
storage:
  filesystem:
    rootdirectory: $DATA_DIR
  delete:
    enabled: true
http:
  addr: $ADDR
auth:
  token:
    realm: $REALM
    service: $SERVICE
    issuer: $ISSUER
    rootcertbundle: $TOKEN_CERT
EOF
)"
config_changed=0
if [ ! -f "$CONFIG" ] || [ "$(cat "$CONFIG")" != "$new_config" ]; then
  printf '%s\n' "$new_config" >"$CONFIG.tmp"
  mv -f "$CONFIG.tmp" "$CONFIG"
  config_changed=1
fi

# --- the registry process ----------------------------------------------------------------
# Up means: /v2/ refuses us with a Bearer challenge naming our realm. Anything else on the
# address is not our registry.
challenge() {
  curl -s -o /dev/null -m 2 -D - "http://$ADDR/v2/" 2>/dev/null \
    | tr -d '\r' | grep -i '^www-authenticate:' || true
}
ours_up() { challenge | grep -qF "Bearer realm=\"$REALM\""; }
our_pid() {  # the pid in PIDFILE, if it still is a docker-registry serving our config
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "serve $CONFIG" \
    && echo "$pid"
}

if ((config_changed)) && pid="$(our_pid)"; then
  step "registry configuration changed; restarting the registry (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
fi

if ! ours_up; then
  if [ -n "$(challenge)" ] || curl -s -o /dev/null -m 2 "http://$ADDR/v2/"; then
    # The Debian package's own service (anonymous-less htpasswd, all interfaces) may have
    # been started by its installation; it holds the port we need.
    if [ -x /etc/init.d/docker-registry ] && [ -f /var/run/docker-registry.pid ]; then
      step "stopping the docker-registry package's default service"
      /etc/init.d/docker-registry stop >/dev/null || true
      sleep 1
    fi
    curl -s -o /dev/null -m 2 "http://$ADDR/v2/" \
      && die "something else answers on $ADDR (not a registry with realm $REALM); stop it"
  fi
  step "starting the registry on $ADDR (log: $LOG)"
  setsid nohup docker-registry serve "$CONFIG" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  deadline=$((SECONDS + 30))
  until ours_up; do
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null || ((SECONDS >= deadline)); then
      tail -n 20 "$LOG" >&2
      die "the registry did not answer on $ADDR"
    fi
    sleep 0.25
  done
fi
