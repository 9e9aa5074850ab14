"""Request guards that need no state: the Host allow-list and the API's CSRF rules.

* **Host**: the gateway answers only the host names in ``allowed_hosts`` (``"*"``: any).
  A web page on an attacker's domain that re-points its DNS name at 127.0.0.1 (DNS
  rebinding) reaches the gateway with its own name in ``Host``, and is refused: 421
  Misdirected Request. ``/healthz`` is exempt: health checkers often use the machine's
  address as the host, and the answer (``{"status": "ok"}``) reveals and changes nothing.
  An HTTP/1.1 request without Host is malformed (400); an HTTP/1.0 one may omit it (no
  browser sends such a request, so it cannot be a rebinding page).
* **CSRF**: a browser sends a cross-site form (``application/x-www-form-urlencoded``,
  ``multipart/form-data``, ``text/plain``) without asking first, so state-changing API
  routes (not GET/HEAD/OPTIONS, under ``/v1/``) refuse those bodies (415), and refuse a
  request a browser marks as cross-site (``Sec-Fetch-Site: cross-site``) or whose
  ``Origin`` names a host not allowed (403). Any other body type makes a browser ask
  first (CORS preflight), which the gateway never grants. Web functions (``/web/…``) are
  the user's own HTTP app and get none of this.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import hdrs, web

from gateway.context import SETTINGS
from gateway.errors import CrossSiteRequest, Handler, MisdirectedRequest, UnsupportedMediaType
from shared.errors import InvalidRequest

ANY_HOST = "*"
HEALTH_PATH = "/healthz"
API_PREFIX = "/v1/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The body types a browser sends cross-site without a preflight (the CORS "simple" ones).
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})


def host_name(value: str) -> str:
    """The host name of a Host header value (or of an Origin's netloc): lower case, port
    and IPv6 brackets removed, a trailing dot dropped."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[1:end] if end > 0 else v
    if v.count(":") == 1:
        v = v.partition(":")[0]
    return v[:-1] if v.endswith(".") else v


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    return ANY_HOST in allowed or name in allowed


def check_host(request: web.Request, allowed: tuple[str, ...]) -> None:
    raw = request.headers.get(hdrs.HOST)
    if raw is None:
        if request.version >= (1, 1):
            raise InvalidRequest("an HTTP/1.1 request needs a Host header")
        return
    name = host_name(raw)
    if not host_allowed(name, allowed):
        raise MisdirectedRequest(
            f"this gateway does not answer for host {name!r}; allowed: "
            f"{', '.join(allowed)} (IMAGEFN_ALLOWED_HOSTS)",
            details={"host": name, "setting": "IMAGEFN_ALLOWED_HOSTS"},
        )


def check_cross_site(request: web.Request, allowed: tuple[str, ...]) -> None:
    """For state-changing API routes: refuse what a cross-site page could send."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise CrossSiteRequest("cross-site browser requests may not change state (Sec-Fetch-Site)")
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        # "null": a sandboxed frame, a file: page, a redirect across origins.
        name = host_name(urlsplit(origin).netloc) if origin != "null" else "null"
        if not host_allowed(name, allowed):
            raise CrossSiteRequest(
                f"requests from origin {origin!r} may not change state; allowed hosts: "
                f"{', '.join(allowed)} (IMAGEFN_ALLOWED_HOSTS)",
                details={"origin": origin, "setting": "IMAGEFN_ALLOWED_HOSTS"},
            )
    # Even with an empty body: a form with no fields is still a cross-site request.
    if hdrs.CONTENT_TYPE in request.headers and request.content_type in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type} is not accepted here (a cross-site form "
            "can send it); send application/json (curl: -H 'Content-Type: application/json')",
            details={"content_type": request.content_type},
        )


@web.middleware
async def intake_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    allowed = request.app[SETTINGS].intake.allowed_hosts
    if request.path != HEALTH_PATH:
        check_host(request, allowed)
    if request.method not in SAFE_METHODS and request.path.startswith(API_PREFIX):
        check_cross_site(request, allowed)
    return await handler(request)
