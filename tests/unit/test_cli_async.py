"""``imagefn invoke --async``, ``imagefn invocation``, ``imagefn dlq ...`` and ``imagefn
batch ...`` against a stand-in gateway that records what the CLI sent and answers with
canned documents shaped as docs/architecture.md, section 15, and gateway/openapi.yaml
say. The gateway's own routes are tested on their side (test_gateway.py and the
integration suite)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cli import api, batchprogress
from cli import batch as batch_cli
from cli.asyncinv import (
    RESULT_PREVIEW_CHARS,
    TABLE_ERROR_CHARS,
    attempt_line,
    cmd_dlq_ls,
    cmd_dlq_purge,
    cmd_dlq_redrive,
    cmd_dlq_show,
    cmd_invocation,
    preview,
)
from cli.batch import (
    BLOCK_BYTES,
    Upload,
    cmd_batch_cancel,
    cmd_batch_results,
    cmd_batch_status,
    cmd_batch_submit,
)
from cli.batchprogress import progress_line
from cli.main import build_parser, cmd_invoke, main
from shared.errors import (
    BatchNotFound,
    FunctionNotFound,
    ImagefnError,
    InvalidRequest,
    InvocationNotFound,
    RequestTooLarge,
)

REPO = Path(__file__).resolve().parents[2]
T0 = 1795860000.0  # 2026-11-28T10:00:00Z

INVOCATION: dict[str, Any] = {
    "request_id": "req-retrying-1",
    "function": "hello",
    "version": 3,
    "qualifier": "prod",
    "mode": "async",
    "state": "retrying",
    "next_attempt_at": T0 + 10**6,  # far ahead: "in ... h"
    "attempts": [
        {
            "attempt": 1,
            "started_at": T0,
            "finished_at": T0 + 1.2345,
            "status": 500,
            "error": {"type": "UserCodeError", "message": "the function answered HTTP 500"},
            "timings_ms": {"run": 1234.5},
            "worker": "w-1",
            "instance": "imagefn-hello-1",
            "cold_start": True,
        },
        {
            "attempt": 2,
            "started_at": T0 + 60,
            "finished_at": T0 + 60.05,
            "status": 0,
            "error": {"type": "ConcurrencyLimitExceeded", "message": "max_concurrency 1"},
            "timings_ms": {},
            "worker": "w-2",
            "instance": "",
            "cold_start": None,
        },
    ],
    "duplicates": 1,
    "created_at": T0 - 1,
    "updated_at": T0 + 60.05,
}
SUCCEEDED: dict[str, Any] = {
    **INVOCATION,
    "request_id": "req-done-1",
    "state": "succeeded",
    "batch": "b-1",
    "index": 17,
    "duplicates": 0,
    "attempts": [{**INVOCATION["attempts"][0], "status": 200, "error": None, "cold_start": False}],
    "result": {
        "status": 200,
        "content_type": "application/json",
        "body": json.dumps({"rows": ["x" * 50] * 100}, indent=1),
    },
}
SUCCEEDED.pop("next_attempt_at")
DEAD: dict[str, Any] = {
    "request_id": "req-dead-1",
    "parked_at": T0 + 120,
    "reason": "retries exhausted",
    "qualifier": "prod",
    "version": 3,
    "attempts": INVOCATION["attempts"],
}
DEAD2: dict[str, Any] = {**DEAD, "request_id": "req-dead-2", "reason": "expired", "attempts": []}


def error_answer(err: ImagefnError, status: int | None = None) -> web.Response:
    # The gateway's error format (gateway/errors.py): details stand in the error object.
    body = {"error": {**err.to_dict(), "request_id": "gw-rid-1"}}
    return web.json_response(body, status=status or err.http_status)


class Stub:
    """What the stand-in answers, and what it was asked."""

    def __init__(self) -> None:
        # Headers as a case-insensitive mapping: urllib sends "X-request-id".
        self.requests: list[tuple[str, str, Mapping[str, str]]] = []
        self.bodies: list[Any] = []
        self.invocations = {d["request_id"]: d for d in (INVOCATION, SUCCEEDED)}
        self.dead = {d["request_id"]: d for d in (DEAD, DEAD2)}
        # batch submissions: what arrived, without keeping the body.
        self.uploads: list[dict[str, Any]] = []
        # Answered to GET /v1/batches/{id} one after the other; the last one repeats.
        self.statuses: list[dict[str, Any]] = [batch_status(10, 10, 0)]
        self.results = b"".join(result_line(i) for i in range(3))
        self.results_delay_s = 0.0
        self.endless_results = False
        # Once: end the results stream cleanly before this line / cut it in this line.
        self.results_end_at: int | None = None
        self.results_break_at: int | None = None
        self.reject_after_lines: int | None = None
        # Cut the connection after the first chunk of a batch, answering nothing.
        self.abort_upload = False

    def seen(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path_qs, request.headers.copy()))


def batch_status(total: int, done: int, failed: int, state: str = "") -> dict[str, Any]:
    state = state or ("running" if done < total else "completed")
    return {
        "batch_id": "b-1",
        "function": "hello",
        "qualifier": "$LATEST",
        "state": state,
        "total": total,
        "queued": total - done,
        "in_flight": 0 if state != "running" else 2,
        "succeeded": done - failed,
        "failed": failed,
        "cancelled": 0,
        "items_per_s": 12.5,
        "eta_s": (total - done) / 12.5,
        "created_at": T0,
        "finished_at": None if state == "running" else T0 + 42,
        "max_concurrency": 4,
    }


def result_line(i: int) -> bytes:
    doc = {"index": i, "request_id": f"b-1-{i}", "status": "succeeded", "result": {"n": i}}
    return json.dumps(doc).encode() + b"\n"


def build_stub_app(s: Stub) -> web.Application:
    routes = web.RouteTableDef()

    @routes.post("/v1/functions/{name}/invoke")
    async def invoke(request: web.Request) -> web.Response:
        s.seen(request)
        s.bodies.append(await request.read())
        name = request.match_info["name"]
        if name == "ghost":
            return error_answer(FunctionNotFound(f"function {name!r} not found"))
        if name == "big":
            return error_answer(RequestTooLarge("asynchronous event is 200000 bytes"))
        if name == "old-gateway" or request.headers.get("X-Imagefn-Invocation-Type") != "Event":
            return web.json_response({"ran": "now"})
        rid = request.headers.get("X-Request-Id", "gw-made-rid-1")
        answer: dict[str, Any] = {"request_id": rid, "function": name, "state": "queued"}
        answer["qualifier"] = "$LATEST"
        if rid == "sent-twice-1":
            answer["duplicate"] = True
        return web.json_response(answer, status=202)

    @routes.get("/v1/invocations/{rid}")
    async def invocation(request: web.Request) -> web.Response:
        s.seen(request)
        rid = request.match_info["rid"]
        if rid not in s.invocations:
            return error_answer(InvocationNotFound(f"no invocation {rid!r}"))
        return web.json_response(s.invocations[rid])

    @routes.get("/v1/functions/{name}/dlq")
    async def dlq_ls(request: web.Request) -> web.Response:
        s.seen(request)
        if request.match_info["name"] == "ghost":
            return error_answer(FunctionNotFound("function 'ghost' not found"))
        items = list(s.dead.values())
        offset, limit = int(request.query["offset"]), int(request.query["limit"])
        page = items[offset : offset + limit]
        return web.json_response({"function": "hello", "count": len(items), "items": page})

    @routes.get("/v1/functions/{name}/dlq/{rid}")
    async def dlq_show(request: web.Request) -> web.Response:
        s.seen(request)
        rid = request.match_info["rid"]
        if rid not in s.dead:
            return error_answer(InvocationNotFound(f"{rid!r} is not in the dead-letter queue"))
        entry = dict(s.dead[rid])
        if rid == "req-dead-1":
            entry["event"] = {"name": "you", "n": 1}
        else:
            entry["event_base64"] = "AAEC/w=="
        return web.json_response(entry)

    @routes.post("/v1/functions/{name}/dlq/redrive")
    async def dlq_redrive(request: web.Request) -> web.Response:
        s.seen(request)
        doc = await request.json()
        s.bodies.append(doc)
        ids = list(s.dead) if doc.get("all") else doc["ids"]
        found = [i for i in ids if i in s.dead]
        missing = [i for i in ids if i not in s.dead]
        return web.json_response({"function": "hello", "redriven": found, "missing": missing})

    @routes.delete("/v1/functions/{name}/dlq")
    async def dlq_purge(request: web.Request) -> web.Response:
        s.seen(request)
        return web.json_response({"function": "hello", "purged": len(s.dead)})

    @routes.delete("/v1/functions/{name}/dlq/{rid}")
    async def dlq_purge_one(request: web.Request) -> web.Response:
        s.seen(request)
        return web.json_response(
            {"function": "hello", "purged": int(request.match_info["rid"] in s.dead)}
        )

    @routes.post("/v1/functions/{name}/batches")
    async def submit(request: web.Request) -> web.Response:
        s.seen(request)
        name = request.match_info["name"]
        if name == "ghost":
            return error_answer(FunctionNotFound(f"function {name!r} not found"))
        # Read as a stream and keep nothing but counts, like the gateway's parser; NDJSON
        # lines are checked (arrays pass unchecked: the gateway's parser is not under test).
        check = request.content_type == "application/x-ndjson"
        digest, size, lines, tail, chunks = hashlib.sha256(), 0, 0, b"", 0
        async for chunk in request.content.iter_any():
            if s.abort_upload and request.transport is not None:
                request.transport.abort()
                return web.Response()  # never sent
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
            # The first line that is not JSON is refused, naming item and line.
            text = tail + chunk
            *complete, tail = text.split(b"\n")
            for raw in complete:
                lines += 1
                if s.reject_after_lines is not None and lines > s.reject_after_lines:
                    return error_answer(InvalidRequest("stop here", details={"line": lines}))
                try:
                    if check:
                        json.loads(raw)
                except ValueError:
                    item = lines - 1
                    return error_answer(
                        InvalidRequest(
                            f"batch item {item} (line {lines}): not valid JSON",
                            details={"item": item, "line": lines},
                        )
                    )
        s.uploads.append({"bytes": size, "lines": lines + bool(tail), "sha256": digest.hexdigest()})
        answer = {"batch_id": "b-1", "function": name, "qualifier": "$LATEST"}
        return web.json_response({**answer, "items": lines, "state": "running"}, status=202)

    @routes.get("/v1/batches/{id}")
    async def status(request: web.Request) -> web.Response:
        s.seen(request)
        if request.match_info["id"] != "b-1":
            return error_answer(BatchNotFound("no batch 'b-404'"))
        doc = s.statuses.pop(0) if len(s.statuses) > 1 else s.statuses[0]
        return web.json_response(doc)

    @routes.delete("/v1/batches/{id}")
    async def cancel(request: web.Request) -> web.Response:
        s.seen(request)
        doc = {**batch_status(10, 4, 1, "cancelled"), "cancelled": 5, "in_flight": 1}
        return web.json_response(doc)

    @routes.get("/v1/batches/{id}/results")
    async def results(request: web.Request) -> web.StreamResponse:
        s.seen(request)
        if request.match_info["id"] != "b-1":
            return error_answer(BatchNotFound("no batch 'b-404'"))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        if s.endless_results:
            # Until the reader goes away (the closed-stdout test).
            i = 0
            while True:
                await resp.write(result_line(i))
                i += 1
                await asyncio.sleep(0.001)
        start = int(request.query.get("start", 0))
        for n, line in enumerate(s.results.splitlines(keepends=True)[start:], start):
            if n == s.results_end_at:  # once: a gateway shutting down ends its streams
                s.results_end_at = None
                break
            if n == s.results_break_at and request.transport is not None:
                s.results_break_at = None
                await resp.write(line[:10])  # half a line, then the connection is gone
                request.transport.abort()
                return resp
            await resp.write(line)
            await asyncio.sleep(s.results_delay_s)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.add_routes(routes)
    return app


@pytest.fixture
async def stub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Stub]:
    # main() reads the credentials file deploy/setup.sh writes: never this machine's here.
    monkeypatch.setenv("IMAGEFN_ENV_FILE", str(tmp_path / "absent.env"))
    # Follow quickly: the progression is canned.
    monkeypatch.setattr(batchprogress, "POLL_INTERVAL_S", 0.01)
    monkeypatch.setattr(batch_cli, "RESUME_DELAY_S", 0.01)
    s = Stub()
    server = TestServer(build_stub_app(s))
    await server.start_server()
    monkeypatch.setenv("IMAGEFN_GATEWAY", str(server.make_url("")).rstrip("/"))
    yield s
    await server.close()


Run = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    async def go(*argv: str) -> tuple[int, str, str]:
        # The CLI blocks (urllib); the stand-in runs on this loop, so the CLI gets a thread.
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return go


# -- the parser ------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_invoke_async_and_invocation_arguments() -> None:
    assert parse("invoke", "hello").async_ is False
    args = parse("invoke", "hello", "--async", "-q", "prod")
    assert (args.fn, args.async_, args.qualifier) == (cmd_invoke, True, "prod")
    args = parse("invocation", "r-1")
    assert (args.fn, args.id, args.json) == (cmd_invocation, "r-1", False)
    assert parse("invocation", "r-1", "--json").json is True


def test_dlq_arguments() -> None:
    args = parse("dlq", "ls", "hello")
    assert (args.fn, args.name, args.limit, args.offset, args.json) == (
        cmd_dlq_ls,
        "hello",
        100,
        0,
        False,
    )
    args = parse("dlq", "ls", "hello", "--limit", "5", "--offset", "10", "--json")
    assert (args.limit, args.offset, args.json) == (5, 10, True)
    args = parse("dlq", "show", "hello", "r-1", "--json")
    assert (args.fn, args.name, args.id, args.json) == (cmd_dlq_show, "hello", "r-1", True)
    args = parse("dlq", "redrive", "hello", "--id", "a", "--id", "b", "-q", "prod")
    assert (args.fn, args.ids, args.all, args.qualifier) == (
        cmd_dlq_redrive,
        ["a", "b"],
        False,
        "prod",
    )
    args = parse("dlq", "redrive", "hello", "--all")
    assert (args.ids, args.all, args.qualifier) == (None, True, None)
    args = parse("dlq", "purge", "hello")
    assert (args.fn, args.name, args.id) == (cmd_dlq_purge, "hello", None)
    assert parse("dlq", "purge", "hello", "--id", "r-1").id == "r-1"


def test_batch_arguments() -> None:
    args = parse("batch", "submit", "hello", "items.ndjson")
    assert (args.fn, args.name, args.file, args.follow) == (
        cmd_batch_submit,
        "hello",
        "items.ndjson",
        False,
    )
    assert (args.qualifier, args.max_concurrency, args.max_retries, args.max_event_age) == (
        None,
        None,
        None,
        None,
    )
    argv = "batch submit hello - -q prod --max-concurrency 8 --max-retries 0 --max-event-age 60 -f"
    args = parse(*argv.split())
    assert (args.file, args.qualifier, args.follow) == ("-", "prod", True)
    assert (args.max_concurrency, args.max_retries, args.max_event_age) == (8, 0, 60)
    args = parse("batch", "status", "b-1", "--json")
    assert (args.fn, args.id, args.json, args.follow) == (cmd_batch_status, "b-1", True, False)
    args = parse("batch", "results", "b-1", "--follow")
    assert (args.fn, args.id, args.follow) == (cmd_batch_results, "b-1", True)
    assert parse("batch", "cancel", "b-1").fn is cmd_batch_cancel


@pytest.mark.parametrize(
    "argv",
    [
        ["invocation"],
        ["dlq"],
        ["dlq", "ls"],
        ["dlq", "ls", "hello", "--limit", "0"],
        ["dlq", "ls", "hello", "--limit", "1001"],
        ["dlq", "show", "hello"],
        ["dlq", "redrive", "hello"],  # --id or --all is required
        ["dlq", "redrive", "hello", "--id", "a", "--all"],  # not both
        ["batch"],
        ["batch", "submit", "hello"],
        ["batch", "submit", "hello", "f", "--max-retries", "-1"],
        ["batch", "submit", "hello", "f", "--max-concurrency", "0"],
        ["batch", "submit", "hello", "f", "--max-event-age", "soon"],
        ["batch", "results"],
        ["batch", "nope", "b-1"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: imagefn" in capsys.readouterr().err


# -- invoke --async -----------------------------------------------------------------------------


async def test_invoke_async_prints_the_request_id_and_state(stub: Stub, run: Run) -> None:
    code, out, err = await run("invoke", "hello", "--async", "--data", '{"k": 1}')
    assert (code, out) == (0, "gw-made-rid-1 queued\n")
    assert err == "see what became of it: imagefn invocation gw-made-rid-1\n"
    method, path, headers = stub.requests[-1]
    assert (method, path) == ("POST", "/v1/functions/hello/invoke")
    assert headers["X-Imagefn-Invocation-Type"] == "Event"
    assert stub.bodies[-1] == b'{"k": 1}'

    code, out, _ = await run("invoke", "hello", "--async", "--request-id", "sent-twice-1")
    assert code == 0
    assert out.startswith("sent-twice-1 queued (duplicate: ")
    assert stub.requests[-1][2]["X-Request-Id"] == "sent-twice-1"

    code, _, _ = await run("invoke", "hello", "--async", "-q", "prod")
    assert stub.requests[-1][1] == "/v1/functions/hello/invoke?qualifier=prod"


async def test_invoke_async_errors(stub: Stub, run: Run) -> None:
    code, out, err = await run("invoke", "ghost", "--async")
    assert (code, out) == (1, "")
    assert err == (
        "imagefn: FunctionNotFound: function 'ghost' not found\n  request id: gw-rid-1\n"
    )
    code, _, err = await run("invoke", "big", "--async")
    assert code == 1 and err.startswith("imagefn: RequestTooLarge: asynchronous event is 200000")

    sent = len(stub.requests)
    code, _, err = await run("invoke", "hello", "--async", "--log")
    assert code == 1 and err.startswith("imagefn: --log and --async do not go together")
    assert len(stub.requests) == sent  # refused before sending anything

    # A gateway that ignores the header ran the call: its result is shown, with the news.
    code, out, err = await run("invoke", "old-gateway", "--async")
    assert (code, out) == (1, '{"ran": "now"}\n')
    assert "ran the call synchronously (HTTP 200" in err


# -- imagefn invocation ---------------------------------------------------------------------------


def test_attempt_line_has_everything_about_an_attempt() -> None:
    line = attempt_line(INVOCATION["attempts"][0])
    assert line.split("  ") == [
        "#1",
        "2026-11-28T10:00:00.000Z",
        "1234 ms",
        "HTTP 500",
        "UserCodeError: the function answered HTTP 500",
        "worker w-1",
        "instance imagefn-hello-1",
        "cold",
    ]
    # Failed before the function answered, no instance, cold or warm unknown.
    assert attempt_line(INVOCATION["attempts"][1]).split("  ") == [
        "#2",
        "2026-11-28T10:01:00.000Z",
        "50 ms",
        "no answer",
        "ConcurrencyLimitExceeded: max_concurrency 1",
        "worker w-2",
    ]
    assert attempt_line({}) == "#?  None  ? ms  no answer"


def test_preview_cuts_long_texts_and_says_so() -> None:
    assert preview("short\ntext") == "short\ntext"
    long = "x" * (RESULT_PREVIEW_CHARS * 2)
    shown = preview(long)
    assert shown.startswith("x" * RESULT_PREVIEW_CHARS + "\n… (")
    assert shown.endswith(f"({RESULT_PREVIEW_CHARS} more characters; --json shows it whole)")
    many = "\n".join(str(i) for i in range(100))
    lines = preview(many).splitlines()
    assert lines[:20] == [str(i) for i in range(20)]
    left = len(many) - len("\n".join(str(i) for i in range(20)))
    assert lines[20:] == [f"… ({left} more characters; --json shows it whole)"]


async def test_invocation_shows_a_retrying_call(stub: Stub, run: Run) -> None:
    code, out, err = await run("invocation", "req-retrying-1")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "request id   req-retrying-1"
    assert lines[1] == "function     hello, version 3 (as prod), async"
    assert lines[2].startswith(
        "state        retrying: next attempt at 2026-12-09T23:46:40.000Z (in "
    )
    assert lines[2].endswith(" days)")
    assert "duplicates   1 repeated deliveries dropped" in lines
    i = lines.index("attempts")
    assert lines[i + 1] == "  " + attempt_line(INVOCATION["attempts"][0])
    assert lines[i + 2] == "  " + attempt_line(INVOCATION["attempts"][1])
    assert not any(line.startswith("result") for line in lines)
    assert stub.requests[-1][:2] == ("GET", "/v1/invocations/req-retrying-1")


async def test_invocation_shows_a_result_truncated(stub: Stub, run: Run) -> None:
    code, out, _ = await run("invocation", "req-done-1")
    assert code == 0
    assert "state        succeeded\n" in out
    assert "batch        b-1, item 17\n" in out
    assert "result       HTTP 200, application/json\n" in out
    body = SUCCEEDED["result"]["body"]
    assert len(out) < len(body)  # cut, and said so
    assert "more characters; --json shows it whole)" in out
    assert "duplicates" not in out


async def test_invocation_json_is_the_document_as_it_came(stub: Stub, run: Run) -> None:
    code, out, _ = await run("invocation", "req-done-1", "--json")
    assert code == 0 and json.loads(out) == SUCCEEDED


async def test_invocation_not_found_is_one_clear_error(stub: Stub, run: Run) -> None:
    code, out, err = await run("invocation", "no-such-id")
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == "imagefn: InvocationNotFound: no invocation 'no-such-id'"


async def test_request_ids_are_quoted_as_one_path_segment(stub: Stub, run: Run) -> None:
    await run("invocation", "a/b c")
    assert stub.requests[-1][1] == "/v1/invocations/a%2Fb%20c"


# -- imagefn dlq ---------------------------------------------------------------------------------


def table(out: str) -> list[list[str]]:
    """The cells of a table printed with aligned columns, cut where the header's are."""
    header, *rows = out.splitlines()
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 2 : i] == "  ")]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [[line[a:b].strip() for a, b in bounds] for line in [header, *rows]]


