"""Which credentials each server process uses: one Redis user (and, where the Kafka
cluster has SASL, one Kafka principal) per role.

deploy/redis.sh gives every role its own Redis ACL user and writes one URL per role into
the credentials file (``IMAGEFN_REDIS_URL_GATEWAY=redis://imagefn-gateway:…``). A server
command runs as the role of the same name; ``imagefn up`` (every component in one
process) runs as ``platform``. For each of ``ROLE_VARIABLES`` the role's own variable
(``IMAGEFN_REDIS_URL_WORKER`` for a worker) is taken before the shared one
(``IMAGEFN_REDIS_URL``), and the environment before the credentials file: so an
operator's ``IMAGEFN_REDIS_URL=… imagefn worker`` still wins over the file, and a host
given only its role's variables needs nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping

# Server command -> its role. Client commands (deploy, invoke, ...) only speak HTTP to a
# gateway and have no role.
COMMAND_ROLES = {
    "gateway": "gateway",
    "worker": "worker",  # the worker's log shipper child runs with the worker's settings
    "scheduler": "scheduler",
    "coldstart": "coldstart",
    # The trigger runner does what a scheduler does (reads functions, accepts and
    # publishes invocations): it runs as the scheduler's user.
    "triggers": "scheduler",
    "up": "platform",
}
# The operators' role (redis-cli in the deploy scripts, benchmarks, backups): every
# command, every key. No platform process uses it.
ADMIN_ROLE = "admin"
ROLES = (*dict.fromkeys(COMMAND_ROLES.values()), ADMIN_ROLE)

# Settings that may be given per role.
ROLE_VARIABLES = (
    "IMAGEFN_REDIS_URL",
    "IMAGEFN_KAFKA_SASL_USERNAME",
    "IMAGEFN_KAFKA_SASL_PASSWORD",
)

# What a platform role may do in Redis (deploy/redis.sh writes the same rules; a unit
# test holds the two together). Every command but the @dangerous ones (KEYS, FLUSHALL,
# CONFIG, DEBUG, CLIENT KILL, ACL, SHUTDOWN, MONITOR, ...: the platform uses none of
# them) and FUNCTION (which could replace server-side code); no pub/sub channel (the
# platform publishes nothing). The key pattern (~PREFIX:*) is added per installation.
REDIS_ROLE_RULES = "resetchannels +@all -@dangerous -function"


def redis_user(role: str) -> str:
    return f"imagefn-{role}"


def role_variable(name: str, role: str) -> str:
    """``IMAGEFN_REDIS_URL`` of role ``worker`` -> ``IMAGEFN_REDIS_URL_WORKER``."""
    return f"{name}_{role.upper()}"


def role_env(
    role: str | None, environ: Mapping[str, str], file_env: Mapping[str, str]
) -> dict[str, str]:
    """The settings mapping of a process of ``role``: the credentials file overlaid by
    the environment, with each of ROLE_VARIABLES set from the first of: the
    environment's role variable, the environment's shared one, the file's role
    variable, the file's shared one."""
    env = {**file_env, **environ}
    if role is None:
        return env
    for name in ROLE_VARIABLES:
        for source in (environ, file_env):
            value = source.get(role_variable(name, role)) or source.get(name)
            if value:
                env[name] = value
                break
    return env


# What Redis answers a client without (valid) credentials or permissions. A client that
# speaks RESP3 hears the HELLO one instead of NOAUTH.
_REFUSALS = (
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "Authentication required",
    "invalid username-password pair",
    "HELLO must be called with the client already authenticated",
    "no permissions to",
)


def credentials_refused(message: str) -> bool:
    """Whether a Redis error (or a platform error quoting one) says the ACL refused us."""
    return any(r in message for r in _REFUSALS)
