#!/usr/bin/env bash
# The network function instances run on, and the firewall rules that fence it in.
#
#   deploy/network.sh [install]   create the networks and install the rules (idempotent)
#   deploy/network.sh check       exit 0 only if the networks and every rule are in place
#   deploy/network.sh remove      remove the networks, then the rules (refused while a
#                                 container is still attached to one of the networks)
#
# Two Docker bridge networks, both with inter-container traffic off (enable_icc=false):
#   $NET    (bridge $BR)     functions with `egress: true`: the internet, nothing else
#   $NET_NE (bridge $BR_NE)  functions with `egress: false`: no traffic out at all
# Published ports (127.0.0.1 only) keep working: the engine's proxy (or its NAT when
# dockerd runs with --userland-proxy=false) reaches an instance from the host itself, and
# only the replies come back through the bridge.
#
# Rules (iptables; own chains, so that they are replaced as a whole and removed cleanly):
#   IMAGEFN-INPUT   (first in INPUT): from a function bridge, only replies to connections
#       the host opened are accepted. Everything else an instance sends to any address of
#       this machine (the bridge gateway IP, eth0's, docker0's, ...) is dropped, whatever
#       address the platform's services (Redis, registry, broker, gateway, a TCP Docker
#       API) bind to.
#   IMAGEFN-FORWARD (first in DOCKER-USER): no new connection into a function bridge from
#       anywhere (nor between two instances); nothing out of $BR_NE; out of $BR nothing to
#       other Docker bridges nor to private, shared or link-local ranges (10/8, 172.16/12,
#       192.168/16, 100.64/10, 169.254/16: the LAN, cloud metadata, other machines of the
#       platform) except the host's DNS resolvers on port 53 (the engine's embedded DNS
#       forwards from inside the instance's namespace) and the operator's allow-list.
#   IPv6: everything from or to a function bridge is dropped (the networks are IPv4 only).
#
#   Exception: IMAGEFN_FUNCTION_HOST_PORTS (default 8334): TCP ports of this machine that
#       `egress: true` functions may open, on the address of their own network's bridge:
#       services meant for functions, bound there and nowhere else (deploy/seaweedfs.sh
#       binds the object store's S3 API for functions to it, port 8334). Set it to "" to
#       allow none.
#
# Operator allow-list: IMAGEFN_EGRESS_ALLOW="10.1.2.0/24,192.168.5.10/32" (comma or space
# separated CIDRs that `egress: true` functions may reach even though they are private).
# Read from the environment, else from /var/lib/imagefn/network.env (KEY=VALUE lines), so
# that it survives later runs of deploy/setup.sh. The host itself is never allowed.
#
# Names: IMAGEFN_FUNCTION_NETWORK / IMAGEFN_FUNCTION_NETWORK_NO_EGRESS (as the worker
# reads them), IMAGEFN_FUNCTION_BRIDGE / IMAGEFN_FUNCTION_BRIDGE_NO_EGRESS (at most 15
# characters). One pair per machine: every installation on the engine shares it (the
# chains are the machine's; a run with other names replaces the rules of the first).
# Runs as root; called by deploy/setup.sh.
set -euo pipefail

NETWORK_ENV=/var/lib/imagefn/network.env
for var in IMAGEFN_EGRESS_ALLOW IMAGEFN_FUNCTION_HOST_PORTS; do
  if [ -z "${!var+x}" ] && [ -r "$NETWORK_ENV" ] && grep -q "^$var=" "$NETWORK_ENV"; then
    value="$(sed -n "s/^$var=//p" "$NETWORK_ENV" | tail -n 1)"
    printf -v "$var" '%s' "${value//\"/}"
  fi
done
NET=${IMAGEFN_FUNCTION_NETWORK:-imagefn-fn}
NET_NE=${IMAGEFN_FUNCTION_NETWORK_NO_EGRESS:-imagefn-fn-noegress}
BR=${IMAGEFN_FUNCTION_BRIDGE:-imagefn-fn0}
BR_NE=${IMAGEFN_FUNCTION_BRIDGE_NO_EGRESS:-imagefn-fn1}
ALLOW=${IMAGEFN_EGRESS_ALLOW:-}
HOST_PORTS=${IMAGEFN_FUNCTION_HOST_PORTS-8334}
BLOCKED_RANGES=(10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 100.64.0.0/10 169.254.0.0/16)
IN_CHAIN=IMAGEFN-INPUT
FWD_CHAIN=IMAGEFN-FORWARD

