"""legacy-web: Flask's tutorial app "flaskr", exactly as Debian ships it, served behind
imagefn's /web/NAME/.

flaskr (register, log in, blog posts; Jinja templates, a static stylesheet, redirects
through url_for, a session cookie) comes from Debian's python3-flask package, under
/usr/share/doc/python3-flask/examples; the Dockerfile puts that folder on PYTHONPATH and
nothing of it is copied or changed. This module is the whole of our code: the WSGI
entry point gunicorn serves (``gunicorn legacy_wsgi:app``). It

- points the app's state at /tmp, the only writable place of an instance (the root
  filesystem is read-only), and creates the SQLite schema there at start;
- tells the app where it lives: the gateway sends ``X-Forwarded-Prefix: /web/NAME`` and
  ProxyFix turns it into SCRIPT_NAME, so url_for, redirects and the stylesheet link come
  out as /web/NAME/...; or, for a proxy that sends no such header, a fixed prefix from
  the SCRIPT_NAME setting;

The app's cookies (flaskr's session: Path=/) need nothing here: the gateway moves every
web function's cookie Path under /web/NAME, as nginx's proxy_cookie_path would.

Settings (environment):
  SCRIPT_NAME         a fixed prefix (``/web/legacy-web``) instead of X-Forwarded-Prefix.
                      Taken out of the environment here: gunicorn 20.1 reads it too and
                      then cuts it out of every request path, failing with a 500 on a path
                      the gateway has already stripped.
  FLASK_SECRET_KEY    signs the session cookie. Unset: a random key per process, so
                      sessions end with the instance (as its database does anyway).
  FLASK_DATABASE      the SQLite file (default /tmp/flaskr/flaskr.sqlite).
  FLASK_*             any other Flask setting (Flask's from_prefixed_env).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from flaskr import create_app  # type: ignore[import-not-found, unused-ignore]
from flaskr.db import init_db  # type: ignore[import-not-found, unused-ignore]
from werkzeug.middleware.proxy_fix import (  # type: ignore[import-not-found, unused-ignore]
    ProxyFix,
)

# WSGI's types, as loosely as this module needs them.
Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

DEFAULT_DATABASE = "/tmp/flaskr/flaskr.sqlite"


class FixedScriptName:
    """SCRIPT_NAME from configuration, for when the proxy in front sends no
    X-Forwarded-Prefix. The path arrives with the prefix already removed (the gateway
    strips /web/NAME), so PATH_INFO stays as it is; a path that still carries the prefix
    (a proxy that does not strip it) loses it here."""

    def __init__(self, app: WSGIApp, script_name: str) -> None:
        self.app = app
        self.script_name = script_name.rstrip("/")

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self.script_name or path.startswith(self.script_name + "/"):
            environ["PATH_INFO"] = path[len(self.script_name) :]
        environ["SCRIPT_NAME"] = self.script_name
        return self.app(environ, start_response)


def build() -> Any:
    """The flaskr app, configured for an imagefn instance, its database created."""
    database = os.environ.get("FLASK_DATABASE", DEFAULT_DATABASE)
    # The mapping replaces flaskr's instance-folder config.py (its default "dev" secret
    # and a database beside the code, which is read-only here).
    flask_app = create_app({"SECRET_KEY": secrets.token_hex(32), "DATABASE": database})
    flask_app.config.from_prefixed_env()  # FLASK_SECRET_KEY and friends win
    os.makedirs(os.path.dirname(flask_app.config["DATABASE"]), exist_ok=True)
    # Only when missing: flaskr's init-db drops every table, and gunicorn starts the app
    # again in a new worker process if the old one dies; the instance's /tmp outlives it.
    if not os.path.exists(flask_app.config["DATABASE"]):
        with flask_app.app_context():
            init_db()
        print(f"legacy-web: created {flask_app.config['DATABASE']}", flush=True)

    # Where the app lives (SCRIPT_NAME) around the app. Only one proxy (the gateway) is
    # in front: trust one hop of each header; the gateway replaces whatever a caller
    # sends in X-Forwarded-Prefix/-Host/-Proto.
    inner: WSGIApp = flask_app.wsgi_app
    # Popped, not read: gunicorn's worker reads SCRIPT_NAME from the environment per request.
    forced = os.environ.pop("SCRIPT_NAME", "").strip()
    if forced:
        flask_app.wsgi_app = ProxyFix(FixedScriptName(inner, forced), x_for=1, x_proto=1, x_host=1)
    else:
        flask_app.wsgi_app = ProxyFix(inner, x_for=1, x_proto=1, x_host=1, x_prefix=1)
    return flask_app


app = build()
