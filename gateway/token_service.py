"""The registry's token service (Docker registry token authentication specification).

The registry answers a request without a valid token with 401 and a challenge naming
this route as the realm; the client (the Docker engine, a worker, the CLI) asks here with
HTTP Basic credentials, ``service`` and the ``scope``s it needs, and retries with the
token. Two principals exist:

- the deployer (``deploy_user``/``deploy_password``): ``pull`` and ``push`` on any
  repository;
- a worker (``imagefn-worker``/``worker_secret``): ``pull`` only.

Each gets the intersection of what it asked and what it may have; asking for more is not
an error. Tokens and passwords are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import uuid
from dataclasses import dataclass

import structlog
from aiohttp import hdrs, web

from gateway.context import REQUEST_ID, SETTINGS, TOKENS
from gateway.errors import error_response
from gateway.tokens import TokenIssuer, grant, parse_scope
from shared.errors import ImagefnError, InvalidRequest, ServiceUnavailable, Unauthorized
from shared.settings import WORKER_USER, RegistrySettings

log = structlog.get_logger("imagefn.gateway.tokens")

routes = web.RouteTableDef()

TOKEN_PATH = "/v1/registry/token"
CHALLENGE = 'Basic realm="imagefn"'
DEPLOYER_ACTIONS = frozenset({"pull", "push"})
WORKER_ACTIONS = frozenset({"pull"})


@dataclass(frozen=True)
class Principal:
    name: str
    actions: frozenset[str]


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def basic_credentials(header: str | None) -> tuple[str, str]:
    """(user, password) of an ``Authorization: Basic`` header, else Unauthorized."""
    scheme, _, encoded = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("credentials required (HTTP Basic)")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise Unauthorized("malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise Unauthorized("malformed Basic credentials")
    return user, password


def authenticate(header: str | None, settings: RegistrySettings) -> Principal:
    """The principal an ``Authorization`` header proves, else Unauthorized. A principal
    whose password is not configured (empty) cannot log in."""
    user, password = basic_credentials(header)
    # Both pairs are always compared, so the time taken does not tell which user exists.
    deployer = _same(user, settings.deploy_user) & _same(password, settings.deploy_password)
    worker = _same(user, WORKER_USER) & _same(password, settings.worker_secret)
    if deployer and settings.deploy_password:
        return Principal(settings.deploy_user, DEPLOYER_ACTIONS)
    if worker and settings.worker_secret:
        return Principal(WORKER_USER, WORKER_ACTIONS)
    raise Unauthorized("invalid credentials")


def _issue(request: web.Request, issuer: TokenIssuer | None) -> web.Response:
    settings = request.app[SETTINGS].registry
    query = request.rel_url.query
    service = query.get("service", "")
    if service != settings.service:
        raise InvalidRequest(f"unknown service; this token service serves {settings.service!r}")
    principal = authenticate(request.headers.get(hdrs.AUTHORIZATION), settings)
    account = query.get("account")
    if account and account != principal.name:
        raise InvalidRequest("account does not match the credentials")
    requested = [s for raw in query.getall("scope", []) for s in parse_scope(raw)]
    granted = grant(requested, principal.actions)
    if issuer is None:
        raise ServiceUnavailable("the registry token signing key is not configured")
    issued = issuer.issue(principal.name, granted)
    log.info(
        "registry_token_issued",
        subject=principal.name,
        scope=[f"{t}:{n}:{','.join(a)}" for t, n, a in requested],
        granted=[f"{a.name}:{','.join(a.actions)}" for a in granted],
        expires_in=issued.expires_in,
    )
    return web.json_response(
        {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": issued.issued_at,
        },
        headers={hdrs.CACHE_CONTROL: "no-store"},
    )


@routes.get(TOKEN_PATH)
async def registry_token(request: web.Request) -> web.Response:
    # Errors are rendered here rather than by the gateway's middleware: a 401 must carry
    # the Basic challenge, and the route works in an app without that middleware.
    try:
        return _issue(request, request.app.get(TOKENS))
    except ImagefnError as e:
        if isinstance(e, Unauthorized):
            log.info("registry_token_refused", reason=e.message)
        request_id = request.get(REQUEST_ID) or str(uuid.uuid4())
        response = error_response(e, request_id)
        if isinstance(e, Unauthorized):
            response.headers[hdrs.WWW_AUTHENTICATE] = CHALLENGE
        return response
