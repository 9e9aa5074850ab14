"""Spec bodies (``PUT /v1/functions/{name}``) read safely: JSON, or YAML without aliases,
both bounded in size and nesting, parsed off the event loop.

YAML aliases are refused outright: a spec never needs them, and a few hundred bytes of
nested aliases ("billion laughs") expand to millions of nodes. Nesting is bounded so that
neither parser recurses past Python's limit, and a size bound keeps a large body from
holding a parser thread for long.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from shared.errors import InvalidRequest, RequestTooLarge

# A spec is a few hundred bytes; env is at most 4 KB.
MAX_SPEC_BYTES = 64 * 1024
MAX_DEPTH = 32


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a spec", mark
            )
        return super().compose_node(parent, index)


def _depth_ok(doc: Any) -> bool:
    """Whether ``doc`` nests at most MAX_DEPTH levels (checked without recursion)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                return False
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_spec_body(raw: bytes, content_type: str) -> Any:
    """The decoded spec document; InvalidRequest (400) or RequestTooLarge (413) naming
    the problem. Blocking: call it in a thread."""
    kind = "YAML" if "yaml" in content_type else "JSON"
    if len(raw) > MAX_SPEC_BYTES:
        raise RequestTooLarge(
            f"a spec body is at most {MAX_SPEC_BYTES} bytes; this one is {len(raw)} bytes"
        )
    try:
        if kind == "YAML":
            doc = yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader)
        else:
            doc = json.loads(raw or b"null")
    except RecursionError:
        doc = None
        deep = True
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid {kind}: {str(e)[:500]}") from None
    else:
        deep = not _depth_ok(doc)
    if deep:
        raise InvalidRequest(f"request body ({kind}) nests deeper than {MAX_DEPTH} levels")
    return doc
