"""The legacy-web example (examples/legacy-web/): Flask's tutorial app "flaskr", as Debian
ships it, unchanged behind /web/NAME/ on a real platform. Its links, stylesheet, redirects
and session cookie must all stay under the prefix, as a browser would use them.

The app keeps its users and posts in SQLite in the instance's /tmp, so a walk through it
only holds together on one instance: the example's spec sets ``max_instances: 1`` and the
shared platform has one worker, and every response's X-Imagefn-Instance is checked to be
the same."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from tests.integration.conftest import REPO, Platform, unique

SPEC_FILE = REPO / "examples/legacy-web/function.yaml"
# The targets of links, stylesheets, scripts and forms in the app's pages.
LINK = re.compile(r'(?:href|src|action)="([^"]*)"')


def example_spec() -> dict[str, Any]:
    """The example's own function.yaml, less what only the CLI reads (``build``) and
    the name (each test deploys its own)."""
    spec: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text())
    spec.pop("build", None)
    spec.pop("name", None)
    return spec


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A visitor without an API key (the function is public), keeping cookies as a
    browser does: by their Path (aiohttp refuses cookies from IP hosts unless unsafe)."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60), cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as s:
        yield s


async def deploy_example(
    platform: Platform, client: aiohttp.ClientSession, **overrides: Any
) -> tuple[str, str]:
    """Deploy the example under a fresh name; its name and its base URL."""
    name = unique("legacy")
    await platform.deploy(client, name, **{**example_spec(), **overrides})
    return name, f"{platform.url}/web/{name}"


async def page(
    browser: aiohttp.ClientSession, url: str, instances: set[str], **kw: Any
) -> tuple[int, dict[str, str], str]:
    """One request, redirects not followed; notes which instance answered."""
    async with browser.get(url, allow_redirects=False, **kw) as resp:
        instances.add(resp.headers["X-Imagefn-Instance"])
        return resp.status, dict(resp.headers), await resp.text()


def links(html: str) -> list[str]:
    return LINK.findall(html)


async def test_pages_links_and_stylesheet_stay_under_the_prefix(
    platform: Platform, client: aiohttp.ClientSession, browser: aiohttp.ClientSession
) -> None:
    name, base = await deploy_example(platform, client)
    seen: set[str] = set()
    status, _, html = await page(browser, f"{base}/", seen)
    assert status == 200, html
    assert "<title>Posts - Flaskr</title>" in html
    found = links(html)
    prefix = f"/web/{name}/"
    assert f"{prefix}static/style.css" in found, found
    assert f"{prefix}auth/register" in found and f"{prefix}auth/login" in found, found
    assert all(link.startswith(prefix) for link in found), found

    # The stylesheet, fetched as the browser would from the page's own link.
    async with browser.get(f"{platform.url}{prefix}static/style.css") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/css"
        assert "body" in await resp.text()
        seen.add(resp.headers["X-Imagefn-Instance"])

    # /web/NAME (no slash) reaches the app's index too.
    status, _, html = await page(browser, base, seen)
    assert status == 200 and f'href="{prefix}static/style.css"' in html
    assert len(seen) == 1, seen


async def test_register_log_in_post_and_log_out_through_the_gateway(
    platform: Platform, client: aiohttp.ClientSession, browser: aiohttp.ClientSession
) -> None:
    name, base = await deploy_example(platform, client)
    prefix = f"/web/{name}"
    seen: set[str] = set()
    account = {"username": "ada", "password": "lovelace-1843"}

    async with browser.post(f"{base}/auth/register", data=account, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        assert r.headers["Location"] == f"{prefix}/auth/login"
        seen.add(r.headers["X-Imagefn-Instance"])
    status, _, html = await page(browser, f"{platform.url}{prefix}/auth/login", seen)
    assert status == 200 and "Log In" in html

    # A page that needs a login sends an anonymous visitor to the login page.
    status, headers, _ = await page(browser, f"{base}/create", seen)
    assert status == 302 and headers["Location"] == f"{prefix}/auth/login"

    async with browser.post(f"{base}/auth/login", data=account, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        assert r.headers["Location"] == f"{prefix}/"
        cookies = r.headers.getall("Set-Cookie")
        seen.add(r.headers["X-Imagefn-Instance"])
    [session] = [c for c in cookies if c.startswith("session=")]
    attributes = [a.strip() for a in session.split(";")]
    # Scoped to this function: every web function shares the gateway's host.
    assert f"Path={prefix}" in attributes, session
    assert "HttpOnly" in attributes, session
    jar = browser.cookie_jar
    assert "session" in jar.filter_cookies(URL(f"{base}/create"))
    assert "session" not in jar.filter_cookies(URL(f"{platform.url}/web/other-function/"))
    assert "session" not in jar.filter_cookies(URL(f"{platform.url}{prefix}x/"))

    post = {"title": "Analytical engine", "body": "It weaves algebraic patterns."}
    async with browser.post(f"{base}/create", data=post, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        assert r.headers["Location"] == f"{prefix}/"
        seen.add(r.headers["X-Imagefn-Instance"])
    status, _, html = await page(browser, f"{base}/", seen)
    assert status == 200
    assert "<h1>Analytical engine</h1>" in html and "It weaves algebraic patterns." in html
    assert "<span>ada</span>" in html
    assert f'href="{prefix}/auth/logout"' in html and f'href="{prefix}/1/update"' in html

    # Log out: the session cookie is removed, which only works with the same Path.
    async with browser.get(f"{base}/auth/logout", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == f"{prefix}/"
        [cleared] = [c for c in r.headers.getall("Set-Cookie") if c.startswith("session=")]
        assert f"Path={prefix}" in [a.strip() for a in cleared.split(";")], cleared
        seen.add(r.headers["X-Imagefn-Instance"])
    status, _, html = await page(browser, f"{base}/", seen)
    assert "Log Out" not in html and "<h1>Analytical engine</h1>" in html
    assert len(seen) == 1, f"the calls reached more than one instance: {seen}"


async def test_a_caller_cannot_move_the_prefix(
    platform: Platform, client: aiohttp.ClientSession, browser: aiohttp.ClientSession
) -> None:
    name, base = await deploy_example(platform, client)
    seen: set[str] = set()
    spoofed = {
        "X-Forwarded-Prefix": "/evil",
        "X-Forwarded-Host": "evil.example",
        # gunicorn 20.1 takes SCRIPT_NAME from a request header of that name; the gateway
        # drops every header name with an underscore.
        "SCRIPT_NAME": "/evil",
    }
    status, _, html = await page(browser, f"{base}/", seen, headers=spoofed)
    assert status == 200, html
    found = links(html)
    assert found and all(link.startswith(f"/web/{name}/") for link in found), found
    async with browser.post(
        f"{base}/auth/register",
        data={"username": "mallory", "password": "x"},
        headers=spoofed,
        allow_redirects=False,
    ) as r:
        assert r.status == 302
        assert r.headers["Location"] == f"/web/{name}/auth/login"


async def test_script_name_setting_for_apps_without_the_header(
    platform: Platform, client: aiohttp.ClientSession, browser: aiohttp.ClientSession
) -> None:
    """The alternative to X-Forwarded-Prefix: a fixed SCRIPT_NAME in the function's env
    (the wrapper applies it; gunicorn alone would fail with a 500 on stripped paths)."""
    name = unique("legacy")
    prefix = f"/web/{name}"
    await platform.deploy(client, name, **{**example_spec(), "env": {"SCRIPT_NAME": prefix}})
    seen: set[str] = set()
    status, _, html = await page(browser, f"{platform.url}{prefix}/auth/login", seen)
    assert status == 200, html
    assert f'href="{prefix}/static/style.css"' in html and f'href="{prefix}/"' in html
    async with browser.post(
        f"{platform.url}{prefix}/auth/register",
        data={"username": "grace", "password": "cobol"},
        allow_redirects=False,
    ) as r:
        assert r.status == 302 and r.headers["Location"] == f"{prefix}/auth/login"
