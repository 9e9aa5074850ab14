"""``imagefn keys create|ls|revoke`` and ``imagefn audit``: API keys and the audit log
(both need an admin key)."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from cli.api import request_json
from shared.settings import Settings


def _when(ts: Any) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> None:
    doc: dict[str, Any] = {"name": args.name, "scopes": args.scopes}
    if args.expires_in is not None:
        doc["expires_in_s"] = args.expires_in
    key = request_json(args, "POST", "/v1/keys", doc)
    if args.json:
        print(json.dumps(key, indent=2))
        return
    print(key["key"])
    print(
        f"# key {key['id']} ({key['name']}): {' '.join(key['scopes'])}; "
        f"expires {_when(key.get('expires_at'))}. Shown once: keep it now.",
    )


def cmd_keys_ls(args: argparse.Namespace, settings: Settings) -> None:
    keys = request_json(args, "GET", "/v1/keys")["keys"]
    if args.json:
        print(json.dumps(keys, indent=2))
        return
    print(f"{'ID':<14}{'NAME':<20}{'STATE':<9}{'CREATED':<22}{'EXPIRES':<22}SCOPES")
    for k in keys:
        print(
            f"{k['id']:<14}{k['name'][:19]:<20}{k['state']:<9}{_when(k['created_at']):<22}"
            f"{_when(k.get('expires_at')):<22}{' '.join(k['scopes'])}"
        )


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> None:
    key = request_json(args, "DELETE", f"/v1/keys/{args.id}")
    print(f"revoked key {key['id']} ({key['name']})")


def cmd_audit(args: argparse.Namespace, settings: Settings) -> None:
    path = f"/v1/audit?limit={args.limit}"
    if args.function:
        path += f"&function={args.function}"
    entries = request_json(args, "GET", path)["entries"]
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    for e in entries:
        what = e["function"] + (f"/{e['target']}" if e.get("target") else "")
        print(
            f"{_when(e['at'])}  {e['action']:<16}{e['outcome']:<8}{e['status']:<5}"
            f"key={e['key_id']:<14}from={e['source']:<16}{what}"
        )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (admin)")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="create a key and print it (shown once)")
    c.add_argument("name", help="a label for the key")
    c.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        metavar="SCOPE",
        help="admin, or ACTION:PATTERN with ACTION deploy|invoke|read|secrets|logs and "
        "PATTERN a function name, a prefix ending in '*', or '*' (repeatable)",
    )
    c.add_argument("--expires-in", type=float, default=None, help="seconds until it expires")
    c.add_argument("--json", action="store_true", help="print the answer as JSON")
    c.set_defaults(fn=cmd_keys_create)
    ls = ks.add_parser("ls", help="list keys (never their secrets)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_keys_ls)
    rv = ks.add_parser("revoke", help="revoke a key (every gateway refuses it within seconds)")
    rv.add_argument("id", help="the key id (ifn_<id>_…)")
    rv.set_defaults(fn=cmd_keys_revoke)
    au = sub.add_parser("audit", help="show the audit log of control actions (admin)")
    au.add_argument("--function", default="", help="only this function's entries")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("--json", action="store_true")
    au.set_defaults(fn=cmd_audit)
