"""The audit middleware and ``GET /v1/audit``: every control action — a request that
changes the platform's configuration — is recorded with the caller's key id, source
address, time and outcome, whether it succeeded, failed or was refused."""

from __future__ import annotations

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway.auth import principal_of, route_pattern
from gateway.context import AUDIT, REQUEST_ID
from gateway.errors import Handler
from gateway.params import whole_number
from shared.audit import AuditEntry
from shared.errors import ImagefnError

routes = web.RouteTableDef()
log = structlog.get_logger("imagefn.gateway.audit")

# (method, route pattern) → the action's name in the audit log.
CONTROL_ACTIONS: dict[tuple[str, str], str] = {
    ("PUT", "/v1/functions/{name}"): "function.deploy",
    ("DELETE", "/v1/functions/{name}"): "function.delete",
    ("PUT", "/v1/functions/{name}/aliases/{alias}"): "alias.set",
    ("DELETE", "/v1/functions/{name}/aliases/{alias}"): "alias.delete",
    ("POST", "/v1/functions/{name}/dlq/redrive"): "dlq.redrive",
    ("DELETE", "/v1/functions/{name}/dlq"): "dlq.purge",
    ("DELETE", "/v1/functions/{name}/dlq/{request_id}"): "dlq.delete",
    ("DELETE", "/v1/batches/{batch_id}"): "batch.cancel",
    ("PUT", "/v1/functions/{name}/triggers/{trigger}"): "trigger.put",
    ("DELETE", "/v1/functions/{name}/triggers/{trigger}"): "trigger.delete",
    ("POST", "/v1/functions/{name}/triggers/{trigger}/enable"): "trigger.enable",
    ("POST", "/v1/functions/{name}/triggers/{trigger}/disable"): "trigger.disable",
    ("POST", "/v1/keys"): "key.create",
    ("DELETE", "/v1/keys/{key_id}"): "key.revoke",
}
MAX_LIMIT = 1000


@web.middleware
async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    pattern = route_pattern(request)
    action = CONTROL_ACTIONS.get((request.method, pattern)) if pattern else None
    if action is None:
        return await handler(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ImagefnError as e:
        status = e.http_status
        raise
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        info = request.match_info
        target = (
            info.get("alias")
            or info.get("trigger")
            or info.get("key_id")
            or info.get("batch_id")
            or ""
        )
        entry = AuditEntry(
            action=action,
            key_id=principal_of(request).key_id,
            source=request.remote or "",
            status=status,
            request_id=request.get(REQUEST_ID, ""),
            function=info.get("name", ""),
            target=target or info.get("request_id", ""),
        )
        try:
            await request.app[AUDIT].record(entry)
        except RedisError as e:
            # The action happened (or not) regardless; the log line keeps the trace.
            log.error("audit_write_failed", error=str(e), **entry.to_dict())


@routes.get("/v1/audit")
async def read_audit(request: web.Request) -> web.Response:
    limit = whole_number(request.query, "limit", 100, 1, MAX_LIMIT)
    function = request.query.get("function", "")
    entries = await request.app[AUDIT].read(limit, function)
    return web.json_response({"entries": entries})
