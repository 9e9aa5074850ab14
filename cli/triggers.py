"""``imagefn trigger add|ls|rm|enable|disable``, and the ``triggers:`` list of a spec file
that ``imagefn deploy`` creates or updates after the function."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from cli.api import CliError, request_json
from shared.settings import Settings


def _when(ts: Any) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def put_trigger(args: argparse.Namespace, function: str, doc: dict[str, Any]) -> dict[str, Any]:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise CliError(f"a trigger of {function} has no name: {json.dumps(doc)[:200]}")
    answer: dict[str, Any] = request_json(
        args, "PUT", f"/v1/functions/{function}/triggers/{name}", doc
    )
    return answer


def deploy_triggers(args: argparse.Namespace, function: str, triggers: Any) -> None:
    """The spec file's ``triggers:``: each created or replaced; each reported."""
    if not isinstance(triggers, list):
        raise CliError("triggers: a list of {name, type, ...}")
    for doc in triggers:
        if not isinstance(doc, dict):
            raise CliError("triggers: each one a mapping {name, type, ...}")
        t = put_trigger(args, function, doc)
        print(f"  trigger {t['name']} ({t['type']}) -> {t['qualifier']}")


# ``imagefn trigger add --type kafka`` flags, named as the trigger's fields.
KAFKA_FLAGS = (
    "topic",
    "bootstrap",
    "batch_size",
    "batch_window_ms",
    "start",
    "max_retries",
    "max_parallel",
    "on_failure",
    "error_topic",
    "bisect",
)


def _start(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def cmd_trigger_add(args: argparse.Namespace, settings: Settings) -> None:
    doc: dict[str, Any] = {"name": args.trigger, "type": args.type}
    if args.qualifier:
        doc["qualifier"] = args.qualifier
    if args.cron is not None:
        doc["cron"] = args.cron
    if args.payload is not None:
        doc["payload"] = args.payload
    if args.catch_up is not None:
        doc["catch_up"] = args.catch_up
    for key in KAFKA_FLAGS:
        if getattr(args, key, None) is not None:
            doc[key] = getattr(args, key)
    for key in ("bucket", "prefix", "suffix"):  # cos
        if getattr(args, key, None) is not None:
            doc[key] = getattr(args, key)
    if getattr(args, "events", None):
        doc["events"] = [e.strip() for e in args.events.split(",") if e.strip()]
    t = put_trigger(args, args.name, doc)
    print(f"trigger {t['name']} of {t['function']} ({t['type']}) -> {t['qualifier']}")


def cmd_trigger_ls(args: argparse.Namespace, settings: Settings) -> None:
    found = request_json(args, "GET", f"/v1/functions/{args.name}/triggers")["triggers"]
    if args.json:
        print(json.dumps(found, indent=2))
        return
    if not found:
        print(f"{args.name} has no triggers")
        return
    head = ("NAME", 16), ("TYPE", 7), ("ENABLED", 9), ("QUALIFIER", 11), ("LAST FIRED", 22)
    print("".join(f"{h:<{w}}" for h, w in head) + f"{'NEXT':<22}ERRORS")
    for t in found:
        st = t.get("state", {})
        print(
            f"{t['name'][:15]:<16}{t['type']:<7}{'yes' if t['enabled'] else 'no':<9}"
            f"{t['qualifier'][:10]:<11}{_when(st.get('last_fired_at')):<22}"
            f"{_when(st.get('next_fire_at')) if t['enabled'] else '-':<22}{st.get('errors', 0)}"
        )


def cmd_trigger_rm(args: argparse.Namespace, settings: Settings) -> None:
    from cli.api import request

    request(args, "DELETE", f"/v1/functions/{args.name}/triggers/{args.trigger}")
    print(f"removed trigger {args.trigger} of {args.name}")


def _set_enabled(args: argparse.Namespace, action: str) -> None:
    t = request_json(args, "POST", f"/v1/functions/{args.name}/triggers/{args.trigger}/{action}")
    print(f"trigger {t['name']} of {t['function']}: {'enabled' if t['enabled'] else 'disabled'}")


def cmd_trigger_enable(args: argparse.Namespace, settings: Settings) -> None:
    _set_enabled(args, "enable")


def cmd_trigger_disable(args: argparse.Namespace, settings: Settings) -> None:
    _set_enabled(args, "disable")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tr = sub.add_parser("trigger", help="add, list, remove, enable and disable triggers")
    ts = tr.add_subparsers(dest="trigger_command", required=True, metavar="ACTION")
    add = ts.add_parser("add", help="create or replace a trigger of a function")
    add.add_argument("name", help="the function")
    add.add_argument("trigger", help="the trigger's name")
    add.add_argument(
        "--type", default="timer", choices=["timer", "kafka", "cos"], help="timer (the default)"
    )
    add.add_argument("--cron", help="timer: 'second minute hour day month weekday [year]'")
    add.add_argument("--payload", help="timer: the event's Message")
    add.add_argument("--catch-up", choices=["skip", "once"], help="timer: after downtime")
    add.add_argument("-q", "--qualifier", default="", help="version or alias ($LATEST)")
    add.add_argument("--topic", help="kafka: the topic to consume (it must exist)")
    add.add_argument("--bootstrap", help="kafka: host:port,... ('' = the platform's cluster)")
    add.add_argument("--batch-size", type=int, help="kafka: records per call, 1..1000 (10)")
    add.add_argument("--batch-window-ms", type=int, help="kafka: flush a batch after (500)")
    add.add_argument("--start", type=_start, help="kafka: earliest, latest (default) or ms")
    add.add_argument("--max-retries", type=int, help="kafka: retries of a failing batch (2)")
    add.add_argument("--max-parallel", type=int, help="kafka: partitions in calls at once (4)")
    add.add_argument("--on-failure", choices=["error_topic", "skip"], help="kafka: after retries")
    add.add_argument(
        "--error-topic", help="kafka: where failed records go (<topic>.imagefn-errors)"
    )
    add.add_argument(
        "--bisect", action=argparse.BooleanOptionalAction, help="kafka: split failing batches"
    )
    add.add_argument("--bucket", help="cos: the bucket whose objects fire it (it must exist)")
    add.add_argument("--events", help="cos: created, removed or created,removed (created)")
    add.add_argument("--prefix", help="cos: only keys starting with this")
    add.add_argument("--suffix", help="cos: only keys ending with this (e.g. .jpg)")
    add.set_defaults(fn=cmd_trigger_add)
    ls = ts.add_parser("ls", help="a function's triggers and their state")
    ls.add_argument("name")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_trigger_ls)
    for action, fn, text in (
        ("rm", cmd_trigger_rm, "delete a trigger"),
        ("enable", cmd_trigger_enable, "enable a trigger"),
        ("disable", cmd_trigger_disable, "disable a trigger (it keeps its configuration)"),
    ):
        p = ts.add_parser(action, help=text)
        p.add_argument("name")
        p.add_argument("trigger")
        p.set_defaults(fn=fn)
