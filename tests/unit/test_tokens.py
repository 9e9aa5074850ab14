"""gateway.tokens and gateway.token_service: key ids, token claims and signatures, scope
parsing, grants, and the token route over a tiny app (no registry here; the registry's
view is in tests/integration/test_registry_auth.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from structlog.testing import capture_logs

from gateway import token_service
from gateway.context import SETTINGS, TOKENS
from gateway.tokens import Access, TokenIssuer, grant, libtrust_key_id, parse_scope
from shared.errors import InvalidRequest
from shared.settings import WORKER_USER, RegistrySettings, Settings, load_settings
from tests.integration.registry_support import make_token_keys

# A public key and its libtrust key id, the id computed with openssl and coreutils:
#   openssl pkey -pubout -outform DER | sha256sum | cut -c1-60 | xxd -r -p \
#     | base32 -w0 | tr -d = | sed 's/..../&:/g; s/:$//'
VECTOR_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAp0VwpqYF1yxqbhfsgtzQ
w3MsUo5jvvkDl4E0xSA1i+LBFAQHXG+Pr0o5bu8h5MPneXq2saVc6h0NbCo2G9yP
EOqLsQK+LqqatN+2N6y1cfGm3QZeCdBFuKsxExcpbBcj3KQ80HoZ7iDYgWuHqgRc
8u1Z9jhKwoZCOQA4353HwXr2rdC1CplX8j0giLdJB//a7bSIvHFcGN3TfKtEPxQK
2jxMs8DPQsZZ+xpPjsE+0udewhKeDi/R/ho1upzkHSI2NLYtAMUJ8bKLjj3JTcFB
HPiZyfhneNi1ICLOcaWcq9KGEEx+YkJE9Kc/gK8KHabEzcyPDCJAoVYoh3owHPIN
QwIDAQAB
-----END PUBLIC KEY-----
"""
VECTOR_KEY_ID = "QCXS:H5HA:NGYQ:CVBC:4ZAW:OBG4:B4ZU:LTSQ:LJM3:VTLT:WKMR:FAF4"

DEPLOY_PASSWORD = "deploy-pw-0123456789"
WORKER_SECRET = "worker-secret-9876543210"


def b64json(part: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def verify(token: str, cert_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a token whose RS256 signature the certificate's key verifies."""
    header, payload, signature = token.split(".")
    key = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    sig = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    key.verify(sig, f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return b64json(header), b64json(payload)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_token_keys(tmp_path_factory.mktemp("token-keys"))


@pytest.fixture
def issuer(keys: tuple[Path, Path]) -> TokenIssuer:
    return TokenIssuer.from_files(*keys, issuer="imagefn", service="imagefn-registry", ttl_s=300)


# -- key id --------------------------------------------------------------------------------


def test_key_id_matches_the_independently_computed_vector() -> None:
    key = serialization.load_pem_public_key(VECTOR_PUBLIC_KEY)
    assert isinstance(key, rsa.RSAPublicKey)
    assert libtrust_key_id(key) == VECTOR_KEY_ID


def test_key_id_shape(issuer: TokenIssuer) -> None:
    groups = issuer.key_id.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)
    assert set("".join(groups)) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


# -- issuing -------------------------------------------------------------------------------


def test_token_header_claims_and_signature(issuer: TokenIssuer, keys: tuple[Path, Path]) -> None:
    before = int(time.time())
    issued = issuer.issue("imagefn-worker", [Access("repository", "team/app", ("pull",))])
    header, claims = verify(issued.token, keys[1])
    assert header == {"typ": "JWT", "alg": "RS256", "kid": issuer.key_id}
    assert claims["iss"] == "imagefn"
    assert claims["sub"] == "imagefn-worker"
    assert claims["aud"] == "imagefn-registry"
    assert before <= claims["iat"] == claims["nbf"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 300
    assert len(claims["jti"]) == 32
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    assert issued.expires_in == 300
    assert issued.issued_at == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["iat"]))


def test_every_token_has_its_own_jti(issuer: TokenIssuer, keys: tuple[Path, Path]) -> None:
    a, b = (verify(issuer.issue("s", []).token, keys[1])[1] for _ in range(2))
    assert a["jti"] != b["jti"]
    assert a["access"] == []


def test_ttl_override_and_issue_time(issuer: TokenIssuer, keys: tuple[Path, Path]) -> None:
    issued = issuer.issue("s", [], ttl_s=1, now=1_000_000.7)
    claims = verify(issued.token, keys[1])[1]
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (1_000_000, 1_000_000, 1_000_001)
    assert issued.expires_in == 1
    assert issued.issued_at == "1970-01-12T13:46:40Z"


@pytest.mark.parametrize("ttl_s", [0, -5, 901, 3600])
def test_ttl_is_bounded_to_15_minutes(issuer: TokenIssuer, ttl_s: int) -> None:
    with pytest.raises(InvalidRequest, match="between 1 and 900"):
        issuer.issue("s", [], ttl_s=ttl_s)


def test_the_token_is_not_in_the_repr(issuer: TokenIssuer) -> None:
    issued = issuer.issue("s", [])
    assert issued.token not in repr(issued)


def test_a_certificate_of_another_key_is_refused(keys: tuple[Path, Path], tmp_path: Path) -> None:
    _, other_cert = make_token_keys(tmp_path)
    with pytest.raises(InvalidRequest, match="does not belong"):
        TokenIssuer.from_files(keys[0], other_cert, issuer="i", service="s", ttl_s=60)


def test_missing_key_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"token\.key.*deploy/registry\.sh"):
        TokenIssuer.from_files(
            tmp_path / "token.key", tmp_path / "token.crt", issuer="i", service="s", ttl_s=60
        )