async def test_dlq_ls_is_a_table(stub: Stub, run: Run) -> None:
    code, out, err = await run("dlq", "ls", "hello")
    assert (code, err) == (0, "")
    assert table(out) == [
        ["REQUEST ID", "PARKED", "REASON", "ATTEMPTS", "VERSION", "LAST ERROR"],
        [
            "req-dead-1",
            "2026-11-28T10:02:00.000Z",
            "retries exhausted",
            "2",
            "3 (prod)",
            "ConcurrencyLimitExceeded: max_concurrency 1",
        ],
        ["req-dead-2", "2026-11-28T10:02:00.000Z", "expired", "0", "3 (prod)", "-"],
    ]
    assert stub.requests[-1][1] == "/v1/functions/hello/dlq?limit=100&offset=0"


async def test_dlq_ls_keeps_long_errors_to_one_row(stub: Stub, run: Run) -> None:
    long = {"type": "UserCodeError", "message": "line one\nline two " + "x" * 200}
    stub.dead = {"r-long-1": {**DEAD, "request_id": "r-long-1", "attempts": [{"error": long}]}}
    code, out, _ = await run("dlq", "ls", "hello")
    assert code == 0
    [_, row] = table(out)
    assert row[-1] == "UserCodeError: line one line two " + "x" * 26 + "…"
    assert len(row[-1]) == TABLE_ERROR_CHARS


