"""Hostile deploy bodies against the real gateway: YAML alias bombs, deep nesting and
oversized specs are refused with a 400/413 naming the problem within a bound, and the
gateway keeps answering ``/healthz`` meanwhile (the parse runs off the event loop)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from tests.integration.conftest import Platform, unique

# A billion-laughs bomb: each level refers to the one before nine times.
BOMB = "a0: &a0 [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"a{i}: &a{i} [*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},"
    f"*a{i - 1},*a{i - 1},*a{i - 1}]\n"
    for i in range(1, 10)
)
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "a:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(60)) + " " * 62 + "1\n"
BIG_YAML = "name: x\nimage: y\ncommand:\n" + "- xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" * 40_000


async def test_hostile_specs_are_clear_errors_and_healthz_keeps_answering(
    platform: Platform, client: aiohttp.ClientSession
) -> None:
    name = unique("hostile")
    cases = [
        (BOMB, "application/yaml", 400, "alias"),
        (DEEP_JSON, "application/json", 413, "at most"),  # 200 KB: refused by size first
        (DEEP_JSON[:30_000] + DEEP_JSON[-30_000:], "application/json", 400, "nests deeper"),
        (DEEP_YAML, "application/yaml", 400, "nests deeper"),
        (BIG_YAML, "application/yaml", 413, "at most"),
    ]
    health_ms: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            async with client.get(f"{platform.url}/healthz") as r:
                assert r.status == 200
            health_ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.01)

    async def send(body: str, ctype: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        async with client.put(
            f"{platform.url}/v1/functions/{name}",
            data=body.encode(),
            headers={"Content-Type": ctype},
        ) as r:
            return r.status, await r.text(), time.perf_counter() - t0

    prober = asyncio.create_task(probe())
    try:
        # Each case several times at once: a burst, not one polite request.
        results = await asyncio.gather(*(send(b, c) for b, c, _, _ in cases for _ in range(4)))
    finally:
        stop.set()
        await prober
    for (body, ctype, status, words), (got, text, took) in zip(
        [c for c in cases for _ in range(4)], results, strict=True
    ):
        assert got == status, (ctype, len(body), text[:300])
        assert words in json.loads(text)["error"]["message"], text[:300]
        assert len(text) < 2000  # the answer names the problem; it does not echo the body
        assert took < 5, (ctype, len(body), took)
    assert health_ms, "healthz was never answered"
    assert max(health_ms) < 1000, f"healthz waited {max(health_ms):.0f} ms"
    async with client.get(f"{platform.url}/v1/functions/{name}") as r:
        assert r.status == 404  # nothing was deployed
