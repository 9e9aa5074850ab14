#!/usr/bin/env bash
# Redis for imagefn on 127.0.0.1, with an ACL: one user per platform role, each with its
# own random password, and the `default` user off, so that no connection without
# credentials gets in. Bounded memory (maxmemory, policy noeviction: docs/security.md,
# "Growth bounds").
#
# Users (shared/roles.py holds the same names and rules; a unit test checks they agree):
#   imagefn-gateway, imagefn-worker, imagefn-scheduler, imagefn-coldstart  one per server
#                command (`imagefn gateway`, ...); imagefn-platform for `imagefn up`, which
#                runs them all in one process. Rules: every command but @dangerous and
#                FUNCTION, keys ~PREFIX:* only, no pub/sub channel.
#   imagefn-admin  operators (redis-cli, benchmarks, backups): everything.
# Their URLs go into the credentials file as IMAGEFN_REDIS_URL_<ROLE>; `imagefn <command>`
# picks its role's. For redis-cli:
#   REDISCLI_AUTH=$(sed -n 's/^IMAGEFN_REDIS_ADMIN_PASSWORD=//p' /var/lib/imagefn/credentials.env) \
#     redis-cli --user imagefn-admin PING
#
# Idempotent, converging: a Redis that is not running is started with the ACL file; one
# already running with it reloads it (ACL LOAD); one started otherwise (an earlier
# set-up's, without ACL) gets the same users applied in place (ACL SETUSER) without a
# restart, and the ACL file from its next start on. maxmemory and its policy are set
# in place too (CONFIG SET). Runs as root; called by setup.sh.
#
# Settings (environment): IMAGEFN_REDIS_PORT (6379), IMAGEFN_REDIS_DIR (its data,
# /var/lib/imagefn-redis), IMAGEFN_STATE_DIR (the credentials file and the ACL file,
# /var/lib/imagefn), IMAGEFN_PREFIX (the key prefix the roles may touch, imagefn),
# IMAGEFN_REDIS_MAXMEMORY_MB (default: a quarter of this machine's memory).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT=${IMAGEFN_REDIS_PORT:-6379}
DATA_DIR=${IMAGEFN_REDIS_DIR:-/var/lib/imagefn-redis}
STATE_DIR=${IMAGEFN_STATE_DIR:-/var/lib/imagefn}
ACL_FILE=$STATE_DIR/redis-users.acl
PREFIX=${IMAGEFN_PREFIX:-imagefn}
ROLES=(gateway worker scheduler coldstart platform)
ROLE_RULES="resetchannels +@all -@dangerous -function"
ADMIN_RULES="~* &* +@all"
POLICY=noeviction
CREDENTIALS=$STATE_DIR/credentials.env
# shellcheck source=deploy/credentials.sh
. "$ROOT/deploy/credentials.sh"

step() { echo "==> $*"; }
die() { echo "redis: $*" >&2; exit 1; }

command -v redis-server >/dev/null || die "redis-server is not installed (deploy/setup.sh installs it)"
case "$PREFIX" in
  *[!A-Za-z0-9._-]*) die "IMAGEFN_PREFIX=$PREFIX: only A-Za-z0-9._- (it becomes a key pattern)" ;;
esac
if [ -n "${IMAGEFN_REDIS_MAXMEMORY_MB:-}" ]; then
  MAXMEMORY_MB=$IMAGEFN_REDIS_MAXMEMORY_MB
else
  MAXMEMORY_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / 4))
fi
[[ "$MAXMEMORY_MB" =~ ^[1-9][0-9]*$ ]] || die "IMAGEFN_REDIS_MAXMEMORY_MB=$MAXMEMORY_MB: a number of MiB"
MAXMEMORY=$((MAXMEMORY_MB * 1024 * 1024))

mkdir -p "$STATE_DIR" "$DATA_DIR"
chmod 0700 "$STATE_DIR"

# --- credentials: one password per role, generated once --------------------------------
role_var() { echo "IMAGEFN_REDIS_URL_$(echo "$1" | tr '[:lower:]' '[:upper:]')"; }
ensure_credential IMAGEFN_REDIS_ADMIN_PASSWORD "$(new_secret)"
ADMIN_PASSWORD="$(credential IMAGEFN_REDIS_ADMIN_PASSWORD)"
ensure_credential "$(role_var admin)" "redis://imagefn-admin:$ADMIN_PASSWORD@127.0.0.1:$PORT/0"
for role in "${ROLES[@]}"; do
  ensure_credential "$(role_var "$role")" "redis://imagefn-$role:$(new_secret)@127.0.0.1:$PORT/0"
