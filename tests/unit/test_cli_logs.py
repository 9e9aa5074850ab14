"""``imagefn logs`` and ``imagefn invoke --log`` against a stand-in gateway that records
what the CLI asked and answers with fixed bodies in the logs API's wire format (the real
gateway's side is tested in test_logs.py and the integration suite)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cli.logs import render
from cli.main import build_parser, cmd_logs, main
from gateway.logs import SseFraming, sse_event
from shared import logrecords
from shared.errors import FunctionNotFound, ServiceUnavailable, UserCodeError

SSE = SseFraming()
REC1 = {
    "type": "line",
    "ts": 1795860000.5,
    "function": "fn",
    "version": 3,
    "instance": "imagefn-fn-1",
    "request_id": "r1-request",
    "stream": "stdout",
    "line": "hello",
    "seq": 1,
}
REC2 = {**REC1, "type": "REPORT", "stream": "platform", "seq": 2, "duration_ms": 2.0}
REC2 |= {"status": 200, "cold": False, "memory_peak_mb": None, "memory_limit_mb": 128}


class Stub:
    """What the stand-in answers, and what it was asked."""

    def __init__(self) -> None:
        self.logs: list[web.Request] = []
        self.invokes: list[web.Request] = []
        self.logs_status = 200
        self.logs_body = SSE.record(REC1) + SSE.record(REC2) + SSE.end("complete")
        self.invoke_status = 200
        self.invoke_body: dict[str, Any] = {"ok": True}


@pytest.fixture
async def stub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Stub]:
    monkeypatch.setenv("IMAGEFN_ENV_FILE", str(tmp_path / "absent.env"))
    s = Stub()

    async def logs(request: web.Request) -> web.StreamResponse:
        s.logs.append(request)
        if s.logs_status != 200:
            return web.json_response(
                {"error": {**json.loads(s.logs_body), "request_id": "gw-rid-1"}},
                status=s.logs_status,
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # Written in pieces, as a stream arrives.
        for i in range(0, len(s.logs_body), 7):
            await resp.write(s.logs_body[i : i + 7])
        await resp.write_eof()
        return resp

    async def invoke(request: web.Request) -> web.Response:
        s.invokes.append(request)
        rid = request.headers.get("X-Request-Id", "gw-made-id")
        if s.invoke_status != 200:
            return web.json_response(
                {"error": {**s.invoke_body, "request_id": rid}}, status=s.invoke_status
            )
        return web.json_response(s.invoke_body, headers={"X-Request-Id": rid})

    app = web.Application()
    app.router.add_get("/v1/functions/{name}/logs", logs)
    app.router.add_post("/v1/functions/{name}/invoke", invoke)
    server = TestServer(app)
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


def test_logs_arguments() -> None:
    args = build_parser().parse_args(["logs", "fn"])
    assert (args.fn, args.name, args.follow, args.json) == (cmd_logs, "fn", False, False)
    assert (args.request_id, args.version, args.since, args.until, args.limit) == (None,) * 5
    argv = "logs fn -f --json --since 10m --until 1h --version prod --request-id r1 --limit 5"
    args = build_parser().parse_args(argv.split())
    assert (args.follow, args.json, args.since, args.until) == (True, True, "10m", "1h")
    assert (args.version, args.request_id, args.limit) == ("prod", "r1", 5)
    assert build_parser().parse_args(["logs", "fn", "--follow"]).follow is True
    args = build_parser().parse_args(["invoke", "fn", "--log", "--request-id", "mine-12345"])
    assert (args.log, args.request_id) == (True, "mine-12345")
    assert build_parser().parse_args(["invoke", "fn"]).log is False


async def test_logs_prints_rendered_records_and_notices(stub: Stub, run: Run) -> None:
    notice = {"notice": "omitted", "omitted": 4, "message": "4 older matching records left out"}
    stub.logs_body = (
        SSE.notice(notice)
        + SSE.record(REC1)
        + b": keepalive\n\n"
        + SSE.record(REC2)
        + SSE.end("complete")
    )
    code, out, err = await run(
        "logs", "fn", "--since", "10m", "--until", "1h", "--version", "3", "--limit", "5"
    )
    assert (code, err) == (0, "imagefn: 4 older matching records left out\n")
    assert out == render(REC1) + "\n" + render(REC2) + "\n"
    (asked,) = stub.logs
    assert asked.headers["Accept"] == "text/event-stream"
    assert dict(asked.query) == {"version": "3", "since": "10m", "until": "1h", "limit": "5"}


async def test_logs_json_and_follow(stub: Stub, run: Run) -> None:
    code, out, err = await run("logs", "fn", "-f", "--json", "--request-id", "r1-request")
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == [REC1, REC2]
    assert out == logrecords.dumps(REC1).decode() + "\n" + logrecords.dumps(REC2).decode() + "\n"
    assert dict(stub.logs[0].query) == {"request_id": "r1-request", "follow": "1"}


async def test_a_stream_cut_short_is_an_error(stub: Stub, run: Run) -> None:
    stub.logs_body = SSE.record(REC1)  # no end event
    code, out, err = await run("logs", "fn")
    assert code == 1 and out == render(REC1) + "\n"
    assert err.startswith("imagefn: the log stream from http://127.0.0.1:")
    assert err.endswith("ended early (connection closed)\n")


async def test_an_error_midway_is_one_line_and_exit_1(stub: Stub, run: Run) -> None:
    failure = ServiceUnavailable("reading the logs from Kafka failed: gone")
    body = {"notice": "error", "message": failure.message, "error": failure.to_dict()}
    stub.logs_body = SSE.record(REC1) + SSE.notice(body) + SSE.end("error")
    code, out, err = await run("logs", "fn")
    assert code == 1 and out == render(REC1) + "\n"
    assert err == "imagefn: ServiceUnavailable: reading the logs from Kafka failed: gone\n"


async def test_an_error_answer_is_described(stub: Stub, run: Run) -> None:
    stub.logs_status = 404
    stub.logs_body = json.dumps(FunctionNotFound("function 'fn' does not exist").to_dict()).encode()
    code, out, err = await run("logs", "fn")
    assert (code, out) == (1, "")
    assert err == (
        "imagefn: FunctionNotFound: function 'fn' does not exist\n  request id: gw-rid-1\n"
    )


async def test_invoke_log_prints_the_records_after_the_result(stub: Stub, run: Run) -> None:
    code, out, err = await run("invoke", "fn", "--log", "--data", '{"a": 1}')
    assert code == 0
    assert out == '{"ok": true}\n'  # the result alone on stdout
    assert err == render(REC1) + "\n" + render(REC2) + "\n"
    rid = stub.invokes[0].headers["X-Request-Id"]
    assert rid.startswith("cli-") and len(rid) == 36
    query = dict(stub.logs[0].query)
    assert query.pop("since").endswith("s")
    assert query == {"request_id": rid, "wait_report": "1", "timeout": "15"}


async def test_invoke_log_says_when_the_report_did_not_come(stub: Stub, run: Run) -> None:
    timeout_notice = {"notice": "report_timeout", "message": "no REPORT for request x within 15 s"}
    stub.logs_body = SSE.record(REC1) + SSE.notice(timeout_notice) + SSE.end("report_timeout")
    code, out, err = await run("invoke", "fn", "--log", "--request-id", "my-request-1")
    assert code == 0 and out == '{"ok": true}\n'
    assert err == render(REC1) + "\nimagefn: no REPORT for request x within 15 s\n"
    assert dict(stub.logs[0].query)["request_id"] == "my-request-1"


async def test_invoke_log_without_logs_keeps_the_result(stub: Stub, run: Run) -> None:
    stub.logs_status = 503
    stub.logs_body = json.dumps(ServiceUnavailable("container logs are off").to_dict()).encode()
    code, out, err = await run("invoke", "fn", "--log")
    assert (code, out) == (0, '{"ok": true}\n')
    assert err.startswith("imagefn: no logs: ServiceUnavailable: container logs are off\n")


async def test_invoke_log_shows_the_logs_of_a_failed_call_that_ran(stub: Stub, run: Run) -> None:
    stub.invoke_status = 502
    ran = UserCodeError("the function answered 500", details={"instance": "imagefn-fn-1"})
    stub.invoke_body = ran.to_dict()
    code, out, err = await run("invoke", "fn", "--log")
    assert (code, out) == (1, "")
    assert err.startswith(render(REC1) + "\n" + render(REC2) + "\nimagefn: UserCodeError: ")
    # One refused before any instance ran it has no logs to ask for.
    stub.invoke_status = 404
    stub.invoke_body = FunctionNotFound("function 'fn' does not exist").to_dict()
    code, out, err = await run("invoke", "fn", "--log")
    assert code == 1 and err.startswith("imagefn: FunctionNotFound: ")
    assert len(stub.logs) == 1


async def test_invoke_refuses_a_bad_request_id(stub: Stub, run: Run) -> None:
    code, _, err = await run("invoke", "fn", "--request-id", "no spaces please")
    assert code == 1 and err == "imagefn: --request-id: 8-64 characters of A-Za-z0-9._-\n"
    assert stub.invokes == []


def test_sse_framing_used_by_the_stand_in_is_the_gateways() -> None:
    assert SSE.record(REC1) == sse_event(logrecords.dumps(REC1))
    assert SSE.end("complete") == b'event: end\ndata: {"reason":"complete"}\n\n'


class ClosedPipe:
    """A stdout whose reader went away (`imagefn logs fn | head`)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass


async def test_a_closed_stdout_is_not_reported_as_a_broken_log_stream(stub: Stub) -> None:
    from cli.main import CliError, _print_log_stream

    args = build_parser().parse_args(["logs", "fn"])
    args.gateway = os.environ["IMAGEFN_GATEWAY"]  # the stand-in's, set by the fixture
    args.timeout = 10
    with pytest.raises(BrokenPipeError):
        await asyncio.to_thread(
            _print_log_stream,
            args,
            "/v1/functions/fn/logs",
            ClosedPipe(),  # type: ignore[arg-type]
            follow=False,
            raw_json=False,
        )
    # Whereas a gateway that is not there is the gateway's fault, in one line.
    args.gateway = "http://127.0.0.1:9"
    with pytest.raises(CliError, match="cannot reach the gateway"):
        await asyncio.to_thread(
            _print_log_stream,
            args,
            "/x",
            ClosedPipe(),
            follow=False,
            raw_json=False,  # type: ignore[arg-type]
        )
