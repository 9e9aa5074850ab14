# Sourced by the deploy scripts: the platform's credentials file, one KEY=VALUE a line,
# 0600, never in the repository. Every secret is generated once, when its variable is
# missing, and kept from then on (a re-run changes nothing; a new script version adds
# only its new variables).
# CREDENTIALS may be set before sourcing (tests use a scratch directory).

CREDENTIALS=${CREDENTIALS:-${IMAGEFN_STATE_DIR:-/var/lib/imagefn}/credentials.env}

# credential NAME: the value of NAME in the credentials file (empty if it has none).
credential() {
  [ -f "$CREDENTIALS" ] || return 0
  sed -n "s/^$1=//p" "$CREDENTIALS" | tail -n 1
}

# ensure_credential NAME VALUE: add NAME=VALUE unless NAME is there already.
ensure_credential() {
  local tmp
  if [ -f "$CREDENTIALS" ] && grep -q "^$1=" "$CREDENTIALS"; then
    return 0
  fi
  (
    umask 077
    mkdir -p "$(dirname "$CREDENTIALS")"
    tmp="$(mktemp "$(dirname "$CREDENTIALS")/.credentials.XXXXXX")"
    if [ -s "$CREDENTIALS" ]; then
      cat "$CREDENTIALS" >"$tmp"
    else
      echo "# imagefn credentials, written by the deploy scripts. Keep secret." >"$tmp"
    fi
    printf '%s=%s\n' "$1" "$2" >>"$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$CREDENTIALS"
  )
}

# set_credential NAME VALUE: NAME=VALUE, replacing any earlier value (for values derived
# from the machine's state, like an address, rather than generated once).
set_credential() {
  [ "$(credential "$1")" = "$2" ] && grep -q "^$1=" "$CREDENTIALS" 2>/dev/null && return 0
  (
    umask 077
    mkdir -p "$(dirname "$CREDENTIALS")"
    local tmp
    tmp="$(mktemp "$(dirname "$CREDENTIALS")/.credentials.XXXXXX")"
    if [ -s "$CREDENTIALS" ]; then
      grep -v "^$1=" "$CREDENTIALS" >"$tmp" || true
    else
      echo "# imagefn credentials, written by the deploy scripts. Keep secret." >"$tmp"
    fi
    printf '%s=%s\n' "$1" "$2" >>"$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$CREDENTIALS"
  )
}

new_secret() { openssl rand -hex 24; }
