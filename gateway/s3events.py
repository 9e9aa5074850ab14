"""``POST /v1/triggers/s3-events``: standard S3 event notifications (``{"Records": [...]}``,
as MinIO's and Ceph RGW's webhook targets send them) turned into cos trigger invocations,
for stores other than the SeaweedFS whose filer feed the trigger runners read.

Each object event is matched against every enabled cos trigger (bucket, events, prefix,
suffix) and submitted asynchronously for each match, like the runners do. The caller's
key needs ``invoke`` on a trigger's function for that trigger to fire (matches it may not
invoke are counted, not named). A record sent again maps to the same request ids (a
digest of the record), so a sender's retry runs nothing twice; the answer is 200 once
every invocation was accepted, 503 when one could not be (send it again).
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from aiohttp import web

from gateway.auth import principal_of
from gateway.context import INVOCATIONS, QUEUE, REDIS, REGISTRY, SETTINGS
from shared import cos_events
from shared.asyncsubmit import async_invocation, submit_async
from shared.errors import ImagefnError, InvalidRequest, ServiceUnavailable
from shared.keys import Keys
from shared.triggers import TriggerStore

routes = web.RouteTableDef()
log = structlog.get_logger("imagefn.gateway.s3events")


@routes.post("/v1/triggers/s3-events")
async def s3_events(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        changes = cos_events.from_s3_records(json.loads(raw or b"null"))
    except ValueError as e:
        raise InvalidRequest(f"an S3 event notification is expected: {e}") from None
    settings = request.app[SETTINGS]
    store = TriggerStore(request.app[REDIS], Keys(settings.queue.prefix))
    triggers = [t for t in await store.list() if t.type == "cos" and t.enabled]
    principal = principal_of(request)
    done: list[dict[str, Any]] = []
    forbidden = 0
    for i, change in enumerate(changes):
        for trigger in triggers:
            if not cos_events.matches(trigger, change):
                continue
            if not principal.allows("invoke", trigger.function):
                forbidden += 1
                continue
            rid = cos_events.request_id(trigger, f"webhook:{change.origin}:{i}")
            body = cos_events.cos_event(change, rid, settings.objectstore.endpoint)
            try:
                record = await request.app[REGISTRY].resolve(trigger.function, trigger.qualifier)
                inv = async_invocation(
                    record, trigger.qualifier, body, rid, f"trigger/{trigger.id}"
                )
                verdict = await submit_async(request.app[INVOCATIONS], request.app[QUEUE], inv)
            except ServiceUnavailable:
                raise  # 503: the sender sends it again; what was accepted stays once
            except ImagefnError as e:
                await store.note(trigger.id, last_error=e.message, errors=1)
                done.append({"trigger": trigger.id, "key": change.key, "error": e.to_dict()})
                continue
            await store.note(trigger.id, last_fired_at=time.time(), last_key=change.key)
            done.append(
                {"trigger": trigger.id, "key": change.key, "request_id": rid, "status": verdict}
            )
    log.info("s3_events", events=len(changes), invocations=len(done), forbidden=forbidden)
    return web.json_response({"events": len(changes), "invocations": done, "forbidden": forbidden})