async def test_dlq_ls_pages_and_json(stub: Stub, run: Run) -> None:
    code, out, _ = await run("dlq", "ls", "hello", "--limit", "1")
    assert code == 0
    assert out.splitlines()[-1] == "(1-1 of 2; see --limit and --offset)"
    code, out, _ = await run("dlq", "ls", "hello", "--limit", "1", "--offset", "1", "--json")
    assert json.loads(out) == {"function": "hello", "count": 2, "items": [DEAD2]}
    code, out, _ = await run("dlq", "ls", "hello", "--offset", "5")
    assert out == "no dead letters past 5\n"
    stub.dead.clear()
    assert await run("dlq", "ls", "hello") == (0, "no dead letters for hello\n", "")
    code, _, err = await run("dlq", "ls", "ghost")
    assert code == 1 and err.startswith("imagefn: FunctionNotFound: ")


async def test_dlq_show(stub: Stub, run: Run) -> None:
    code, out, _ = await run("dlq", "show", "hello", "req-dead-1")
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        "request id   req-dead-1",
        "function     hello, version 3 (as prod)",
        "parked       2026-11-28T10:02:00.000Z: retries exhausted",
    ]
    assert "  " + attempt_line(DEAD["attempts"][0]) in lines
    event = out[out.index("event\n") + len("event\n") :]
    assert json.loads(event) == {"name": "you", "n": 1}

    code, out, _ = await run("dlq", "show", "hello", "req-dead-2")
    assert "attempts     none yet\n" in out
    assert "event        not JSON, 4 bytes (base64 with --json)\n" in out
    code, out, _ = await run("dlq", "show", "hello", "req-dead-2", "--json")
    assert json.loads(out)["event_base64"] == "AAEC/w=="
    code, _, err = await run("dlq", "show", "hello", "nope")
    assert code == 1 and err.startswith("imagefn: InvocationNotFound: 'nope' is not in the")


