"""The triggers API: ``/v1/functions/{name}/triggers`` (list), ``…/{trigger}`` (create or
replace with PUT, read, delete) and ``…/{trigger}/enable|disable``. A trigger needs its
function to exist; it names a qualifier that is resolved each time it fires, so it may
name an alias published later. Reads show each trigger's observed state."""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.context import REDIS, REGISTRY, SETTINGS
from gateway.params import json_object
from shared.errors import InvalidRequest
from shared.kafkasource import check_source
from shared.keys import Keys
from shared.objectstore import check_bucket
from shared.triggers import COMMON_FIELDS, CONFIG_FIELDS, TriggerStore, parse_trigger

routes = web.RouteTableDef()
log = structlog.get_logger("imagefn.gateway.triggers")

ALL_FIELDS = COMMON_FIELDS.union(*CONFIG_FIELDS.values())


def store(request: web.Request) -> TriggerStore:
    return TriggerStore(request.app[REDIS], Keys(request.app[SETTINGS].queue.prefix))


async def _with_state(
    s: TriggerStore, trigger_id: str, doc: dict[str, object]
) -> dict[str, object]:
    return {**doc, "state": await s.state(trigger_id)}


@routes.get("/v1/functions/{name}/triggers")
async def list_triggers(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[REGISTRY].get(name)  # FunctionNotFound for an unknown function
    s = store(request)
    found = [await _with_state(s, t.id, t.to_dict()) for t in await s.list(name)]
    return web.json_response({"function": name, "triggers": found})


@routes.put("/v1/functions/{name}/triggers/{trigger}")
async def put_trigger(request: web.Request) -> web.Response:
    name, tname = request.match_info["name"], request.match_info["trigger"]
    doc = await json_object(request, "trigger body", ALL_FIELDS, "{type, ...}")
    doc.setdefault("name", tname)
    trigger = parse_trigger(name, doc)
    if trigger.name != tname:
        raise InvalidRequest(f"name: {trigger.name!r} does not match the URL's {tname!r}")
    await request.app[REGISTRY].get(name)  # the function must exist
    if trigger.type == "kafka":
        # Its brokers answer and its topic exists, or nothing is stored (503/400).
        await check_source(request.app[SETTINGS].kafka, trigger)
    if trigger.type == "cos":
        # Its bucket exists in the object store, or nothing is stored (400/503).
        await check_bucket(request.app[SETTINGS].objectstore, str(trigger.config["bucket"]))
    stored, created = await store(request).put(trigger)
    log.info("trigger_saved", function=name, trigger=tname, type=stored.type)
    return web.json_response(stored.to_dict(), status=201 if created else 200)


@routes.get("/v1/functions/{name}/triggers/{trigger}")
async def get_trigger(request: web.Request) -> web.Response:
    s = store(request)
    t = await s.get(request.match_info["name"], request.match_info["trigger"])
    return web.json_response(await _with_state(s, t.id, t.to_dict()))


@routes.delete("/v1/functions/{name}/triggers/{trigger}")
async def delete_trigger(request: web.Request) -> web.Response:
    await store(request).delete(request.match_info["name"], request.match_info["trigger"])
    return web.Response(status=204)


async def _set_enabled(request: web.Request, enabled: bool) -> web.Response:
    t = await store(request).set_enabled(
        request.match_info["name"], request.match_info["trigger"], enabled
    )
    return web.json_response(t.to_dict())


@routes.post("/v1/functions/{name}/triggers/{trigger}/enable")
async def enable_trigger(request: web.Request) -> web.Response:
    return await _set_enabled(request, True)


@routes.post("/v1/functions/{name}/triggers/{trigger}/disable")
async def disable_trigger(request: web.Request) -> web.Response:
    return await _set_enabled(request, False)
