"""cli.main: argument parsing, error descriptions, spec files, and the client commands
against a gateway served in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cli.main import (
    CliError,
    _describe_error,
    _load_spec_file,
    build_parser,
    cmd_alias,
    cmd_deploy,
    cmd_gateway,
    cmd_invoke,
    cmd_ls,
    cmd_rm,
    cmd_up,
    cmd_versions,
    cmd_worker,
    main,
    merge_env,
)
from shared.errors import InvalidSpec, UserProcessExited
from shared.settings import RegistrySettings, Settings
from tests.credentials import TEST_ADMIN_KEY

from .conftest import Gateway


@pytest.fixture(autouse=True)
def no_credentials_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # main() reads the credentials file deploy/setup.sh writes: never this machine's here.
    monkeypatch.setenv("IMAGEFN_ENV_FILE", str(tmp_path / "absent.env"))


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


def test_deploy_env_overrides_the_spec() -> None:
    args = build_parser().parse_args(
        ["deploy", "-f", "fn.yaml", "--env", "A=1", "--env", "B=x=y", "--env", "C="]
    )
    doc: dict[str, Any] = {"name": "fn", "env": {"A": "0", "D": "kept"}}
    merge_env(doc, args.env, "fn.yaml")
    assert doc["env"] == {"A": "1", "D": "kept", "B": "x=y", "C": ""}
    bare: dict[str, Any] = {"name": "fn"}
    merge_env(bare, [], "fn.yaml")
    assert "env" not in bare
    for bad in ("NOVALUE", "=v"):
        with pytest.raises(CliError, match="expected NAME=VALUE"):
            merge_env({"name": "fn"}, [bad], "fn.yaml")
    with pytest.raises(CliError, match="'env' must be a mapping"):
        merge_env({"name": "fn", "env": ["A=1"]}, ["B=2"], "fn.yaml")


def test_deploy_requires_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["deploy"])
    assert info.value.code == 2
    assert "--file" in capsys.readouterr().err


def test_invoke() -> None:
    args = build_parser().parse_args(["invoke", "hello"])
    assert (args.fn, args.name, args.data, args.verbose) == (cmd_invoke, "hello", "{}", False)
    assert args.qualifier == ""
    args = build_parser().parse_args(["invoke", "hello", "--data", "@ev.json", "-v"])
    assert (args.data, args.verbose) == ("@ev.json", True)
    assert build_parser().parse_args(["invoke", "hello", "-q", "prod"]).qualifier == "prod"
    assert build_parser().parse_args(["invoke", "hello", "--qualifier", "3"]).qualifier == "3"


def test_versions() -> None:
    args = build_parser().parse_args(["versions", "hello"])
    assert (args.fn, args.name) == (cmd_versions, "hello")


def test_alias() -> None:
    args = build_parser().parse_args(["alias", "hello", "prod", "3"])
    assert (args.fn, args.name, args.alias, args.version, args.delete) == (
        cmd_alias,
        "hello",
        "prod",
        3,
        False,
    )
    args = build_parser().parse_args(["alias", "hello", "prod", "--delete"])
    assert (args.version, args.delete) == (None, True)


def test_rm_and_global_options() -> None:
    args = build_parser().parse_args(
        ["--gateway", "http://gw:1", "--timeout", "2.5", "rm", "hello"]
    )
    assert (args.fn, args.name) == (cmd_rm, "hello")
    assert (args.gateway, args.timeout) == ("http://gw:1", 2.5)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["rm"],
        ["invoke"],
        ["--timeout", "x", "ls"],
        ["versions"],
        ["alias", "hello"],
        ["alias", "hello", "prod", "three"],
        ["invoke", "hello", "-q"],
    ],
)
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


def test_main_reads_the_credentials_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from .fakes import closed_port

    env_file = tmp_path / "credentials.env"
    env_file.write_text("# written by deploy/registry.sh\nIMAGEFN_GATEWAY_PORT=eighty\n")
    monkeypatch.setenv("IMAGEFN_ENV_FILE", str(env_file))
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["--gateway", url, "ls"]) == 1
    assert "IMAGEFN_GATEWAY_PORT='eighty'" in capsys.readouterr().err
    monkeypatch.setenv("IMAGEFN_GATEWAY_PORT", "8080")
    assert main(["--gateway", url, "--timeout", "2", "ls"]) == 1
    assert capsys.readouterr().err.startswith(f"imagefn: cannot reach the gateway at {url}")


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
    monkeypatch.setenv("IMAGEFN_API_KEY", TEST_ADMIN_KEY)
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
    assert out == f"created hello version 1 (event): {gw.images.pinned('repo/hello:1')}\n"
    v1_digest = gw.images.digest("repo/hello:1")
    gw.images.push("repo/hello:1", "rebuilt")
    code, out, _ = await run("deploy", "-f", str(spec))
    assert out == f"updated hello version 2 (event): {gw.images.pinned('repo/hello:1')}\n"
    v2_digest = gw.images.digest("repo/hello:1")

    assert await run("alias", "hello", "prod", "1") == (0, "hello:prod -> version 1\n", "")
    code, out, _ = await run("versions", "hello")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["VERSION", "CREATED", "DIGEST", "ALIASES"]
    # CREATED is a local date and time (two words).
    assert [(v[0], v[3], v[4]) for v in rows[1:]] == [
        ("1", v1_digest[:19], "prod"),
        ("2", v2_digest[:19], "$LATEST"),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", v[1]) for v in rows[1:])

    code, out, _ = await run("invoke", "hello", "-q", "prod")
    assert code == 0 and (gw.seen[-1].record.version, gw.seen[-1].version) == (1, "1")
    code, out, _ = await run("invoke", "hello", "--qualifier", "2")
    assert code == 0 and gw.seen[-1].version == "2"
    code, out, _ = await run("invoke", "hello")
    assert code == 0 and (gw.seen[-1].record.version, gw.seen[-1].version) == (2, "$LATEST")
    code, _, err = await run("invoke", "hello", "-q", "nope")
    assert code == 1 and err.startswith("imagefn: VersionNotFound: function 'hello' has no alias")

    code, _, err = await run("alias", "hello", "prod", "9")
    assert code == 1 and err.startswith("imagefn: VersionNotFound: ")
    code, _, err = await run("alias", "hello", "prod")
    assert code == 1 and "VERSION" in err
    assert await run("alias", "hello", "prod", "--delete") == (
        0,
        "removed alias prod of hello\n",
        "",
    )
    code, out, _ = await run("versions", "hello")
    assert "prod" not in out
    code, _, err = await run("versions", "ghost")
    assert code == 1 and err.startswith("imagefn: FunctionNotFound: ")

    code, out, _ = await run("ls")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "VERSION", "IMAGE", "MEMORY", "TIMEOUT"]
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
    assert [e["event"] for e in logs if e["event"].startswith("alias_")] == [
        "alias_set",
        "alias_deleted",
    ]


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


# -- deploy with `build: DIR` ------------------------------------------------------------------

RunCli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def run_cli(
    stack: contextlib.ExitStack,
    gw: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> RunCli:
    monkeypatch.setenv("IMAGEFN_GATEWAY", str(gw.client.make_url("")).rstrip("/"))
    monkeypatch.setenv("IMAGEFN_API_KEY", TEST_ADMIN_KEY)
    stack.enter_context(capture_logs())

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def test_deploy_builds_and_pushes_then_deploys_the_pushed_image(
    run_cli: RunCli, gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[Path, str, str]] = []

    def fake_build_and_push(context: Path, image: str, settings: Settings) -> str:
        built.append((context, image, settings.registry.address))
        return f"{settings.registry.address}/{image}"

    monkeypatch.setattr("cli.images.build_and_push", fake_build_and_push)
    monkeypatch.setenv("IMAGEFN_REGISTRY", "registry.test:5000")
    (tmp_path / "fn").mkdir()
    spec = tmp_path / "fn" / "function.yaml"
    spec.write_text("name: hello\nimage: team/hello:2\nbuild: src\n")
    code, out, err = await run_cli("deploy", "-f", str(spec))
    assert code == 0, err
    # The build directory is relative to the spec file.
    assert built == [(tmp_path / "fn" / "src", "team/hello:2", "registry.test:5000")]
    # The gateway got the pushed reference, and no `build` field.
    assert gw.images.resolved == ["registry.test:5000/team/hello:2"]
    rec = await (await gw.client.get("/v1/functions/hello")).json()
    assert rec["image"] == "registry.test:5000/team/hello:2"
    assert "build" not in rec
    assert out.startswith("created hello version 1 (event): ")


async def test_deploy_takes_the_registry_credentials_from_the_credentials_file(
    run_cli: RunCli, gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RegistrySettings] = []

    def fake_build_and_push(context: Path, image: str, settings: Settings) -> str:
        seen.append(settings.registry)
        return f"{settings.registry.address}/{image}"

    monkeypatch.setattr("cli.images.build_and_push", fake_build_and_push)
    env_file = tmp_path / "credentials.env"
    env_file.write_text(
        "IMAGEFN_DEPLOY_PASSWORD='from-file'\nIMAGEFN_REGISTRY=file.test:5000\n"
        f"IMAGEFN_ADMIN_KEY={TEST_ADMIN_KEY}\n"
    )
    monkeypatch.setenv("IMAGEFN_ENV_FILE", str(env_file))
    # The admin key too comes from the credentials file.
    monkeypatch.delenv("IMAGEFN_API_KEY")
    monkeypatch.setenv("IMAGEFN_REGISTRY", "env.test:5000")
    spec = tmp_path / "function.yaml"
    spec.write_text("name: hello\nimage: team/hello:2\nbuild: .\n")
    code, _, err = await run_cli("deploy", "-f", str(spec))
    assert code == 0, err
    [registry] = seen
    assert (registry.deploy_password, registry.address) == ("from-file", "env.test:5000")


@pytest.mark.parametrize(
    "text",
    ["name: hello\nbuild: src\n", "name: hello\nimage: a:1\nbuild: [src]\n"],
)
async def test_build_needs_a_directory_and_an_image(
    run_cli: RunCli, gw: Gateway, tmp_path: Path, text: str
) -> None:
    spec = tmp_path / "function.yaml"
    spec.write_text(text)
    code, _, err = await run_cli("deploy", "-f", str(spec))
    assert code == 1
    assert err == f"imagefn: {spec}: 'build' is a directory and needs an 'image' to push to\n"
    assert gw.images.resolved == []


async def test_build_failure_is_a_one_line_error_and_nothing_is_deployed(
    run_cli: RunCli, gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.images import ImageBuildError

    def failing(context: Path, image: str, settings: Settings) -> str:
        raise ImageBuildError(f"docker build of {context} failed")

    monkeypatch.setattr("cli.images.build_and_push", failing)
    spec = tmp_path / "function.yaml"
    spec.write_text("name: hello\nimage: team/hello:2\nbuild: .\n")
    code, _, err = await run_cli("deploy", "-f", str(spec))
    assert (code, err) == (1, f"imagefn: docker build of {tmp_path} failed\n")
    assert gw.images.resolved == []


def test_build_and_push_needs_a_dockerfile_and_the_deploy_password(tmp_path: Path) -> None:
    from cli.images import ImageBuildError, build_and_push

    settings = Settings(registry=RegistrySettings(deploy_password="pw"))
    with pytest.raises(ImageBuildError, match="no Dockerfile in"):
        build_and_push(tmp_path, "team/app:1", settings)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(ImageBuildError, match="IMAGEFN_DEPLOY_PASSWORD"):
        build_and_push(tmp_path, "team/app:1", Settings())


def test_target_ref_is_in_the_platform_registry() -> None:
    from cli.images import target_ref

    settings = Settings(registry=RegistrySettings(address="registry.test:5000"))
    ref = target_ref("team/app:1", settings)
    assert (ref.registry, ref.repository, ref.tag) == ("registry.test:5000", "team/app", "1")
    assert target_ref("other.example:1/app", settings).registry == "other.example:1"
    with pytest.raises(InvalidSpec):
        target_ref("Team/App", settings)


async def test_trigger_commands_and_triggers_declared_in_the_spec_file(
    run_cli: RunCli, gw: Gateway, tmp_path: Path
) -> None:
    spec = tmp_path / "function.yaml"
    spec.write_text(
        "name: hello\nimage: repo/hello:1\n"
        "triggers:\n  - {name: nightly, type: timer, cron: '0 0 2 * * *', payload: go}\n"
    )
    code, out, err = await run_cli("deploy", "-f", str(spec))
    assert code == 0, err
    assert "trigger nightly (timer) -> $LATEST" in out
    code, out, err = await run_cli(
        "trigger", "add", "hello", "tick", "--cron", "*/10 * * * * *", "--catch-up", "once"
    )
    assert code == 0, err
    code, out, _ = await run_cli("trigger", "ls", "hello")
    lines = out.splitlines()
    assert lines[0].startswith("NAME") and [ln.split()[0] for ln in lines[1:]] == [
        "nightly",
        "tick",
    ]
    code, out, _ = await run_cli("trigger", "disable", "hello", "tick")
    assert (code, out) == (0, "trigger tick of hello: disabled\n")
    code, out, _ = await run_cli("trigger", "ls", "hello", "--json")
    tick = next(t for t in json.loads(out) if t["name"] == "tick")
    assert tick["enabled"] is False and tick["config"]["catch_up"] == "once"
    assert (await run_cli("trigger", "rm", "hello", "tick"))[0] == 0
    code, _, err = await run_cli("trigger", "add", "hello", "bad", "--cron", "* *")
    assert code == 1 and "cron" in err and "6 or 7" in err
    code, _, err = await run_cli("trigger", "rm", "hello", "tick")
    assert code == 1 and "TriggerNotFound" in err
