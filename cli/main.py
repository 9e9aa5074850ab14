"""The ``imagefn`` command line.

Server commands (``up``, ``gateway``, ``worker``, ``coldstart``) load settings once from
the environment and run in the foreground until Ctrl-C/SIGTERM, then stop cleanly. Client
commands talk to a gateway's HTTP API (``--gateway`` or IMAGEFN_GATEWAY, default http://127.0.0.1:8080)
and print one clear line on error.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import yaml
from aiodocker.exceptions import DockerError
from redis.exceptions import RedisError

# The HTTP helpers live in cli/api.py (shared with cli/asyncinv.py and cli/batch.py); the
# names stay importable from here as before.
from cli.api import CliError as CliError
from cli.api import describe_error as _describe_error  # noqa: F401
from cli.api import gateway_error as _gateway_error
from cli.api import request as _request
from cli.asyncinv import add_parsers as add_async_parsers
from cli.asyncinv import invoke_async
from cli.batch import add_parsers as add_batch_parsers
from cli.keys import add_parsers as add_keys_parsers
from cli.logs import render as render_log
from cli.logs import sse_events
from cli.triggers import add_parsers as add_trigger_parsers
from cli.triggers import deploy_triggers
from shared.errors import ImagefnError
from shared.http import CALLER_REQUEST_ID
from shared.logs import configure_logging
from shared.roles import (
    COMMAND_ROLES,
    credentials_refused,
    redis_user,
    role_env,
    role_variable,
)
from shared.settings import DEFAULT_ENV_FILE, Settings, load_settings, read_env_file

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


# -- server commands ------------------------------------------------------------------------


def _serve(
    settings: Settings, *parts: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(p(settings, stop), name=p.__name__) for p in parts]
        # If one part dies, stop the others instead of running half a platform.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r

    configure_logging(settings.log_level)
    with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner:
        runner.run(main())


def _loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not settings.uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_up(args: argparse.Namespace, settings: Settings) -> None:
    from gateway.service import serve_gateway
    from workers.coldstart import serve_coldstart
    from workers.scheduler import serve_scheduler
    from workers.service import serve_worker
    from workers.triggers import serve_triggers

    gateway: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]] = serve_gateway
    if settings.up_gateway_process:
        # The gateway on a core of its own (cli/up.py).
        from cli.up import serve_gateway_process

        gateway = serve_gateway_process
    _serve(settings, gateway, serve_worker, serve_coldstart, serve_scheduler, serve_triggers)


def cmd_triggers(args: argparse.Namespace, settings: Settings) -> None:
    from workers.triggers import serve_triggers

    _serve(settings, serve_triggers)


def cmd_scheduler(args: argparse.Namespace, settings: Settings) -> None:
    from workers.scheduler import serve_scheduler

    _serve(settings, serve_scheduler)


def cmd_coldstart(args: argparse.Namespace, settings: Settings) -> None:
    from workers.coldstart import serve_coldstart

    _serve(settings, serve_coldstart)


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> None:
    from gateway.service import serve_gateway

    _serve(settings, serve_gateway)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    from workers.service import serve_worker

    _serve(settings, serve_worker)


# -- client commands ------------------------------------------------------------------------


def _load_spec_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CliError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    is_yaml = p.suffix in (".yaml", ".yml")
    try:
        doc = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise CliError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise CliError(f"{path}: a function spec is a mapping with at least 'name' and 'image'")
    return doc


def merge_env(doc: dict[str, Any], pairs: list[str], source: str) -> None:
    """``--env NAME=VALUE`` over the spec's own ``env``: values that differ per machine or
    are secret (a store's endpoint and keys) stay out of the spec file. The gateway
    checks names and sizes as for any spec."""
    if not pairs:
        return
    env = doc.get("env", {})
    if not isinstance(env, dict):
        raise CliError(f"{source}: 'env' must be a mapping of names to string values")
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    doc["env"] = env


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> None:
    doc = _load_spec_file(args.file)
    merge_env(doc, args.env, args.file)
    # `build: DIR` (relative to the spec file) is the CLI's business: build and push the
    # image there, then deploy the spec, whose tag the gateway pins to its digest.
    build = doc.pop("build", None)
    # `triggers:` too: created or updated once the function is deployed.
    triggers = doc.pop("triggers", None)
    if build is not None:
        if not isinstance(build, str) or not isinstance(doc.get("image"), str):
            raise CliError(f"{args.file}: 'build' is a directory and needs an 'image' to push to")
        from cli.images import ImageBuildError, build_and_push

        try:
            doc["image"] = build_and_push(Path(args.file).parent / build, doc["image"], settings)
        except (ImageBuildError, ImagefnError) as e:
            raise CliError(str(e)) from None
    status, _, raw = _request(args, "PUT", f"/v1/functions/{doc['name']}", json.dumps(doc).encode())
    rec = json.loads(raw)
    verb = "created" if status == 201 else "updated"
    print(f"{verb} {rec['name']} version {rec['version']} ({rec['type']}): {rec['image_ref']}")
    if triggers is not None:
        deploy_triggers(args, rec["name"], triggers)


def cmd_invoke(args: argparse.Namespace, settings: Settings) -> None:
    if args.request_id is not None and not CALLER_REQUEST_ID.match(args.request_id):
        raise CliError("--request-id: 8-64 characters of A-Za-z0-9._-")
    data = args.data
    if data.startswith("@"):
        try:
            data = Path(data[1:]).read_text()
        except OSError as e:
            raise CliError(f"cannot read {data[1:]}: {e.strerror}") from None
    try:
        json.loads(data)
    except ValueError as e:
        raise CliError(f"--data is not valid JSON: {e}") from None
    path = f"/v1/functions/{args.name}/invoke"
    if args.qualifier:
        path += "?" + urllib.parse.urlencode({"qualifier": args.qualifier})
    # With --log the CLI names the request itself, so that its logs can be found even
    # when the call fails.
    request_id = args.request_id or (f"cli-{uuid.uuid4().hex}" if args.log else None)
    sent = {"X-Request-Id": request_id} if request_id else {}
    if args.async_:
        invoke_async(args, path, data.encode(), sent)
        return
    started = time.monotonic()
    try:
        _, headers, body = _request(args, "POST", path, data.encode(), headers=sent)
    except CliError as e:
        # A call that reached an instance has logs worth seeing; one refused before
        # (no such function, throttled, bad event) has none.
        if args.log and request_id and e.error and e.error.get("instance"):
            _show_invocation_logs(args, request_id, started)
        raise
    sys.stdout.write(body.decode("utf-8", "replace"))
    if not body.endswith(b"\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        for k in ("X-Request-Id", "X-Imagefn-Instance", "X-Imagefn-Cold-Start", "Server-Timing"):
            if k in headers:
                print(f"{k}: {headers[k]}", file=sys.stderr)
    if args.log:
        _show_invocation_logs(args, headers.get("X-Request-Id") or str(request_id), started)


# How long `invoke --log` waits for the invocation's REPORT record.
REPORT_WAIT_S = 15.0
# While following, the gateway sends a heartbeat every 15 s: this much silence means the
# connection is dead.
FOLLOW_READ_TIMEOUT_S = 60.0


def _show_invocation_logs(args: argparse.Namespace, request_id: str, started: float) -> None:
    """The invocation's records on stderr (the result stays alone on stdout). Failing to
    read them is said in one line; the invocation's own outcome stands."""
    # The call started this long ago (by this machine's clock; the gateway's is not
    # needed), plus a margin for queueing before it.
    since = int(time.monotonic() - started) + 60
    query = {
        "request_id": request_id,
        "wait_report": "1",
        "timeout": f"{REPORT_WAIT_S:g}",
        "since": f"{since}s",
    }
    path = f"/v1/functions/{urllib.parse.quote(args.name)}/logs?{urllib.parse.urlencode(query)}"
    try:
        _print_log_stream(args, path, sys.stderr, follow=True, raw_json=False)
    except CliError as e:
        print(f"imagefn: no logs: {e}", file=sys.stderr)


def _print_log_stream(
    args: argparse.Namespace, path: str, out: TextIO, *, follow: bool, raw_json: bool
) -> None:
    """Print the records of a logs API answer (asked as Server-Sent Events) as they
    come; notices go to stderr as one line each."""
    url = args.gateway.rstrip("/") + path
    req = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
    if getattr(args, "api_key", ""):
        req.add_header("Authorization", f"Bearer {args.api_key}")
    timeout = FOLLOW_READ_TIMEOUT_S if follow else args.timeout
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for event in sse_events(resp):
                if event.event == "end":
                    return
                doc = json.loads(event.data)
                if event.event == "notice":
                    if doc.get("notice") == "error":
                        err = doc.get("error") or {}
                        raise CliError(
                            f"{err.get('type', 'Error')}: {doc.get('message', '')}", error=err
                        )
                    print(f"imagefn: {doc.get('message', doc)}", file=sys.stderr, flush=True)
                elif event.event == "message":
                    out.write((event.data if raw_json else render_log(doc)) + "\n")
                    out.flush()
    except urllib.error.URLError as e:
        raise _gateway_error(args, e) from None
    except BrokenPipeError:
        raise  # our reader went away (`| head`), not the gateway: cmd_logs stops quietly
    except TimeoutError:
        raise CliError(f"the gateway at {args.gateway} went silent for {timeout:g} s") from None
    except (http.client.HTTPException, ConnectionError, ValueError) as e:
        raise CliError(f"the log stream from {args.gateway} broke off: {e}") from None
    raise CliError(f"the log stream from {args.gateway} ended early (connection closed)")


def cmd_logs(args: argparse.Namespace, settings: Settings) -> None:
    query = {
        key: value
        for key, value in (
            ("version", args.version),
            ("request_id", args.request_id),
            ("since", args.since),
            ("until", args.until),
            ("limit", None if args.limit is None else str(args.limit)),
            ("follow", "1" if args.follow else None),
        )
        if value is not None
    }
    path = f"/v1/functions/{urllib.parse.quote(args.name)}/logs"
    if query:
        path += "?" + urllib.parse.urlencode(query)
    try:
        _print_log_stream(args, path, sys.stdout, follow=args.follow, raw_json=args.json)
    except BrokenPipeError:
        # The reader went away (`imagefn logs fn | head`): stop quietly, and keep Python
        # from failing again on flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_ls(args: argparse.Namespace, settings: Settings) -> None:
    _, _, raw = _request(args, "GET", "/v1/functions")
    fns = json.loads(raw)["functions"]
    if not fns:
        print("no functions deployed")
        return
    rows = [("NAME", "TYPE", "VERSION", "IMAGE", "MEMORY", "TIMEOUT")] + [
        (
            f["name"],
            f["type"],
            str(f["version"]),
            f["image"],
            f"{f['memory_mb']}MB",
            f"{f['timeout_s']:g}s",
        )
        for f in fns
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_versions(args: argparse.Namespace, settings: Settings) -> None:
    _, _, raw = _request(args, "GET", f"/v1/functions/{args.name}/versions")
    found = json.loads(raw)
    by_version: dict[int, list[str]] = {}
    for alias, version in found["aliases"].items():
        by_version.setdefault(version, []).append(alias)
    rows = [("VERSION", "CREATED", "DIGEST", "ALIASES")]
    for v in found["versions"]:
        names = sorted(by_version.get(v["version"], []))
        if v["version"] == found["latest"]:
            names.insert(0, "$LATEST")
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["updated_at"]))
        rows.append((str(v["version"]), created, v["image_digest"][:19], ",".join(names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_alias(args: argparse.Namespace, settings: Settings) -> None:
    if args.delete:
        _request(args, "DELETE", f"/v1/functions/{args.name}/aliases/{args.alias}")
        print(f"removed alias {args.alias} of {args.name}")
        return
    if args.version is None:
        raise CliError("give the VERSION the alias points at (or --delete)")
    body = json.dumps({"version": args.version}).encode()
    _request(args, "PUT", f"/v1/functions/{args.name}/aliases/{args.alias}", body)
    print(f"{args.name}:{args.alias} -> version {args.version}")


def cmd_rm(args: argparse.Namespace, settings: Settings) -> None:
    _request(args, "DELETE", f"/v1/functions/{args.name}")
    print(f"removed {args.name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagefn", description="Run container images as functions.")
    p.add_argument("--gateway", default=None, help=f"gateway URL (default {DEFAULT_GATEWAY})")
    p.add_argument("--timeout", type=float, default=960.0, help="client timeout in seconds")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "up",
        help="run a gateway, a worker, a cold-start manager, a scheduler and a trigger runner "
        "in the foreground",
    ).set_defaults(fn=cmd_up)
    sub.add_parser("gateway", help="run a gateway in the foreground").set_defaults(fn=cmd_gateway)
    sub.add_parser("worker", help="run a worker in the foreground").set_defaults(fn=cmd_worker)
    sub.add_parser(
        "scheduler",
        help="run a scheduler (retries, batch feeding, destinations) in the foreground",
    ).set_defaults(fn=cmd_scheduler)
    sub.add_parser(
        "coldstart", help="run a cold-start manager (provisioned instances) in the foreground"
    ).set_defaults(fn=cmd_coldstart)
    sub.add_parser("triggers", help="run a trigger runner (timers) in the foreground").set_defaults(
        fn=cmd_triggers
    )
    d = sub.add_parser("deploy", help="create or replace a function from a spec file")
    d.add_argument("-f", "--file", required=True, help="function spec, YAML or JSON")
    d.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable over the spec's env (repeatable)",
    )
    d.set_defaults(fn=cmd_deploy)
    i = sub.add_parser("invoke", help="invoke an event function and print its result")
    i.add_argument("name")
    i.add_argument("--data", default="{}", help="event JSON, or @file")
    i.add_argument("-q", "--qualifier", default="", help="version number or alias ($LATEST)")
    i.add_argument(
        "-v", "--verbose", action="store_true", help="show request id, instance, timings"
    )
    i.add_argument(
        "--log",
        action="store_true",
        help="then print the invocation's log records to stderr (up to its REPORT)",
    )
    i.add_argument("--request-id", default=None, help="send this request id (8-64 of A-Za-z0-9._-)")
    i.add_argument(
        "--async",
        dest="async_",
        action="store_true",
        help="queue the call and print its request id at once (see: imagefn invocation ID)",
    )
    i.set_defaults(fn=cmd_invoke)
    lg = sub.add_parser("logs", help="print a function's log records (-f: keep following)")
    lg.add_argument("name")
    lg.add_argument("--request-id", default=None, help="only this invocation's records")
    lg.add_argument("--version", default=None, help="only this version (number or alias)")
    lg.add_argument(
        "--since",
        default=None,
        help="from this time: 10m, 2h, 1d ago, RFC 3339 or epoch seconds (default: 1 h ago; "
        "24 h with --request-id)",
    )
    lg.add_argument("--until", default=None, help="up to this time (same forms as --since)")
    lg.add_argument(
        "--limit", type=int, default=None, help="at most this many (the newest; default 1000)"
    )
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    lg.add_argument("--json", action="store_true", help="print the records as JSON lines")
    lg.set_defaults(fn=cmd_logs)
    sub.add_parser("ls", help="list functions").set_defaults(fn=cmd_ls)
    v = sub.add_parser("versions", help="list a function's versions and aliases")
    v.add_argument("name")
    v.set_defaults(fn=cmd_versions)
    a = sub.add_parser("alias", help="point an alias at a version (rollback), or delete it")
    a.add_argument("name")
    a.add_argument("alias")
    a.add_argument("version", nargs="?", type=int)
    a.add_argument("--delete", action="store_true")
    a.set_defaults(fn=cmd_alias)
    r = sub.add_parser("rm", help="delete a function")
    r.add_argument("name")
    r.set_defaults(fn=cmd_rm)
    add_async_parsers(sub)  # invocation, dlq
    add_batch_parsers(sub)
    add_keys_parsers(sub)
    add_trigger_parsers(sub)
    return p


def _redacted(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _credentials_hint(role: str | None, message: str) -> None:
    """After Redis refused a server command's credentials: where its URL comes from."""
    if role is not None and credentials_refused(message):
        print(
            f"imagefn: this command runs as Redis user {redis_user(role)}; its URL is "
            f"{role_variable('IMAGEFN_REDIS_URL', role)} (or IMAGEFN_REDIS_URL), which "
            f"deploy/setup.sh writes into {DEFAULT_ENV_FILE}",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    role: str | None = None
    try:
        # The environment wins over the credentials file deploy/setup.sh writes; a
        # server command takes its role's Redis URL (and Kafka principal) from either.
        env_file = os.environ.get("IMAGEFN_ENV_FILE") or DEFAULT_ENV_FILE
        role = COMMAND_ROLES.get(args.command)
        settings = load_settings(role_env(role, os.environ, read_env_file(env_file)))
        if args.gateway is None:
            args.gateway = os.environ.get("IMAGEFN_GATEWAY", DEFAULT_GATEWAY)
        # The caller's own key wins; the operator's bootstrap admin key (from the
        # credentials file, when this user can read it) is the fallback.
        args.api_key = os.environ.get("IMAGEFN_API_KEY") or settings.auth.admin_key
        args.fn(args, settings)
    except (CliError, ImagefnError) as e:
        print(f"imagefn: {e}", file=sys.stderr)
        _credentials_hint(role, str(e))
        return 1
    except RedisError as e:
        print(
            f"imagefn: Redis at {_redacted(settings.redis.url)} unavailable: {e}", file=sys.stderr
        )
        _credentials_hint(role, str(e))
        return 1
    except DockerError as e:
        print(f"imagefn: Docker engine unavailable: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"imagefn: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
