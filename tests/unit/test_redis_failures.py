"""A Redis failure no handler turned into a platform error is a 503 naming its cause
(out of memory, refused credentials), never a 500."""

from __future__ import annotations

import pytest
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError, ResponseError

from gateway.errors import redis_error
from shared.registry import FunctionRegistry
from tests.unit.conftest import Gateway

OOM = "OOM command not allowed when used memory > 'maxmemory'."


def test_each_redis_failure_names_its_cause() -> None:
    oom = redis_error(ResponseError(OOM))
    assert oom.http_status == 503
    assert "out of memory" in oom.message and "maxmemory" in oom.message
    refused = redis_error(
        NoPermissionError("this user has no permissions to run the 'keys' command")
    )
    assert refused.http_status == 503 and "credentials" in refused.message
    assert "credentials" in redis_error(AuthenticationError("Authentication required.")).message
    gone = redis_error(ConnectionError("Error 111 connecting to 127.0.0.1:6379."))
    assert gone.http_status == 503 and gone.message.startswith("Redis unavailable: Error 111")


async def test_an_uncaught_redis_oom_is_a_503(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    async def full(self: FunctionRegistry) -> None:
        raise ResponseError(OOM)

    monkeypatch.setattr(FunctionRegistry, "list", full)
    resp = await gw.client.get("/v1/functions")
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"]["type"] == "ServiceUnavailable"
    assert "out of memory" in body["error"]["message"]


def test_a_resp3_clients_refusal_is_a_credentials_problem_too() -> None:
    hello = ResponseError(
        "HELLO must be called with the client already authenticated, otherwise the HELLO "
        "AUTH <user> <pass> option can be used"
    )
    assert "credentials" in redis_error(hello).message