done
# password_of ROLE: the password in the role's URL (redis://USER:PASSWORD@HOST...).
password_of() { credential "$(role_var "$1")" | sed -n 's|^redis://[^:/@]*:\([^@]*\)@.*|\1|p'; }
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

# --- the ACL file: passwords only as SHA-256 -----------------------------------------------
acl="user default off resetpass resetkeys resetchannels -@all"$'\n'
acl+="user imagefn-admin on #$(sha "$ADMIN_PASSWORD") $ADMIN_RULES"$'\n'
for role in "${ROLES[@]}"; do
  pw="$(password_of "$role")"
  [ -n "$pw" ] || die "$(role_var "$role") in $CREDENTIALS is not redis://USER:PASSWORD@..."
  acl+="user imagefn-$role on #$(sha "$pw") ~$PREFIX:* $ROLE_RULES"$'\n'
done
if [ ! -f "$ACL_FILE" ] || [ "$(cat "$ACL_FILE")"$'\n' != "$acl" ]; then
  (umask 077; printf '%s' "$acl" >"$ACL_FILE.tmp")
  mv -f "$ACL_FILE.tmp" "$ACL_FILE"
fi
chmod 0600 "$ACL_FILE"

# --- the server ------------------------------------------------------------------------------
as_admin() { REDISCLI_AUTH="$ADMIN_PASSWORD" redis-cli --no-auth-warning --user imagefn-admin -p "$PORT" "$@"; }
anonymous() { redis-cli -p "$PORT" "$@"; }
answers() { [ "$("$@" ping 2>/dev/null)" = PONG ]; }
# redis-cli goes on without credentials when its AUTH fails: ask who we are.
admin_in() { [ "$(as_admin acl whoami 2>/dev/null)" = imagefn-admin ]; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
# config_of CLIENT NAME: the server's value of a configuration parameter.
config_of() { local c=$1; shift; "$c" config get "$1" 2>/dev/null | sed -n 2p; }

if admin_in; then
  client=as_admin
elif answers anonymous; then
  client=anonymous  # no ACL yet: an earlier set-up's Redis, or a fresh one of somebody else's
elif listening; then
  die "something on 127.0.0.1:$PORT refuses imagefn-admin (password in $CREDENTIALS); stop it"
else
  step "starting Redis on 127.0.0.1:$PORT (ACL: $ACL_FILE, maxmemory ${MAXMEMORY_MB} MiB)"
  # Append-only file: deployed functions, versions and aliases survive a restart.
  redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --save '' \
    --appendonly yes --appendfsync everysec --dir "$DATA_DIR" --aclfile "$ACL_FILE" \
    --maxmemory "$MAXMEMORY" --maxmemory-policy "$POLICY" \
    --logfile "$DATA_DIR/redis.log" >/dev/null
  for _ in $(seq 1 40); do admin_in && break; sleep 0.5; done
  admin_in || { tail -n 20 "$DATA_DIR/redis.log" >&2 2>/dev/null; die "Redis did not answer on port $PORT"; }
  client=as_admin
fi

if [ "$(config_of "$client" aclfile)" = "$ACL_FILE" ]; then
  # Started with our file: load it as it is now (all or nothing).
  out="$("$client" acl load 2>&1)"
  [ "$out" = OK ] || die "ACL LOAD refused $ACL_FILE: $out"
else
  step "Redis on port $PORT runs without $ACL_FILE: applying its users in place"
  # The admin first (so that it can finish the job), `default` last. The rules are
  # split into words but not globbed (~PREFIX:*).
  set -f
  while read -r _ name rules; do
    [ -n "$name" ] && [ "$name" != default ] || continue
    # shellcheck disable=SC2086  # the rules are words
    out="$("$client" acl setuser "$name" reset $rules 2>&1)"
    [ "$out" = OK ] || die "ACL SETUSER $name: $out"
    [ "$name" = imagefn-admin ] && client=as_admin
  done <<<"$acl"
  # shellcheck disable=SC2046
  out="$(as_admin acl setuser default reset $(sed -n 's/^user default //p' <<<"$acl") 2>&1)"
  [ "$out" = OK ] || die "ACL SETUSER default: $out"
  set +f
fi
admin_in || die "imagefn-admin cannot log in to Redis on port $PORT"
if [ "$(config_of as_admin maxmemory)" != "$MAXMEMORY" ] \
  || [ "$(config_of as_admin maxmemory-policy)" != "$POLICY" ]; then
  step "Redis maxmemory ${MAXMEMORY_MB} MiB, policy $POLICY"
  as_admin config set maxmemory "$MAXMEMORY" maxmemory-policy "$POLICY" >/dev/null
fi
# Whatever happened above, nothing gets in without credentials.
if answers anonymous; then
  die "Redis on port $PORT still answers without credentials"
fi
