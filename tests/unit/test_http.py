"""shared.http.strip_hop_by_hop."""

from __future__ import annotations

import pytest

from shared.http import forwarded_headers, scope_cookie, strip_hop_by_hop


def test_hop_by_hop_and_framing_headers_are_removed() -> None:
    headers = [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "close"),
        ("TE", "trailers"),
        ("Trailer", "Expires"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Content-Length", "12"),
        ("Host", "example.com"),
        ("Content-Type", "text/plain"),
    ]
    assert strip_hop_by_hop(headers) == [("Content-Type", "text/plain")]


def test_headers_named_by_connection_are_removed() -> None:
    headers = [
        ("Connection", "close, X-Private ,  x-other,,"),
        ("X-Private", "secret"),
        ("X-OTHER", "1"),
        ("X-Public", "ok"),
    ]
    assert strip_hop_by_hop(headers) == [("X-Public", "ok")]


def test_several_connection_headers_all_count() -> None:
    headers = [("Connection", "X-A"), ("X-A", "1"), ("connection", "X-B"), ("X-B", "2")]
    assert strip_hop_by_hop(headers) == []


def test_matching_is_case_insensitive() -> None:
    headers = [("TRANSFER-ENCODING", "chunked"), ("keep-alive", "1"), ("uPgRaDe", "h2c")]
    assert strip_hop_by_hop(headers) == []


def test_end_to_end_headers_keep_order_case_and_repeats() -> None:
    headers = [
        ("Set-Cookie", "a=1"),
        ("Connection", "close"),
        ("X-Request-Id", "r1"),
        ("Set-Cookie", "b=2"),
        ("Cache-Control", "no-cache"),
        ("set-cookie", "c=3"),
    ]
    assert strip_hop_by_hop(headers) == [
        ("Set-Cookie", "a=1"),
        ("X-Request-Id", "r1"),
        ("Set-Cookie", "b=2"),
        ("Cache-Control", "no-cache"),
        ("set-cookie", "c=3"),
    ]


def test_accepts_any_iterable_once() -> None:
    gen = (h for h in [("Connection", "X-A"), ("X-A", "1"), ("X-B", "2")])
    assert strip_hop_by_hop(gen) == [("X-B", "2")]


def test_forwarded_headers_are_the_gateways_own() -> None:
    caller = [
        ("Accept", "text/html"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Prefix", "/admin"),
        ("Forwarded", "for=1.2.3.4"),
        ("x-scf-request-id", "forged"),
        ("X-SCF-Name", "other"),
        ("X_Scf_Request_Id", "forged-too"),
        ("My_Header", "x"),
        ("Connection", "close"),
    ]
    got = forwarded_headers(caller, "127.0.0.1", "app.test:8080", "http")
    assert got == [
        ("Accept", "text/html"),
        ("Host", "app.test:8080"),
        # The caller's value is kept as history, the peer the gateway saw appended.
        ("X-Forwarded-For", "203.0.113.9, 127.0.0.1"),
        ("X-Forwarded-Host", "app.test:8080"),
        ("X-Forwarded-Proto", "http"),
    ]
    assert forwarded_headers([], "10.0.0.1", "h", "http")[1] == ("X-Forwarded-For", "10.0.0.1")


def test_forwarded_prefix_is_the_gateways_own() -> None:
    caller = [("X-Forwarded-Prefix", "/admin"), ("Accept", "*/*")]
    got = forwarded_headers(caller, "127.0.0.1", "h", "http", "/web/app")
    assert ("X-Forwarded-Prefix", "/web/app") in got
    assert ("X-Forwarded-Prefix", "/admin") not in got


@pytest.mark.parametrize(
    ("cookie", "scoped"),
    [
        ("session=abc; HttpOnly; Path=/", "session=abc; HttpOnly; Path=/web/app"),
        ("a=1; path=/auth; Secure", "a=1; Path=/web/app/auth; Secure"),
        ("a=1; Path=auth", "a=1; Path=/web/app/auth"),
        ("a=1; Path=", "a=1; Path=/web/app"),
        # Already under the prefix, or no Path (the browser uses the request's directory).
        ("a=1; Path=/web/app", "a=1; Path=/web/app"),
        ("a=1; Path=/web/app/x", "a=1; Path=/web/app/x"),
        ("a=1; HttpOnly", "a=1; HttpOnly"),
        # /web/appx is another function's: moved under this one's prefix.
        ("a=1; Path=/web/appx", "a=1; Path=/web/app/web/appx"),
        # A value that merely contains "path=" is not the attribute.
        ("path=/; Max-Age=5", "path=/; Max-Age=5"),
    ],
)
def test_scope_cookie(cookie: str, scoped: str) -> None:
    assert scope_cookie(cookie, "/web/app") == scoped
