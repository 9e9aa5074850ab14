"""Typed settings of the platform's protections: who may call the API (``AuthSettings``),
what the gateway accepts from a client and at what rate (``IntakeSettings``), and the
network function instances run on (``NetworkSettings``). Loaded with the rest of the
settings by ``shared.settings.load_settings``; kept here so that each group reads on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.envparse import _bool, _csv, _float, _int, _positive, _positive_float
from shared.errors import InvalidRequest

MiB = 1024 * 1024


@dataclass(frozen=True)
class AuthSettings:
    # The bootstrap admin key (IMAGEFN_ADMIN_KEY), written by deploy/setup.sh into the
    # credentials file. A gateway without one refuses to start: nothing would be callable.
    admin_key: str = ""
    # How long a gateway trusts what it read of a key; a revoked or expired key stops
    # working on every gateway within this time.
    key_cache_s: float = 2.0
    # Audit entries kept (a capped Redis stream; the oldest go first).
    audit_max_entries: int = 100_000
    # One structured access-log line per request (to the gateway's log output).
    access_log: bool = True


@dataclass(frozen=True)
class IntakeSettings:
    # A client must send a request's line and headers within this time, from its first
    # byte (slowloris).
    header_timeout_s: float = 10.0
    # A body must arrive at this average rate at least, after the grace period.
    body_min_bytes_per_s: int = 1024
    body_grace_s: float = 10.0
    # An idle keep-alive connection is closed after this time.
    keepalive_timeout_s: float = 15.0
    # Open connections one gateway holds; the next gets a 503 and is closed.
    max_connections: int = 1024
    # Host header values (names without port) the gateway answers; "*" allows any.
    # Refusing others defeats DNS rebinding.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    # Calls and request bytes one gateway holds in the queue at once (published and not
    # yet answered); past either, new calls get 503 with Retry-After.
    max_inflight_calls: int = 4096
    max_inflight_bytes: int = 512 * MiB
    # Token buckets shared by all gateways (in Redis): calls per second and burst, per
    # API key and per function. 0 turns a limit off.
    rate_per_key: float = 1000.0
    burst_per_key: int = 2000
    rate_per_function: float = 0.0
    burst_per_function: int = 0


@dataclass(frozen=True)
class NetworkSettings:
    # Docker networks function instances run on (created by deploy/network.sh with
    # inter-container traffic off; the firewall rules keep them from the host and the
    # platform). The second also has no route out (``egress: false`` functions).
    network: str = "imagefn-fn"
    network_no_egress: str = "imagefn-fn-noegress"


def load_auth(env: Mapping[str, str]) -> AuthSettings:
    a = AuthSettings()
    return AuthSettings(
        admin_key=(env.get("IMAGEFN_ADMIN_KEY") or "").strip(),
        key_cache_s=_float(env, "IMAGEFN_KEY_CACHE_S", a.key_cache_s),
        audit_max_entries=_positive(env, "IMAGEFN_AUDIT_MAX_ENTRIES", a.audit_max_entries),
        access_log=_bool(env, "IMAGEFN_ACCESS_LOG", a.access_log),
    )


def _non_negative(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value < 0:
        raise InvalidRequest(f"setting {name}={value:g}: must not be negative")
    return value


def load_intake(env: Mapping[str, str]) -> IntakeSettings:
    i = IntakeSettings()
    return IntakeSettings(
        header_timeout_s=_positive_float(env, "IMAGEFN_HEADER_TIMEOUT_S", i.header_timeout_s),
        body_min_bytes_per_s=_int(env, "IMAGEFN_BODY_MIN_RATE", i.body_min_bytes_per_s),
        body_grace_s=_positive_float(env, "IMAGEFN_BODY_GRACE_S", i.body_grace_s),
        keepalive_timeout_s=_positive_float(
            env, "IMAGEFN_KEEPALIVE_TIMEOUT_S", i.keepalive_timeout_s
        ),
        max_connections=_positive(env, "IMAGEFN_MAX_CONNECTIONS", i.max_connections),
        allowed_hosts=tuple(h.lower() for h in _csv(env, "IMAGEFN_ALLOWED_HOSTS", i.allowed_hosts)),
        max_inflight_calls=_positive(env, "IMAGEFN_MAX_INFLIGHT_CALLS", i.max_inflight_calls),
        max_inflight_bytes=_positive(env, "IMAGEFN_MAX_INFLIGHT_BYTES", i.max_inflight_bytes),
        rate_per_key=_non_negative(env, "IMAGEFN_RATE_PER_KEY", i.rate_per_key),
        burst_per_key=int(_non_negative(env, "IMAGEFN_BURST_PER_KEY", i.burst_per_key)),
        rate_per_function=_non_negative(env, "IMAGEFN_RATE_PER_FUNCTION", i.rate_per_function),
        burst_per_function=int(
            _non_negative(env, "IMAGEFN_BURST_PER_FUNCTION", i.burst_per_function)
        ),
    )


def load_network(env: Mapping[str, str]) -> NetworkSettings:
    n = NetworkSettings()
    return NetworkSettings(
        network=env.get("IMAGEFN_FUNCTION_NETWORK") or n.network,
        network_no_egress=env.get("IMAGEFN_FUNCTION_NETWORK_NO_EGRESS") or n.network_no_egress,
    )