async def test_dlq_redrive(stub: Stub, run: Run) -> None:
    code, out, err = await run("dlq", "redrive", "hello", "--id", "req-dead-1")
    assert (code, out, err) == (0, "redrove 1 dead letter of hello\n", "")
    assert stub.bodies[-1] == {"ids": ["req-dead-1"]}
    assert stub.requests[-1][:2] == ("POST", "/v1/functions/hello/dlq/redrive")

    code, out, _ = await run("dlq", "redrive", "hello", "--all", "-q", "prod")
    assert (code, out) == (0, "redrove 2 dead letters of hello as prod\n")
    assert stub.bodies[-1] == {"all": True, "qualifier": "prod"}

    # Ids that are not there: said, and a non-zero exit for scripts.
    code, out, err = await run("dlq", "redrive", "hello", "--id", "req-dead-2", "--id", "gone")
    assert code == 1
    assert out == "redrove 1 dead letter of hello\n"
    assert err == "imagefn: not in the dead-letter queue of hello: gone\n"


async def test_dlq_purge(stub: Stub, run: Run) -> None:
    assert await run("dlq", "purge", "hello") == (0, "purged 2 dead letters of hello\n", "")
    assert stub.requests[-1][:2] == ("DELETE", "/v1/functions/hello/dlq")
    assert await run("dlq", "purge", "hello", "--id", "req-dead-1") == (
        0,
        "purged 1 dead letter of hello\n",
        "",
    )
    assert stub.requests[-1][:2] == ("DELETE", "/v1/functions/hello/dlq/req-dead-1")