def test_from_settings(keys: tuple[Path, Path]) -> None:
    settings = RegistrySettings(
        signing_key=str(keys[0]), signing_cert=str(keys[1]), issuer="me", token_ttl_s=42
    )
    issuer = TokenIssuer.from_settings(settings)
    assert (issuer.issuer, issuer.service, issuer.ttl_s) == ("me", "imagefn-registry", 42)


# -- scopes and grants -----------------------------------------------------------------------


def test_parse_scope() -> None:
    assert parse_scope("repository:team/app:pull,push") == [
        ("repository", "team/app", ("pull", "push"))
    ]
    assert parse_scope("repository:a/b/c-d_e.f:pull") == [("repository", "a/b/c-d_e.f", ("pull",))]
    assert parse_scope("registry:catalog:*") == [("registry", "catalog", ("*",))]
    assert parse_scope("repository:x:pull,pull,push,pull") == [
        ("repository", "x", ("pull", "push"))
    ]
    assert parse_scope("repository(plugin):x:pull") == [("repository(plugin)", "x", ("pull",))]
    # Several resource scopes in one parameter, separated by spaces.
    assert parse_scope("repository:a:pull  repository:b:push") == [
        ("repository", "a", ("pull",)),
        ("repository", "b", ("push",)),
    ]
    assert parse_scope("") == []