step() { echo "==> $*"; }
die() { echo "network: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
for tool in docker iptables iptables-restore; do
  command -v "$tool" >/dev/null || die "$tool is not installed (deploy/setup.sh installs it)"
done
((${#BR} <= 15 && ${#BR_NE} <= 15)) || die "bridge names must be at most 15 characters"

# --- the rules, as iptables-restore lines --------------------------------------------

valid_cidr() {  # an IPv4 address or CIDR; iptables checks it too, this gives a clear error
  [[ "$1" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}(/([0-9]|[12][0-9]|3[0-2]))?$ ]]
}

# Nameservers the engine's embedded DNS forwards to: the host's, minus loopback ones
# (the engine replaces those by public resolvers, which the rules do not block).
resolvers() {
  awk '$1 == "nameserver" && $2 ~ /^[0-9.]+$/ && $2 !~ /^127\./ {print $2}' /etc/resolv.conf \
    2>/dev/null | sort -u
}

# Written as `iptables -S` prints them (option order, /32), so that `check` and the
# no-change test in `load` can compare text.
v4_rules() {
  local br cidr ns port
  for br in "$BR" "$BR_NE"; do
    echo "-A $IN_CHAIN -i $br -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    if [ "$br" = "$BR" ]; then
      for port in ${HOST_PORTS//,/ }; do
        [[ "$port" =~ ^[0-9]{1,5}$ ]] && ((port >= 1 && port <= 65535)) \
          || die "IMAGEFN_FUNCTION_HOST_PORTS: $port is not a TCP port"
        echo "-A $IN_CHAIN -i $br -p tcp -m tcp --dport $port -j ACCEPT"
      done
    fi
    echo "-A $IN_CHAIN -i $br -j DROP"
  done
  for br in "$BR" "$BR_NE"; do
    # Published ports reach instances from the host (OUTPUT), never by forwarding.
    echo "-A $FWD_CHAIN -o $br -m conntrack ! --ctstate RELATED,ESTABLISHED -j DROP"
  done
  echo "-A $FWD_CHAIN -i $BR_NE -j DROP"
  for cidr in ${ALLOW//,/ }; do
    valid_cidr "$cidr" || die "IMAGEFN_EGRESS_ALLOW: $cidr is not an IPv4 address or CIDR"
    [[ "$cidr" == */* ]] || cidr="$cidr/32"
    echo "-A $FWD_CHAIN -d $cidr -i $BR -j RETURN"
  done
  for ns in $(resolvers); do
    echo "-A $FWD_CHAIN -d $ns/32 -i $BR -p udp -m udp --dport 53 -j RETURN"
    echo "-A $FWD_CHAIN -d $ns/32 -i $BR -p tcp -m tcp --dport 53 -j RETURN"
  done
  echo "-A $FWD_CHAIN -i $BR -o docker+ -j DROP"
  echo "-A $FWD_CHAIN -i $BR -o br-+ -j DROP"
  for cidr in "${BLOCKED_RANGES[@]}"; do
    echo "-A $FWD_CHAIN -d $cidr -i $BR -j DROP"
  done
}

v6_rules() {
  local br
  for br in "$BR" "$BR_NE"; do
    echo "-A $IN_CHAIN -i $br -j DROP"
  done
  for br in "$BR" "$BR_NE"; do
    echo "-A $FWD_CHAIN -i $br -j DROP"
    echo "-A $FWD_CHAIN -o $br -j DROP"
  done
}

have_ip6() { command -v ip6tables >/dev/null && ip6tables -S INPUT >/dev/null 2>&1; }

# chain_body IPT CHAIN: the chain's rules as `iptables -S` prints them (nothing if absent).
chain_body() { "$1" -S "$2" 2>/dev/null | grep -- '^-A ' || true; }

# load IPT RULES: replace both chains' contents in one transaction, unless they already
# hold exactly RULES (then counters and the running rules are left alone).
load() {
  local ipt="$1" rules="$2" current
  current="$(chain_body "$ipt" "$IN_CHAIN"; chain_body "$ipt" "$FWD_CHAIN")"
  [ "$current" = "$rules" ] && return 0
  step "$ipt: loading chains $IN_CHAIN and $FWD_CHAIN"
  # In --noflush mode, declaring a chain creates it or empties it; the whole block
  # commits at once, so the old rules are never missing while the new ones load.
  printf '*filter\n:%s - [0:0]\n:%s - [0:0]\n%s\nCOMMIT\n' "$IN_CHAIN" "$FWD_CHAIN" "$rules" \
    | "${ipt}-restore" --noflush || die "$ipt-restore refused the rules"
}

# jump IPT FROM TO: make FROM's first rule a jump to TO (checked with -C first).
jump() {
  "$1" -C "$2" -j "$3" 2>/dev/null || "$1" -I "$2" 1 -j "$3"
}

# --- the networks ------------------------------------------------------------------------

# ensure_network NAME BRIDGE MASQUERADE
ensure_network() {
  local name="$1" bridge="$2" masquerade="$3" got
  if got="$(docker network inspect -f \
    '{{index .Options "com.docker.network.bridge.name"}} {{index .Options "com.docker.network.bridge.enable_icc"}} {{.Internal}}' \
    "$name" 2>/dev/null)"; then
    [ "$got" = "$bridge false false" ] \
      || die "network $name exists with other options ($got; want bridge $bridge, icc false," \
        "not internal): remove it (deploy/network.sh remove) and run this again"
    return 0
  fi
  step "creating network $name (bridge $bridge)"
  # Not --internal: an internal network cannot publish ports, and the gateway reaches
  # instances only through ports published on 127.0.0.1. The rules cut egress instead.
  docker network create --driver bridge \
    --label imagefn.network=1 \
    -o com.docker.network.bridge.name="$bridge" \
    -o com.docker.network.bridge.enable_icc=false \
    -o com.docker.network.bridge.enable_ip_masquerade="$masquerade" \
    "$name" >/dev/null || die "docker could not create network $name"
}

install() {
  docker info >/dev/null 2>&1 || die "the Docker engine does not answer (deploy/setup.sh starts it)"
  # Rules first: an instance can only join a network once its rules are in place.
  local v4
  v4="$(v4_rules)"
  load iptables "$v4"
  # DOCKER-USER: created by the engine, which evaluates it before its own FORWARD rules.
  iptables -S DOCKER-USER >/dev/null 2>&1 || die "chain DOCKER-USER missing: is dockerd running with iptables on?"
  jump iptables INPUT "$IN_CHAIN"
  jump iptables DOCKER-USER "$FWD_CHAIN"
  if have_ip6; then
    load ip6tables "$(v6_rules)"
    jump ip6tables INPUT "$IN_CHAIN"
    jump ip6tables FORWARD "$FWD_CHAIN"
  fi
  ensure_network "$NET" "$BR" true
  # No egress: no NAT out either, besides the rule dropping whatever the bridge forwards.
  ensure_network "$NET_NE" "$BR_NE" false
}

check() {
  local ok=0 net
  for net in "$NET" "$NET_NE"; do
    docker network inspect "$net" >/dev/null 2>&1 || { echo "missing network $net"; ok=1; }
  done
  [ "$(chain_body iptables "$IN_CHAIN"; chain_body iptables "$FWD_CHAIN")" = "$(v4_rules)" ] \
    || { echo "iptables chains $IN_CHAIN/$FWD_CHAIN missing or not current"; ok=1; }
  iptables -C INPUT -j "$IN_CHAIN" 2>/dev/null || { echo "INPUT does not jump to $IN_CHAIN"; ok=1; }
  iptables -C DOCKER-USER -j "$FWD_CHAIN" 2>/dev/null \
    || { echo "DOCKER-USER does not jump to $FWD_CHAIN"; ok=1; }
  if have_ip6; then
    [ "$(chain_body ip6tables "$IN_CHAIN"; chain_body ip6tables "$FWD_CHAIN")" = "$(v6_rules)" ] \
      || { echo "ip6tables chains missing or not current"; ok=1; }
  fi
  return "$ok"
}

# unload IPT FROM...: remove every jump to the chains, then the chains.
unload() {
  local ipt="$1" from chain
  shift
  for from in "$@"; do
    for chain in "$IN_CHAIN" "$FWD_CHAIN"; do
      while "$ipt" -C "$from" -j "$chain" 2>/dev/null; do "$ipt" -D "$from" -j "$chain"; done
    done
  done
  for chain in "$IN_CHAIN" "$FWD_CHAIN"; do
    if "$ipt" -S "$chain" >/dev/null 2>&1; then
      "$ipt" -F "$chain"
      "$ipt" -X "$chain"
    fi
  done
}

remove() {
  local net attached present=()
  # Networks first, and none while an instance is attached to either: an instance's
  # rules must stay as long as it runs.
  for net in "$NET" "$NET_NE"; do
    docker network inspect "$net" >/dev/null 2>&1 || continue
    attached="$(docker network inspect -f '{{range .Containers}}{{.Name}} {{end}}' "$net")"
    [ -z "${attached// /}" ] \
      || die "containers still use network $net: $attached(stop the platform first: deploy/stop.sh)"
    present+=("$net")
  done
  for net in "${present[@]}"; do
    step "removing network $net"
    docker network rm "$net" >/dev/null
  done
  step "removing the firewall rules"
  unload iptables INPUT DOCKER-USER
  if have_ip6; then
    unload ip6tables INPUT FORWARD
  fi
}

case "${1:-install}" in
  install) install ;;
  check) check ;;
  remove) remove ;;
  *) die "usage: $0 [install|check|remove]" ;;
esac