# -- batch submit ---------------------------------------------------------------------------------


def ndjson(n: int) -> bytes:
    return b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(n))


async def test_submit_streams_a_file_with_its_length(stub: Stub, run: Run, tmp_path: Path) -> None:
    path = tmp_path / "items.ndjson"
    path.write_bytes(ndjson(1000))
    code, out, err = await run(
        "batch",
        "submit",
        "hello",
        str(path),
        "-q",
        "prod",
        "--max-concurrency",
        "8",
        "--max-retries",
        "0",
        "--max-event-age",
        "60",
    )
    assert (code, out) == (0, "b-1\n")
    assert err.startswith("1000 items of hello ($LATEST) stored (")
    assert err.endswith("see: imagefn batch status b-1\n")
    method, path_qs, headers = stub.requests[-1]
    assert (method, path_qs) == (
        "POST",
        "/v1/functions/hello/batches?qualifier=prod&max_concurrency=8&max_retries=0"
        "&max_event_age_s=60",
    )
    assert headers["Content-Length"] == str(path.stat().st_size)
    assert "Transfer-Encoding" not in headers
    assert headers["Content-Type"] == "application/x-ndjson"
    assert stub.uploads[-1] == {
        "bytes": path.stat().st_size,
        "lines": 1000,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


@pytest.mark.parametrize(
    ("name", "text", "ctype"),
    [
        ("items.json", b'  \n[{"i": 1},\n {"i": 2}]\n', "application/json"),
        ("items.json", b'\xef\xbb\xbf[{"i": 1}]', "application/json"),
        ("items.json", b'{"i": 1}\n{"i": 2}\n', "application/x-ndjson"),
        # NDJSON whose first item is an array: the name says it is NDJSON.
        ("items.ndjson", b"[1, 2]\n[3]\n", "application/x-ndjson"),
        ("items.jsonl", b"[1]\n", "application/x-ndjson"),
    ],
)
async def test_submit_says_whether_it_sends_an_array_or_ndjson(
    stub: Stub, run: Run, tmp_path: Path, name: str, text: bytes, ctype: str
) -> None:
    path = tmp_path / name
    path.write_bytes(text)
    code, _, err = await run("batch", "submit", "hello", str(path))
    assert code == 0, err
    assert stub.requests[-1][2]["Content-Type"] == ctype
    assert stub.uploads[-1]["sha256"] == hashlib.sha256(text).hexdigest()


async def test_submit_from_standard_input_is_sent_chunked(
    stub: Stub, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ndjson(50_000)  # more than a block, written into a pipe while it is read
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as w:
            for i in range(0, len(data), 10_000):
                w.write(data[i : i + 10_000])
                w.flush()

    writer = threading.Thread(target=feed)
    writer.start()
    with os.fdopen(read_end, "rb") as r:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(r))
        code, out, err = await run("batch", "submit", "hello", "-")
    writer.join()
    assert (code, out) == (0, "b-1\n"), err
    headers = stub.requests[-1][2]
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in headers
    assert stub.uploads[-1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert stub.uploads[-1]["lines"] == 50_000


async def test_submit_hands_urllib_an_iterable_not_the_file_read_whole(
    stub: Stub, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "items.ndjson"
    path.write_bytes(ndjson(100_000))  # ~1.2 MB: several blocks
    seen: list[Any] = []
    blocks: list[int] = []
    real: Any = api.open_response

    def spy(*args: Any, **kwargs: Any) -> Any:
        body = args[3]
        seen.append(body)

        def blocks_of(upload: Upload) -> Iterator[bytes]:
            for block in upload:
                blocks.append(len(block))
                yield block

        return real(*args[:3], blocks_of(body), *args[4:], **kwargs)

    monkeypatch.setattr(batch_cli, "open_response", spy)
    code, _, err = await run("batch", "submit", "hello", str(path))
    assert code == 0, err
    [body] = seen
    assert isinstance(body, Upload) and not isinstance(body, bytes | bytearray)
    assert len(blocks) > 1 and max(blocks) <= BLOCK_BYTES
    assert sum(blocks) == path.stat().st_size


def test_upload_reads_block_by_block(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    path.write_bytes(b"\n" * (BLOCK_BYTES + 10) + b"{}\n")
    with path.open("rb") as f:
        upload = Upload(f, "x.ndjson")
        # Only whitespace in the first block: it read on to the first item to decide.
        assert upload.content_type == "application/x-ndjson"
        assert upload.length == path.stat().st_size
        assert [len(b) for b in upload] == [BLOCK_BYTES, 13]
        assert upload.sent == upload.length


async def test_submit_errors_are_one_clear_line(stub: Stub, run: Run, tmp_path: Path) -> None:
    path = tmp_path / "items.ndjson"
    path.write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": 2,\n{"i": 3}\n')
    code, out, err = await run("batch", "submit", "hello", str(path))
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == (
        f"imagefn: {path}: InvalidRequest: batch item 2 (line 3): not valid JSON"
    )
    # A gateway message that does not say where: the CLI adds the line and item.
    stub.reject_after_lines = 1
    code, _, err = await run("batch", "submit", "hello", str(path))
    assert code == 1
    assert err.splitlines()[0] == f"imagefn: {path}: line 2: InvalidRequest: stop here"

    code, _, err = await run("batch", "submit", "ghost", str(path))
    assert code == 1
    assert err.splitlines()[0] == "imagefn: FunctionNotFound: function 'ghost' not found"

    empty = tmp_path / "empty.json"
    empty.write_bytes(b" \n\n")
    code, _, err = await run("batch", "submit", "hello", str(empty))
    assert (code, err) == (1, f"imagefn: {empty} is empty: a batch needs at least one item\n")
    code, _, err = await run("batch", "submit", "hello", str(tmp_path / "nope.ndjson"))
    assert code == 1
    assert err == f"imagefn: cannot read {tmp_path / 'nope.ndjson'}: No such file or directory\n"
    assert len(stub.uploads) == 0


async def test_a_big_file_refused_early_still_shows_the_gateways_answer(
    stub: Stub, run: Run, tmp_path: Path
) -> None:
    # The gateway answers 400 at line 3 of 20 MB without reading the rest; aiohttp keeps
    # reading (and dropping) the body for a while, so that the CLI gets to the answer.
    path = tmp_path / "items.ndjson"
    with path.open("wb") as f:
        f.write(b'{"i": 0}\n{"i": 1}\nnot json\n')
        f.write(ndjson(1000) * 1500)
    code, _, err = await run("batch", "submit", "hello", str(path))
    assert code == 1
    assert err.splitlines()[0] == (
        f"imagefn: {path}: InvalidRequest: batch item 2 (line 3): not valid JSON"
    )


async def test_a_connection_cut_while_sending_says_how_far_it_got(
    stub: Stub, run: Run, tmp_path: Path
) -> None:
    stub.abort_upload = True
    path = tmp_path / "items.ndjson"
    path.write_bytes(ndjson(1000) * 1000)  # ~12 MB
    code, out, err = await run("batch", "submit", "hello", str(path))
    assert (code, out) == (1, "")
    size = batch_cli._size(path.stat().st_size)
    gateway = os.environ["IMAGEFN_GATEWAY"]
    assert re.fullmatch(
        f"imagefn: the gateway at {gateway} closed the connection after [0-9.]+ [KM]B of "
        f"{size} of {re.escape(str(path))} had been sent \\(.+\\); nothing of the batch is kept\n",
        err,
    ), err
    assert len(err.splitlines()) == 1


# -- batch submit: memory -------------------------------------------------------------------------

PEAK_RSS = """
import resource, sys
from cli.main import main
code = main(sys.argv[1:])
print(f"maxrss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


async def run_cli_process(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PEAK_RSS,
        *argv,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def peak_kb(stderr: str) -> int:
    return int(stderr.rsplit("maxrss_kb=", 1)[1])


async def test_submitting_50_mb_does_not_hold_the_file_in_memory(
    stub: Stub, tmp_path: Path
) -> None:
    small = tmp_path / "small.ndjson"
    small.write_bytes(ndjson(10))
    big = tmp_path / "big.ndjson"
    # Lines of ~1 KB: the stand-in checks each, and 4 million tiny ones would be slow.
    block = b"".join(json.dumps({"i": i, "pad": "x" * 1000}).encode() + b"\n" for i in range(100))
    with big.open("wb") as f:
        while f.tell() < 50 * 1024 * 1024:
            f.write(block)
    size = big.stat().st_size

    code, out, err = await run_cli_process("batch", "submit", "hello", str(small))
    assert (code, out) == (0, "b-1\n"), err
    baseline = peak_kb(err)
    code, out, err = await run_cli_process("batch", "submit", "hello", str(big))
    assert (code, out) == (0, "b-1\n"), err
    assert stub.uploads[-1]["bytes"] == size
    # Holding the file would cost 50 MB (more as a str); streaming costs a block or two.
    print(f"peak RSS: {baseline} KB for 10 items, {peak_kb(err)} KB for {size} bytes")
    assert peak_kb(err) - baseline < 16 * 1024, (baseline, peak_kb(err))


# -- batch submit --follow, status --------------------------------------------------------------


def test_progress_line() -> None:
    doc = batch_status(10_000, 1234, 12)
    assert progress_line(doc) == (
        "1234/10000 done (12 failed), 2 in flight, 12.5 items/s, ETA 11 min 41 s"
    )
    assert progress_line({}) == "0/? done (0 failed), 0 in flight, ? items/s, ETA ?"


async def test_follow_without_a_terminal_prints_plain_lines(
    stub: Stub, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batchprogress, "PLAIN_INTERVAL_S", 0.0)  # a line per poll
    stub.statuses = [batch_status(10, n, 0) for n in (0, 4, 8, 10)]
    path = tmp_path / "items.ndjson"
    path.write_bytes(ndjson(10))
    code, out, err = await run("batch", "submit", "hello", str(path), "--follow")
    assert code == 0, err
    # stdout carries the batch id alone (for scripts); the progress goes to stderr.
    assert out.splitlines() == ["b-1"]
    assert [line for line in err.splitlines() if line.startswith("batch ")] == [
        "batch b-1: 0/10 done (0 failed), 2 in flight, 12.5 items/s, ETA 1 s",
        "batch b-1: 4/10 done (0 failed), 2 in flight, 12.5 items/s, ETA 0 s",
        "batch b-1: 8/10 done (0 failed), 2 in flight, 12.5 items/s, ETA 0 s",
        "batch b-1: 10/10 done (0 failed), 0 in flight, 12.5 items/s, ETA 0 s",
        "batch b-1 completed in 42 s: 10 succeeded, 0 failed, 0 cancelled of 10",
    ]
    assert "\x1b" not in err  # no terminal codes in a log file


async def test_follow_prints_every_few_seconds_not_every_poll(
    stub: Stub, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.statuses = [batch_status(100, n, 0) for n in range(0, 101, 5)]
    code, out, _ = await run("batch", "status", "b-1", "--follow")
    assert code == 0
    # The first, then nothing for PLAIN_INTERVAL_S (5 s), then the last.
    assert [line.split(":")[1].split()[0] for line in out.splitlines()[:-1]] == ["0/100", "100/100"]
    assert len([r for r in stub.requests if r[1] == "/v1/batches/b-1"]) == 21


async def test_follow_of_a_batch_with_failures_exits_1(stub: Stub, run: Run) -> None:
    stub.statuses = [batch_status(10, 5, 1), batch_status(10, 10, 3)]
    code, out, err = await run("batch", "status", "b-1", "--follow")
    assert code == 1
    assert out.splitlines()[-1] == (
        "batch b-1 completed in 42 s: 7 succeeded, 3 failed, 0 cancelled of 10"
    )
    assert err == (
        "imagefn: batch b-1 completed with 3 failed and 0 cancelled items; "
        "see: imagefn batch results b-1\n"
    )
    code, _, err = await run("batch", "status", "b-404", "--follow")
    assert code == 1 and err.startswith("imagefn: BatchNotFound: no batch 'b-404'")


async def test_follow_on_a_terminal_draws_a_progress_bar(
    stub: Stub, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batchprogress, "_interactive", lambda stream: True)
    stub.statuses = [batch_status(10, n, 1 if n else 0) for n in (0, 5, 10)]
    code, out, err = await run("batch", "status", "b-1", "--follow")
    assert code == 1, err  # one failed
    # rich draws on the console it was given (here a capture, not a terminal): the bar's
    # last state stays on screen, then the summary line.
    assert "b-1" in out and "10/10" in out and "1 failed" in out
    assert out.splitlines()[-1].startswith("batch b-1 completed in 42 s: 9 succeeded, 1 failed")


async def test_status_readable_and_json(stub: Stub, run: Run) -> None:
    stub.statuses = [batch_status(10, 4, 1)]
    code, out, _ = await run("batch", "status", "b-1")
    assert code == 0
    lines = out.splitlines()
    assert lines[:5] == [
        "batch            b-1",
        "function         hello (as $LATEST)",
        "state            running",
        "items            10",
        "  succeeded      3",
    ]
    assert "rate             12.5 items/s" in lines
    assert "eta              0 s" in lines
    assert "created          2026-11-28T10:00:00.000Z" in lines
    code, out, _ = await run("batch", "status", "b-1", "--json")
    assert json.loads(out) == batch_status(10, 4, 1)
    code, _, err = await run("batch", "status", "b-404")
    assert code == 1 and err.startswith("imagefn: BatchNotFound: no batch 'b-404'")


async def test_cancel(stub: Stub, run: Run) -> None:
    code, out, _ = await run("batch", "cancel", "b-1")
    assert code == 0
    assert (
        out
        == "batch b-1 cancelled: 5 items will not run, 1 running finish; 3 succeeded, 1 failed\n"
    )
    assert stub.requests[-1][:2] == ("DELETE", "/v1/batches/b-1")


# -- batch results ----------------------------------------------------------------------------


async def test_results_are_copied_as_they_come(stub: Stub, run: Run) -> None:
    code, out, err = await run("batch", "results", "b-1")
    assert (code, out, err) == (0, stub.results.decode(), "")
    assert stub.requests[-1][1] == "/v1/batches/b-1/results?follow=false"

    stub.results = b"".join(result_line(i) for i in range(10))
    stub.results_delay_s = 0.02
    stub.statuses = [batch_status(10, 10, 0)]
    code, out, err = await run("batch", "results", "b-1", "--follow")
    assert (code, out, err) == (0, stub.results.decode(), "")
    assert stub.requests[-2][1] == "/v1/batches/b-1/results?follow=true"


async def test_a_followed_stream_that_ends_early_is_resumed_at_the_next_item(
    stub: Stub, run: Run
) -> None:
    stub.results = b"".join(result_line(i) for i in range(6))
    stub.statuses = [batch_status(6, 6, 0)]
    stub.results_end_at = 2  # ends cleanly after lines 0 and 1
    code, out, err = await run("batch", "results", "b-1", "--follow")
    assert (code, out, err) == (0, stub.results.decode(), "")
    asked = [r[1] for r in stub.requests if "/results" in r[1]]
    assert asked == [
        "/v1/batches/b-1/results?follow=true",
        "/v1/batches/b-1/results?follow=true&start=2",
    ]


async def test_a_stream_cut_mid_line_leaves_no_half_line(stub: Stub, run: Run) -> None:
    stub.results = b"".join(result_line(i) for i in range(6))
    stub.statuses = [batch_status(6, 6, 0)]
    stub.results_break_at = 3
    code, out, err = await run("batch", "results", "b-1", "--follow")
    assert (code, out, err) == (0, stub.results.decode(), "")
    assert [r[1] for r in stub.requests if "/results" in r[1]][-1].endswith("&start=3")

    # Not following, there is nothing to resume: said in one line, after what came.
    stub.results_break_at = 3
    code, out, err = await run("batch", "results", "b-1")
    assert code == 1
    assert out == b"".join(result_line(i) for i in range(3)).decode()
    assert err.startswith("imagefn: the results stream of batch b-1 broke off after 3 lines (")
    assert len(err.splitlines()) == 1


async def test_a_followed_stream_that_keeps_ending_early_is_an_error(stub: Stub, run: Run) -> None:
    stub.statuses = [batch_status(5, 3, 0)]  # 5 items, the stream has 3 lines
    code, out, err = await run("batch", "results", "b-1", "--follow")
    assert code == 1
    assert out == stub.results.decode()  # what came is kept
    assert err == (
        "imagefn: the results stream of batch b-1 ended after 3 of 5 lines (connection closed)\n"
    )
    # The first stream, then RESUME_TRIES tries that brought nothing new.
    asked = [r[1] for r in stub.requests if "/results" in r[1]]
    assert asked[1:] == ["/v1/batches/b-1/results?follow=true&start=3"] * batch_cli.RESUME_TRIES
    code, _, err = await run("batch", "results", "b-404", "--follow")
    assert code == 1 and err.startswith("imagefn: BatchNotFound: no batch 'b-404'")


async def test_results_stop_quietly_when_stdout_is_closed(stub: Stub) -> None:
    stub.endless_results = True
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "batch",
        "results",
        "b-1",
        "--follow",
        cwd=REPO,
        stdout=write_fd,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        first = await asyncio.wait_for(asyncio.to_thread(reader.readline), 10)
    # Closed: `imagefn batch results b-1 --follow | head -1`, while the CLI still copies.
    assert json.loads(first)["index"] == 0
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert (proc.returncode, err) == (0, b"")


async def test_unreachable_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    from .fakes import closed_port

    monkeypatch.setenv("IMAGEFN_ENV_FILE", str(tmp_path / "absent.env"))
    url = f"http://127.0.0.1:{closed_port()}"
    path = tmp_path / "items.ndjson"
    path.write_bytes(ndjson(3))
    for argv in (
        ["batch", "submit", "hello", str(path)],
        ["batch", "results", "b-1"],
        ["invocation", "r-1"],
        ["dlq", "ls", "hello"],
    ):
        code, _, err = await run("--gateway", url, "--timeout", "2", *argv)
        assert code == 1
        assert err.startswith(f"imagefn: cannot reach the gateway at {url}"), argv
        assert len(err.splitlines()) == 1