@pytest.mark.parametrize(
    "scope",
    [
        "repository",
        "repository:name",
        "repository::pull",
        ":name:pull",
        "repository:name:",
        "repository:Upper/Case:pull",
        "repository:a//b:pull",
        "repository:-a:pull",
        "repository:name:pull,",
        "repository:name:PULL",
        "Repository:name:pull",
        "repository:" + "a" * 256 + ":pull",
    ],
)
def test_parse_scope_refuses_malformed_scopes(scope: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid scope"):
        parse_scope(scope)


def test_grant_is_the_intersection_per_repository() -> None:
    requested = [
        *parse_scope("repository:a:pull,push"),
        *parse_scope("repository:b:push"),
        *parse_scope("registry:catalog:*"),
        *parse_scope("repository:c:*"),
        *parse_scope("repository:a:delete,pull"),
    ]
    assert grant(requested, frozenset({"pull", "push"})) == [
        Access("repository", "a", ("pull", "push")),
        Access("repository", "b", ("push",)),
    ]
    assert grant(requested, frozenset({"pull"})) == [Access("repository", "a", ("pull",))]
    assert grant(requested, frozenset()) == []


# -- the token route -------------------------------------------------------------------------


def registry_settings(keys: tuple[Path, Path], **overrides: Any) -> RegistrySettings:
    base = RegistrySettings(
        signing_key=str(keys[0]),
        signing_cert=str(keys[1]),
        deploy_password=DEPLOY_PASSWORD,
        worker_secret=WORKER_SECRET,
    )
    return dataclasses.replace(base, **overrides)


async def token_client(
    settings: RegistrySettings, *, with_issuer: bool = True
) -> TestClient[Any, Any]:
    app = web.Application()
    app[SETTINGS] = Settings(registry=settings)
    if with_issuer:
        app[TOKENS] = TokenIssuer.from_settings(settings)
    app.router.add_routes(token_service.routes)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def tokens(keys: tuple[Path, Path]) -> AsyncIterator[TestClient[Any, Any]]:
    client = await token_client(registry_settings(keys))
    yield client
    await client.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def ask(
    client: TestClient[Any, Any],
    headers: dict[str, str] | None = None,
    *scopes: str,
    service: str | None = "imagefn-registry",
    **extra: str,
) -> Any:
    params: list[tuple[str, str]] = [("scope", s) for s in scopes]
    if service is not None:
        params.append(("service", service))
    params.extend(extra.items())
    return await client.get(token_service.TOKEN_PATH, params=params, headers=headers or {})


async def granted(resp: Any, keys: tuple[Path, Path]) -> list[dict[str, Any]]:
    body = await resp.json()
    assert resp.status == 200, body
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    assert resp.headers["Cache-Control"] == "no-store"
    access: list[dict[str, Any]] = verify(body["token"], keys[1])[1]["access"]
    return access


async def test_the_deployer_gets_push_and_pull(
    tokens: TestClient[Any, Any], keys: tuple[Path, Path]
) -> None:
    resp = await ask(tokens, basic("imagefn-deployer", DEPLOY_PASSWORD), "repository:t/a:push,pull")
    assert await granted(resp, keys) == [
        {"type": "repository", "name": "t/a", "actions": ["push", "pull"]}
    ]


async def test_a_worker_gets_pull_only_and_push_is_silently_dropped(
    tokens: TestClient[Any, Any], keys: tuple[Path, Path]
) -> None:
    resp = await ask(tokens, basic(WORKER_USER, WORKER_SECRET), "repository:t/a:push,pull")
    assert await granted(resp, keys) == [{"type": "repository", "name": "t/a", "actions": ["pull"]}]
    resp = await ask(tokens, basic(WORKER_USER, WORKER_SECRET), "repository:t/a:push")
    assert await granted(resp, keys) == []


async def test_repeated_scopes_unknown_types_and_no_scope(
    tokens: TestClient[Any, Any], keys: tuple[Path, Path]
) -> None:
    deployer = basic("imagefn-deployer", DEPLOY_PASSWORD)
    resp = await ask(
        tokens, deployer, "repository:a:pull", "repository:b:push", "registry:catalog:*"
    )
    assert await granted(resp, keys) == [
        {"type": "repository", "name": "a", "actions": ["pull"]},
        {"type": "repository", "name": "b", "actions": ["push"]},
    ]
    # No scope (docker login, /v2/ checks): a token that grants nothing.
    assert await granted(await ask(tokens, deployer), keys) == []
    # The account the engine names must be the one that logged in.
    resp = await ask(tokens, deployer, "repository:a:pull", account="imagefn-deployer")
    assert await granted(resp, keys) == [{"type": "repository", "name": "a", "actions": ["pull"]}]


async def error_of(resp: Any, status: int, type_name: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.headers["X-Scf-Error-Type"] == type_name
    err: dict[str, Any] = (await resp.json())["error"]
    assert err["type"] == type_name and err["request_id"]
    return err


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        basic(WORKER_USER, "wrong"),
        basic("imagefn-deployer", WORKER_SECRET),
        basic("someone", DEPLOY_PASSWORD),
        basic(WORKER_USER, ""),
    ],
)
async def test_anonymous_and_wrong_credentials_get_401_with_a_basic_challenge(
    tokens: TestClient[Any, Any], headers: dict[str, str] | None
) -> None:
    resp = await ask(tokens, headers, "repository:t/a:pull")
    await error_of(resp, 401, "Unauthorized")
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="imagefn"'


async def test_a_principal_without_a_configured_password_cannot_log_in(
    keys: tuple[Path, Path],
) -> None:
    client = await token_client(registry_settings(keys, deploy_password="", worker_secret=""))
    try:
        for user in ("imagefn-deployer", WORKER_USER):
            await error_of(
                await ask(client, basic(user, ""), "repository:a:pull"), 401, "Unauthorized"
            )
    finally:
        await client.close()


@pytest.mark.parametrize("service", [None, "", "other-registry"])
async def test_another_service_is_an_invalid_request(
    tokens: TestClient[Any, Any], service: str | None
) -> None:
    resp = await ask(
        tokens, basic(WORKER_USER, WORKER_SECRET), "repository:a:pull", service=service
    )
    err = await error_of(resp, 400, "InvalidRequest")
    assert "imagefn-registry" in err["message"]


