"""The abuse suite (issue 10): every operation of gateway/openapi.yaml fuzzed with
schemathesis against a real platform (gateway, worker, Redis, registry, Docker).

Two passes over every operation, cases drawn by Hypothesis from the document, both
conforming (positive) and not (negative):

* **with the admin key**: no server error (a 5xx is allowed only where it is a function's
  own outcome: a contract error of an invocation, or a web function's answer), and the
  answer conforms to the document (status, content type, headers, body schema);
* **without a key, and with a wrong one** (made-up, wrong secret, revoked admin key, HTTP
  Basic): every ``/v1/`` route but the registry's token route answers 401 (or a 4xx of an
  earlier intake check), never 2xx, never 5xx; a web function with ``auth: key`` is
  refused too.

The platform is a private one (its own key prefix): the fuzz deletes and replaces
functions, creates and revokes keys. Functions (event, failing, public and key web ones)
and records (invocations, a dead letter, a batch, a key) are made first and the path
parameters of some cases are fixed to them, so that routes reach real records and real
instances (max_instances 1: the fuzz cannot start a fleet). The figures are printed (run
with ``-s``) and recorded in docs/security.md ("Abuse suite and its figures").

schemathesis sends with ``requests`` (blocking): the cases run in a thread, while the
in-process gateway keeps serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from requests.structures import CaseInsensitiveDict
from schemathesis import APIOperation, Case, GenerationMode, Response
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.logs import parse_bool
from shared.spec import SPEC_FIELDS
from tests.credentials import ADMIN_HEADERS, TEST_ADMIN_KEY
from tests.integration.conftest import TESTFN, RegistryInfo, running_platform, unique

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "gateway/openapi.yaml"

Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]

# Cases per operation and generation mode: with the admin key (positive, negative) and
# without a valid key (positive, negative; each with one of the test's bad credentials).
# About 7 000 requests in all; about 75 s on 2 cores (the platform's start included).
ADMIN_EXAMPLES = 60
ANON_EXAMPLES = 30
REQUEST_TIMEOUT_S = (5.0, 60.0)  # connect, read

EVENT_IMAGE = "imagefn-examples/hello-event:latest"
WEB_IMAGE = "imagefn-examples/web-app:latest"
TOKEN_ROUTE = "/v1/registry/token"
DEPLOY = "PUT /v1/functions/{name}"
CREATE_KEY = "POST /v1/keys"
VALID_SCOPES = ["read:fz-*", "invoke:nothing", "logs:*", "deploy:fz-event-*"]
# Operations that remove what the cases of others look for: run last, in this order.
REMOVERS = [
    "POST /v1/functions/{name}/dlq/redrive",
    "DELETE /v1/functions/{name}/dlq/{request_id}",
    "DELETE /v1/functions/{name}/dlq",
    "DELETE /v1/functions/{name}",
]
# Routes of the web-app example (examples/web-app/app.py).
WEB_APP_PATHS = ["echo", "items"]
OPEN_ROUTES = frozenset({"/healthz", "/openapi.yaml"})
# What a /v1/ route may answer a caller without a valid key: 401, or an earlier refusal
# (bad request line or header, no such route or method, body too large, CSRF body type,
# Host not allowed, header too large).
ANON_REFUSALS = frozenset({400, 401, 404, 405, 413, 415, 421, 431})
# 5xx answers that are a function's outcome under the image-function contract, not a
# failure of the platform (the gateway names them in X-Scf-Error-Type).
FUNCTION_OUTCOMES = frozenset(
    {
        "UserCodeError",
        "UserProcessExited",
        "OutOfMemory",
        "ResultTooLarge",
        "FunctionTimeout",
    }
)
# Requests that keep streaming until the client leaves (a blocking client would wait for
# its timeout): their flags are turned off when a case sets them.
STREAMING_FLAGS = {
    "GET /v1/functions/{name}/logs": ("follow", "wait_report"),
    "GET /v1/batches/{batch_id}/results": ("follow",),
}
# schemathesis's not_a_server_error is not among them: exchange() judges every 5xx (a
# function's own outcome passes, anything else is a server error).
CONFORMANCE_CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@dataclass
class Tally:
    """What one pass saw. Findings are kept per group (operation and kind), with the
    first few examples of each."""

    operations: set[str] = field(default_factory=set)
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)
    accepted_unauthenticated: Counter[str] = field(default_factory=Counter)
    unexpected_refusals: Counter[str] = field(default_factory=Counter)
    nonconforming: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    function_outcomes: int = 0
    unsendable: int = 0
    seconds: float = 0.0

    def note(self, kind: Counter[str], group: str, example: str) -> None:
        kind[group] += 1
        examples = self.examples.setdefault(group, [])
        if len(examples) < 2:
            examples.append(example)

    def answered_2xx(self) -> int:
        return len({op for (op, status) in self.by_operation if 200 <= status < 300})

    def summary(self, title: str) -> str:
        return (
            f"{title}: {len(self.operations)} operations "
            f"({self.answered_2xx()} answered 2xx at least once), {self.cases} cases "
            f"({self.unsendable} not sendable) in {self.seconds:.0f} s: "
            f"{self.server_errors.total()} server errors, "
            f"{self.accepted_unauthenticated.total()} accepted unauthenticated, "
            f"{self.unexpected_refusals.total()} unexpected refusals, "
            f"{self.nonconforming.total()} nonconforming answers, "
            f"{self.function_outcomes} functions' own 5xx; "
            f"statuses {dict(sorted(self.statuses.items()))}"
        )

    def per_operation(self) -> list[str]:
        lines = []
        for op in sorted(self.operations):
            counts = sorted((st, n) for (o, st), n in self.by_operation.items() if o == op)
            lines.append(f"    {op}: " + " ".join(f"{st}x{n}" for st, n in counts))
        return lines

    def details(self) -> list[str]:
        lines = []
        for title, kind in (
            ("server error", self.server_errors),
            ("accepted unauthenticated", self.accepted_unauthenticated),
            ("unexpected refusal", self.unexpected_refusals),
            ("nonconforming", self.nonconforming),
        ):
            for group, count in kind.most_common():
                lines.append(f"  {title} x{count}: {group}")
                lines.extend(f"      e.g. {e}" for e in self.examples[group])
        return lines


@dataclass(frozen=True)
class Targets:
    """What exists on the platform before the fuzz: some cases' path parameters are fixed
    to it, so that they reach real records instead of stopping at a 404."""

    event: str
    failing: str  # every event fails: its dead letters are there to find
    web_public: str
    web_key: str
    # Path parameter -> values that exist (invocation and batch ids, a key to revoke).
    known: dict[str, list[str]] = field(default_factory=dict)

    def values_for(self, op: Operation, parameter: str) -> list[str]:
        if parameter == "name":
            web = op.path.startswith("/web/")
            if web:
                return [self.web_public, self.web_key]
            return [self.event, self.web_public, self.failing]
        if parameter == "path":
            return WEB_APP_PATHS
        return self.known.get(parameter, [])

    def path_variants(self, op: Operation) -> list[dict[str, str]]:
        """Path parameters to fix, one mapping per variant (the others are drawn)."""
        values = {p: self.values_for(op, p) for p in re.findall(r"{(\w+)}", op.path)}
        values = {p: v for p, v in values.items() if v}
        count = max((len(v) for v in values.values()), default=0)
        return [{p: v[i % len(v)] for p, v in values.items()} for i in range(count)]


def describe(case: AnyCase, response: Response, note: str = "") -> str:
    where = f"{case.operation.method.upper()} {case.formatted_path}"
    answer = response.text_lossy()[:300].replace("\n", " ")
    return f"{where} query={case.query!r} -> {response.status_code} {answer} {note}".strip()


def tame(case: AnyCase) -> None:
    """Turn off the flags that make an answer stream until the client leaves."""
    for flag in STREAMING_FLAGS.get(case.operation.label, ()):
        raw = (case.query or {}).get(flag)
        if isinstance(raw, str):
            try:
                on = parse_bool(flag, raw)
            except Exception:  # not a boolean: the gateway refuses it, as it should
                continue
            if on:
                case.query[flag] = "false"
        elif raw is not None:
            case.query[flag] = "false"


class NoAnswer(Exception):
    """The gateway closed the connection or did not answer in time."""


def send(
    session: requests.Session, base_url: str, case: AnyCase, authorization: str | None
) -> Response | None:
    """The case's answer, sent with ``authorization`` (None: no such header) in place of
    the one schemathesis drew from the security scheme; None when ``requests`` cannot put
    the case on the wire (a header value it refuses, say): the gateway never saw it."""
    tame(case)
    # Set on the case itself, not passed to call(): a negative case that "removes" the
    # header would strip it again from what call() adds.
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if authorization is not None:
        headers["Authorization"] = authorization
    case.headers = CaseInsensitiveDict(headers)
    try:
        return case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise NoAnswer(f"{type(e).__name__}: {e}") from e
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, ValueError):
        return None


def exchange(
    session: requests.Session,
    base_url: str,
    case: AnyCase,
    authorization: str | None,
    tally: Tally,
) -> Response | None:
    """Send the case and count its answer; the answer, unless it is settled already (not
    sent, no answer, a 5xx that is not a function's own outcome: a server error)."""
    label = case.operation.label
    tally.cases += 1
    try:
        response = send(session, base_url, case, authorization)
    except NoAnswer as e:
        tally.note(tally.server_errors, f"{label} no answer", f"{case.formatted_path} {e}")
        return None
    if response is None:
        tally.unsendable += 1
        return None
    status = response.status_code
    tally.statuses[status] += 1
    tally.by_operation[label, status] += 1
    if status < 500:
        return response
    why = classify_5xx(case, response)
    if why is None:
        tally.function_outcomes += 1
        return response
    example = describe(case, response, f"(Authorization: {authorization!r})")
    tally.note(tally.server_errors, f"{label} {status} {why}", example)
    return None


def run_cases(
    strategy: st.SearchStrategy[Any], max_examples: int, on_case: Callable[[Any], None]
) -> None:
    """Draw ``max_examples`` cases (deterministically) and hand each to ``on_case``, which
    records what it saw and never raises: every case runs, none is shrunk. An operation
    with nothing to get wrong (no parameters, no body) has no negative cases."""

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(drawn=strategy)
    def draw(drawn: Any) -> None:
        on_case(drawn)

    with contextlib.suppress(Unsatisfiable):
        draw()


def deployable(case: AnyCase) -> AnyCase:
    """A conforming spec made deployable: its image one the registry holds (a made-up one
    stops the deploy at the registry, before the rest of the spec matters)."""
    if isinstance(case.body, dict):
        # The document's spec is open (see FunctionSpec there); the gateway's is not.
        spec = {k: v for k, v in case.body.items() if k in SPEC_FIELDS and k != "name"}
        case.body = {**spec, "image": EVENT_IMAGE}
    return case


def with_valid_scopes(case: AnyCase) -> AnyCase:
    """A conforming new key whose scopes the gateway understands (the document has them as
    free strings): the key is created."""
    if isinstance(case.body, dict):
        body: dict[str, Any] = dict(case.body)
        body["scopes"] = VALID_SCOPES[: 1 + len(body.get("name") or "") % len(VALID_SCOPES)]
        case.body = body
    return case


def case_strategies(
    op: Operation, mode: GenerationMode, targets: Targets
) -> st.SearchStrategy[AnyCase]:
    """The operation's cases; where it has path parameters, some on what exists (each
    deployed function, a known invocation...). Conforming deploys go to made-up names
    (they publish functions nothing calls), half of them with an image the registry
    holds; half the conforming new keys have scopes that mean something."""
    free = op.as_strategy(generation_mode=mode)
    if op.label == DEPLOY and mode is GenerationMode.POSITIVE:
        return st.one_of(free, free.map(deployable))
    if op.label == CREATE_KEY and mode is GenerationMode.POSITIVE:
        return st.one_of(free, free.map(with_valid_scopes))
    fixed = [
        op.as_strategy(generation_mode=mode, path_parameters=variant)
        for variant in targets.path_variants(op)
    ]
    return st.one_of(free, *fixed)


def header(response: Response, name: str) -> str | None:
    values = response.headers.get(name.lower())
    return values[0] if values else None


def classify_5xx(case: AnyCase, response: Response) -> str | None:
    """None when a 5xx is a function's own outcome; else why it is a server error."""
    error_type = header(response, "X-Scf-Error-Type")
    path = case.operation.path
    if path.startswith("/web/") and error_type is None:
        return None  # the web function's own answer, passed through
    if (path.startswith("/web/") or path.endswith("/invoke")) and error_type in FUNCTION_OUTCOMES:
        return None
    return f"server error {error_type or ''}".strip()


def check_conformance(case: AnyCase, response: Response, tally: Tally) -> None:
    """Whether the answer is one the document describes (status, content type, headers,
    body); web functions' answers are their own, not the document's."""
    if case.operation.path.startswith("/web/"):
        return
    try:
        case.validate_response(response, checks=CONFORMANCE_CHECKS)
    except FailureGroup as failures:
        for failure in failures.exceptions:
            group = f"{case.operation.label} {response.status_code} {failure.title}"
            example = describe(case, response, failure.message[:300])
            tally.note(tally.nonconforming, group, example)


def admin_pass(base_url: str, ops: Iterable[Operation], targets: Targets, tally: Tally) -> None:
    started = time.monotonic()
    with requests.Session() as session:
        for op in ops:
            tally.operations.add(op.label)

            def on_case(case: AnyCase) -> None:
                admin = ADMIN_HEADERS["Authorization"]
                response = exchange(session, base_url, case, admin, tally)
                if response is not None:
                    check_conformance(case, response, tally)

            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run_cases(case_strategies(op, mode, targets), ADMIN_EXAMPLES, on_case)
    tally.seconds = time.monotonic() - started


def anonymous_pass(
    base_url: str,
    ops: Iterable[Operation],
    targets: Targets,
    bad_auth: list[str | None],
    tally: Tally,
) -> None:
    started = time.monotonic()
    with requests.Session() as session:
        for op in ops:
            tally.operations.add(op.label)

            def on_case(drawn: tuple[AnyCase, str | None]) -> None:
                case, auth = drawn
                response = exchange(session, base_url, case, auth, tally)
                if response is None:
                    return
                check_conformance(case, response, tally)
                status, label = response.status_code, case.operation.label
                path = case.operation.path
                example = describe(case, response, f"(Authorization: {auth!r})")
                if path in OPEN_ROUTES or path == TOKEN_ROUTE:
                    return
                # A 5xx that got this far is a function's own outcome: the call went through.
                went_through = status < 400 or status >= 500
                if path.startswith("/web/"):
                    # Only a function whose spec says auth: key must refuse. Whatever it
                    # answers itself (its 404 too) carries no X-Scf-Error-Type.
                    platform_refusal = header(response, "X-Scf-Error-Type") is not None
                    if case.path_parameters.get("name") == targets.web_key and (
                        went_through or not platform_refusal
                    ):
                        tally.note(tally.accepted_unauthenticated, f"{label} {status}", example)
                    return
                if went_through:
                    tally.note(tally.accepted_unauthenticated, f"{label} {status}", example)
                elif status not in ANON_REFUSALS:
                    tally.note(tally.unexpected_refusals, f"{label} {status}", example)

            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = st.tuples(case_strategies(op, mode, targets), st.sampled_from(bad_auth))
                run_cases(strategy, ANON_EXAMPLES, on_case)
    tally.seconds = time.monotonic() - started


def ordered(ops: list[Operation]) -> list[Operation]:
    """What removes the records that other cases look for goes last, in this order."""

    def rank(op: Operation) -> int:
        return REMOVERS.index(op.label) + 1 if op.label in REMOVERS else 0

    return sorted(ops, key=rank)


async def deploy(client: aiohttp.ClientSession, url: str, name: str, spec: dict[str, Any]) -> None:
    async with client.put(f"{url}/v1/functions/{name}", json=spec) as resp:
        assert resp.status in (200, 201), await resp.text()


async def call(
    client: aiohttp.ClientSession, method: str, url: str, expect: int, **kw: Any
) -> tuple[Any, str]:
    """(JSON answer, X-Request-Id) of a set-up call that must answer ``expect``."""
    async with client.request(method, url, **kw) as resp:
        assert resp.status == expect, await resp.text()
        return await resp.json(), resp.headers["X-Request-Id"]


async def existing_records(
    client: aiohttp.ClientSession, url: str, event: str, failing: str
) -> dict[str, Any]:
    """Records for the fuzz to find: a sync and an async invocation, a dead letter, a batch
    (no scheduler runs: it stays running), a key to revoke; and a revoked admin key to
    call with."""
    invoke = f"{url}/v1/functions/{event}/invoke"
    as_event = {"X-Imagefn-Invocation-Type": "Event"}
    _, sync_id = await call(client, "POST", invoke, 200, json={"name": "fuzz"})
    accepted, _ = await call(client, "POST", invoke, 202, json={}, headers=as_event)
    fails, _ = await call(
        client, "POST", f"{url}/v1/functions/{failing}/invoke", 202, json={}, headers=as_event
    )
    deadline = time.monotonic() + 60
    while (await call(client, "GET", f"{url}/v1/functions/{failing}/dlq", 200))[0]["count"] < 1:
        assert time.monotonic() < deadline, "the failing event was not dead-lettered"
        await asyncio.sleep(0.2)
    batch, _ = await call(client, "POST", f"{url}/v1/functions/{event}/batches", 202, json=[1, 2])
    victim, _ = await call(
        client, "POST", f"{url}/v1/keys", 201, json={"name": "fz-victim", "scopes": ["read:*"]}
    )
    revoked, _ = await call(
        client, "POST", f"{url}/v1/keys", 201, json={"name": "fz-revoked", "scopes": ["admin"]}
    )
    await call(client, "DELETE", f"{url}/v1/keys/{revoked['id']}", 200)
    return {
        # In the order of the names (Targets.values_for): the dead letter goes with the
        # failing function.
        "request_id": [sync_id, accepted["request_id"], fails["request_id"]],
        "batch_id": [batch["batch_id"]],
        "key_id": [victim["id"]],
        "revoked_key": revoked["key"],
    }


async def test_fuzz_every_route_with_and_without_credentials(
    pushed_images: None,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
    client: aiohttp.ClientSession,
) -> None:
    schema = schemathesis.openapi.from_path(SCHEMA_PATH)
    ops = []
    for result in schema.get_all_operations():
        assert not isinstance(result, Err), result.err()
        ops.append(result.ok())
    ops = ordered(ops)
    event, failing = unique("fz-event"), unique("fz-failing")
    web_public, web_key = unique("fz-web"), unique("fz-webkey")
    # No access log: thousands of lines that would bury the figures.
    quiet = {"IMAGEFN_ACCESS_LOG": "0"}
    async with running_platform(redis_url, log_dir, registry, workers=1, extra_env=quiet) as p:
        small = {"max_instances": 1, "memory_mb": 128, "timeout_s": 5}
        await deploy(client, p.url, event, {"image": EVENT_IMAGE, **small})
        await deploy(
            client,
            p.url,
            failing,
            {
                "image": TESTFN,
                "env": {"TESTFN_FAIL_STATUS": "500", "TESTFN_QUIET": "1"},
                "async": {"max_retries": 0},
                **small,
            },
        )
        web = {"image": WEB_IMAGE, "type": "web", **small}
        await deploy(client, p.url, web_public, {**web, "auth": "public"})
        await deploy(client, p.url, web_key, web)
        known = await existing_records(client, p.url, event, failing)
        targets = Targets(event, failing, web_public, web_key, known)
        bad_auth: list[str | None] = [
            None,
            "Bearer ifn_0123456789ab_not-the-secret-000000000000000000",
            "Bearer ifn_nosuchkey000_" + "x" * 34,
            f"Bearer {known.pop('revoked_key')}",
            f"Basic {TEST_ADMIN_KEY}",
            "Bearer",
        ]
        anonymous, admin = Tally(), Tally()
        # Without a key first: the admin pass deletes and replaces functions.
        await asyncio.to_thread(anonymous_pass, p.url, ops, targets, bad_auth, anonymous)
        await asyncio.to_thread(admin_pass, p.url, ops, targets, admin)

    print()
    print("\n".join([anonymous.summary("without a valid key"), *anonymous.details()]))
    print("\n".join([admin.summary("with the admin key"), *admin.details()]))
    for title, tally in (("without a valid key", anonymous), ("with the admin key", admin)):
        print("\n".join([f"statuses per operation, {title}:", *tally.per_operation()]))
    assert len(admin.operations) == len(ops) and len(anonymous.operations) == len(ops)
    assert not admin.server_errors and not anonymous.server_errors
    assert not anonymous.accepted_unauthenticated
    assert not anonymous.unexpected_refusals
    assert not admin.nonconforming and not anonymous.nonconforming
