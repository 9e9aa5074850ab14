"""cli.main: argument parsing, error descriptions, spec files, and the client commands
against a gateway served in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cli.main import (
    CliError,
    _describe_error,
    _load_spec_file,
    build_parser,
    cmd_deploy,
    cmd_gateway,
    cmd_invoke,
    cmd_ls,
    cmd_rm,
    cmd_up,
    cmd_worker,
    main,
)
from shared.errors import InvalidSpec, UserProcessExited

from .conftest import Gateway

# -- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fn"),
    [(["up"], cmd_up), (["gateway"], cmd_gateway), (["worker"], cmd_worker), (["ls"], cmd_ls)],
)
def test_commands_without_arguments(argv: list[str], fn: object) -> None:
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]
    assert args.fn is fn
    assert args.gateway is None  # filled from IMAGEFN_GATEWAY or the default in main()
    assert args.timeout == 960.0


def test_deploy() -> None:
    args = build_parser().parse_args(["deploy", "-f", "fn.yaml"])
    assert (args.fn, args.file) == (cmd_deploy, "fn.yaml")
    args = build_parser().parse_args(["deploy", "--file", "fn.json"])
    assert args.file == "fn.json"


def test_deploy_requires_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["deploy"])
    assert info.value.code == 2
    assert "--file" in capsys.readouterr().err


def test_invoke() -> None:
    args = build_parser().parse_args(["invoke", "hello"])
    assert (args.fn, args.name, args.data, args.verbose) == (cmd_invoke, "hello", "{}", False)
    args = build_parser().parse_args(["invoke", "hello", "--data", "@ev.json", "-v"])
    assert (args.data, args.verbose) == ("@ev.json", True)


def test_rm_and_global_options() -> None:
    args = build_parser().parse_args(
        ["--gateway", "http://gw:1", "--timeout", "2.5", "rm", "hello"]
    )
    assert (args.fn, args.name) == (cmd_rm, "hello")
    assert (args.gateway, args.timeout) == ("http://gw:1", 2.5)


@pytest.mark.parametrize("argv", [[], ["nope"], ["rm"], ["invoke"], ["--timeout", "x", "ls"]])
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: imagefn" in capsys.readouterr().err


# -- error descriptions ------------------------------------------------------------------------


def gateway_error(err: Exception, request_id: str = "rid-1234567") -> bytes:
    assert isinstance(err, InvalidSpec | UserProcessExited)
    return json.dumps({"error": {**err.to_dict(), "request_id": request_id}}).encode()


def test_describe_invalid_spec_lists_fields_sorted() -> None:
    raw = gateway_error(InvalidSpec({"memory_mb": "must be between 64 and 16384", "image": "x"}))
    assert _describe_error(400, raw) == (
        "InvalidSpec: invalid function spec: image, memory_mb\n"
        "  image: x\n"
        "  memory_mb: must be between 64 and 16384\n"
        "  request id: rid-1234567"
    )


def test_describe_error_with_logs() -> None:
    err = UserProcessExited("exited with code 3", details={"logs": ["one", "two"]})
    assert _describe_error(502, gateway_error(err)) == (
        "UserProcessExited: exited with code 3\n"
        "  last log lines:\n"
        "    one\n"
        "    two\n"
        "  request id: rid-1234567"
    )


def test_describe_minimal_error() -> None:
    assert _describe_error(404, b'{"error": {"message": "m"}}') == "Error: m"


@pytest.mark.parametrize(
    "raw",
    [b"<html>Bad Gateway</html>", b'{"detail": "x"}', b"[1, 2]", b"", b"\xff\xfe not utf-8"],
)
def test_describe_non_gateway_answers_shows_status_and_body(raw: bytes) -> None:
    line = _describe_error(502, raw)
    assert line.startswith("HTTP 502: ")
    assert line == "HTTP 502: " + raw.decode("utf-8", "replace")


def test_describe_truncates_long_bodies() -> None:
    line = _describe_error(500, b"x" * 2000)
    assert line == "HTTP 500: " + "x" * 500


def test_describe_error_whose_error_is_a_string() -> None:
    assert _describe_error(502, b'{"error": "bad gateway"}').startswith("HTTP 502")


# -- spec files ---------------------------------------------------------------------------------


def test_load_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "fn.yaml").write_text("name: hello\nimage: repo/hello:1\nmemory_mb: 256\n")
    (tmp_path / "fn.yml").write_text("name: hello\nimage: repo/hello:1\n")
    (tmp_path / "fn.json").write_text('{"name": "hello", "image": "repo/hello:1"}')
    assert _load_spec_file(str(tmp_path / "fn.yaml")) == {
        "name": "hello",
        "image": "repo/hello:1",
        "memory_mb": 256,
    }
    assert _load_spec_file(str(tmp_path / "fn.yml"))["name"] == "hello"
    assert _load_spec_file(str(tmp_path / "fn.json"))["image"] == "repo/hello:1"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(CliError) as info:
        _load_spec_file(path)
    assert str(info.value) == f"cannot read {path}: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=f"cannot read {tmp_path}"):
        _load_spec_file(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [("fn.yaml", "name: [unclosed\n", "YAML"), ("fn.json", '{"name": ', "JSON")],
)
def test_unparseable_file(tmp_path: Path, name: str, text: str, kind: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CliError) as info:
        _load_spec_file(str(path))
    assert str(info.value).startswith(f"{path} is not valid {kind}: ")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("fn.yaml", "- name: hello\n"),
        ("fn.yaml", "just a string\n"),
        ("fn.yaml", ""),
        ("fn.json", "[]"),
        ("fn.json", '{"image": "x"}'),
        ("fn.json", '{"name": 5, "image": "x"}'),
    ],
)
def test_not_a_spec_mapping(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CliError) as info:
        _load_spec_file(str(path))
    assert (
        str(info.value) == f"{path}: a function spec is a mapping with at least 'name' and 'image'"
    )


def test_other_suffix_is_reported_as_json(tmp_path: Path) -> None:
    path = tmp_path / "fn.txt"
    path.write_text("{nope")
    with pytest.raises(CliError, match="is not valid JSON"):
        _load_spec_file(str(path))


def test_non_utf8_file_is_a_cli_error(tmp_path: Path) -> None:
    path = tmp_path / "fn.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(CliError, match=re.escape(str(path))):
        _load_spec_file(str(path))


# -- main() and the client commands ----------------------------------------------------------


def test_main_reports_cli_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["deploy", "-f", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"imagefn: cannot read {missing}: No such file or directory\n"


def test_main_reports_bad_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEFN_GATEWAY_PORT", "eighty")
    assert main(["ls"]) == 1
    assert "IMAGEFN_GATEWAY_PORT" in capsys.readouterr().err


def test_unreachable_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    from .fakes import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["--gateway", url, "--timeout", "2", "ls"]) == 1
    assert capsys.readouterr().err.startswith(f"imagefn: cannot reach the gateway at {url}")


async def test_client_commands_against_a_gateway(
    stack: contextlib.ExitStack,
    gw: Gateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = str(gw.client.make_url("")).rstrip("/")
    monkeypatch.setenv("IMAGEFN_GATEWAY", url)
    # The gateway logs on this process's stdout too; keep its lines out of the CLI's output.
    logs = stack.enter_context(capture_logs())

    async def run(*argv: str) -> tuple[int, str, str]:
        # The CLI blocks (urllib); the gateway runs on this loop, so the CLI gets a thread.
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    assert await run("ls") == (0, "no functions deployed\n", "")

    spec = tmp_path / "hello.yaml"
    spec.write_text("name: hello\nimage: repo/hello:1\ntimeout_s: 1\ninit_timeout_s: 1\n")
    code, out, _ = await run("deploy", "-f", str(spec))
    assert code == 0
    assert out == "created hello version 1 (event, image repo/hello:1 = sha256:repo-hello:1)\n"
    code, out, _ = await run("deploy", "-f", str(spec))
    assert out.startswith("updated hello version 2 ")

    code, out, _ = await run("ls")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "REV", "IMAGE", "MEMORY", "TIMEOUT"]
    assert lines[1].split() == ["hello", "event", "2", "repo/hello:1", "512MB", "1s"]

    event = tmp_path / "event.json"
    event.write_text('{"k": "v"}')
    code, out, err = await run("invoke", "hello", "--data", f"@{event}", "-v")
    assert code == 0
    assert out == '{"echo":{"k": "v"}}\n'
    assert "X-Imagefn-Instance: inst-1" in err
    assert "X-Imagefn-Cold-Start: true" in err
    assert gw.seen[-1].body == b'{"k": "v"}'

    code, _, err = await run("invoke", "hello", "--data", "{not json")
    assert code == 1 and err.startswith("imagefn: --data is not valid JSON")

    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "bad", "image": "repo/x:1", "memory_mb": 1}')
    code, _, err = await run("deploy", "-f", str(bad))
    assert code == 1
    assert err.startswith("imagefn: InvalidSpec: invalid function spec: memory_mb\n")
    assert "  memory_mb: must be between 64 and 16384\n" in err
    assert "  request id: " in err

    assert await run("rm", "hello") == (0, "removed hello\n", "")
    code, _, err = await run("rm", "hello")
    assert code == 1 and err.startswith("imagefn: FunctionNotFound: function 'hello'")
    assert [e["event"] for e in logs if e["event"].startswith("function_")] == [
        "function_deployed",
        "function_deployed",
        "function_deleted",
    ]


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s