async def test_bad_scope_and_foreign_account_are_invalid_requests(
    tokens: TestClient[Any, Any],
) -> None:
    worker = basic(WORKER_USER, WORKER_SECRET)
    err = await error_of(await ask(tokens, worker, "repository:UP:pull"), 400, "InvalidRequest")
    assert "invalid scope" in err["message"]
    resp = await ask(tokens, worker, "repository:a:pull", account="imagefn-deployer")
    await error_of(resp, 400, "InvalidRequest")


async def test_without_a_signing_key_the_route_is_unavailable(keys: tuple[Path, Path]) -> None:
    client = await token_client(registry_settings(keys), with_issuer=False)
    try:
        resp = await ask(client, basic(WORKER_USER, WORKER_SECRET), "repository:a:pull")
        await error_of(resp, 503, "ServiceUnavailable")
    finally:
        await client.close()


async def test_logs_name_subject_scope_and_grant_but_no_secret(
    tokens: TestClient[Any, Any],
) -> None:
    with capture_logs() as logs:
        resp = await ask(tokens, basic(WORKER_USER, WORKER_SECRET), "repository:t/a:push,pull")
        token = (await resp.json())["token"]
        await ask(tokens, basic(WORKER_USER, "a-wrong-password"), "repository:t/a:pull")
    issued = [e for e in logs if e["event"] == "registry_token_issued"]
    assert issued == [
        {
            "event": "registry_token_issued",
            "log_level": "info",
            "subject": WORKER_USER,
            "scope": ["repository:t/a:push,pull"],
            "granted": ["t/a:pull"],
            "expires_in": 300,
        }
    ]
    text = repr(logs)
    for secret in (token, WORKER_SECRET, "a-wrong-password"):
        assert secret not in text


# -- settings --------------------------------------------------------------------------------


def test_registry_settings_defaults_and_overrides() -> None:
    assert load_settings({}).registry == RegistrySettings()
    env = {
        "IMAGEFN_REGISTRY": "10.0.0.5:5001",
        "IMAGEFN_REGISTRY_SERVICE": "svc",
        "IMAGEFN_TOKEN_ISSUER": "iss",
        "IMAGEFN_TOKEN_TTL_S": "900",
        "IMAGEFN_TOKEN_KEY": "/k",
        "IMAGEFN_TOKEN_CERT": "/c",
        "IMAGEFN_DEPLOY_USER": "dep",
        "IMAGEFN_DEPLOY_PASSWORD": "dpw",
        "IMAGEFN_WORKER_SECRET": "wsec",
        "IMAGEFN_TOKEN_URL": "http://gw:1/v1/registry/token",
        "IMAGEFN_PULL_TIMEOUT_S": "30.5",
        "IMAGEFN_IMAGE_CACHE_MB": "100",
    }
    assert load_settings(env).registry == RegistrySettings(
        address="10.0.0.5:5001",
        service="svc",
        issuer="iss",
        token_ttl_s=900,
        signing_key="/k",
        signing_cert="/c",
        deploy_user="dep",
        deploy_password="dpw",
        worker_secret="wsec",
        token_url="http://gw:1/v1/registry/token",
        pull_timeout_s=30.5,
        image_cache_mb=100,
    )
    assert load_settings({k: "" for k in env}).registry == RegistrySettings()


@pytest.mark.parametrize("ttl", ["0", "901", "-1"])
def test_token_ttl_setting_is_bounded(ttl: str) -> None:
    with pytest.raises(InvalidRequest, match="IMAGEFN_TOKEN_TTL_S"):
        load_settings({"IMAGEFN_TOKEN_TTL_S": ttl})


def test_the_deployer_cannot_take_the_workers_name() -> None:
    with pytest.raises(InvalidRequest, match="IMAGEFN_DEPLOY_USER"):
        load_settings({"IMAGEFN_DEPLOY_USER": WORKER_USER})


def test_secrets_are_not_in_the_settings_repr() -> None:
    s = load_settings({"IMAGEFN_DEPLOY_PASSWORD": "pw-x1", "IMAGEFN_WORKER_SECRET": "sec-y2"})
    assert "pw-x1" not in repr(s) and "sec-y2" not in repr(s)
