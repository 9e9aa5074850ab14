"""Object-storage (cos) triggers on a real platform: a SeaweedFS whose filer publishes its
changes to the session's Kafka-protocol broker, two trigger runners sharing its topic,
a worker running containers. Uploads made with boto3 fire each matching trigger exactly
once, with the COS event; a multipart upload fires once; prefix, suffix and event filters
hold; S3-format notifications posted to the webhook route fire too; a bucket that does
not exist is refused. And the media example (examples/media) turns an uploaded clip into
its thumbnail and preview in another bucket, through the S3 front end for functions."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import redis.asyncio as aioredis
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from shared.keys import Keys
from tests.integration.conftest import (
    KAFKA,
    Platform,
    RegistryInfo,
    running_platform,
    unique,
)
from tests.integration.seaweedfs_support import (
    FunctionFront,
    SeaweedFS,
    start_function_front,
    start_seaweedfs,
    weed_binary,
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    store = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), KAFKA["bootstrap"])
    yield store
    store.stop()


@pytest.fixture(scope="module")
async def cos_platform(
    pushed_images: None,
    seaweedfs: SeaweedFS,
    redis_url: str,
    log_dir: Path,
    registry: RegistryInfo,
) -> AsyncIterator[Platform]:
    """A platform configured with the store, with two trigger runners that both hold
    partitions of its events topic."""
    async with running_platform(
        redis_url, log_dir, registry, workers=1, extra_env=seaweedfs.env()
    ) as p:
        await p.add_scheduler()  # due retries: a burst of uploads meets throttles
        runners = [await p.add_trigger_runner(), await p.add_trigger_runner()]
        deadline = time.monotonic() + 60
        # Both have joined: the last rebalance gave each of them partitions.
        while not all("cos_partitions_assigned" in r.log_text() for r in runners):
            assert time.monotonic() < deadline, runners[0].log_text()[-3000:]
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        yield p


def s3(store: SeaweedFS) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key,
        region_name="us-east-1",
    )


async def new_bucket(store: SeaweedFS) -> str:
    bucket = unique("bkt")
    await asyncio.to_thread(s3(store).create_bucket, Bucket=bucket)
    return bucket


async def add_trigger(
    client: aiohttp.ClientSession, p: Platform, fn: str, name: str, **config: Any
) -> None:
    doc = {"type": "cos", **config}
    async with client.put(f"{p.url}/v1/functions/{fn}/triggers/{name}", json=doc) as r:
        assert r.status == 201, await r.text()
    # Runners read the trigger list again within a second.
    await asyncio.sleep(1.5)


async def fired(redis_url: str, p: Platform, fn: str, name: str) -> dict[str, dict[str, str]]:
    """Request id → invocation record fields, for every invocation the trigger made."""
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        out: dict[str, dict[str, str]] = {}
        async for key in r.scan_iter(f"{Keys(p.prefix).invocation('cos-')}*", count=1000):
            fields = await r.hgetall(key)
            if fields.get("owner") == f"trigger/{fn}/{name}":
                out[key.rsplit(":", 1)[1]] = fields
        return out
    finally:
        await r.aclose()


async def events_of(redis_url: str, p: Platform, request_ids: list[str]) -> list[dict[str, Any]]:
    """The COS event each invocation's function received (testfn echoes it)."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        out = []
        for rid in request_ids:
            doc = json.loads(await r.get(Keys(p.prefix).result(rid)))
            out.append(json.loads(doc["body"])["event"])
        return out
    finally:
        await r.aclose()


async def wait_done(
    redis_url: str, p: Platform, fn: str, name: str, count: int, timeout_s: float = 90
) -> dict[str, dict[str, str]]:
    """Wait until the trigger's invocations number ``count`` and all succeeded."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await fired(redis_url, p, fn, name)
        done = [f for f in found.values() if f.get("state") == "succeeded"]
        if len(found) >= count and len(done) == len(found):
            return found
        assert time.monotonic() < deadline, sorted(
            (f.get("state"), f.get("done")) for f in found.values()
        )
        await asyncio.sleep(0.25)


async def test_100_uploads_give_exactly_100_invocations_with_the_cos_event(
    cos_platform: Platform, seaweedfs: SeaweedFS, client: aiohttp.ClientSession, redis_url: str
) -> None:
    p = cos_platform
    fn = unique("cos")
    await p.deploy(client, fn)
    bucket = await new_bucket(seaweedfs)
    await add_trigger(client, p, fn, "uploads", bucket=bucket)
    s3c = s3(seaweedfs)
    sizes = {f"in/obj-{i:03d}.bin": 100 + i for i in range(100)}
    uploaded_at: dict[str, float] = {}

    def put(key: str) -> None:
        s3c.put_object(Bucket=bucket, Key=key, Body=b"x" * sizes[key])
        uploaded_at[key] = time.time()

    with ThreadPoolExecutor(8) as pool:
        await asyncio.get_running_loop().run_in_executor(None, lambda: list(pool.map(put, sizes)))
    found = await wait_done(redis_url, p, fn, "uploads", len(sizes))
    await asyncio.sleep(2)  # nothing more comes: no event twice
    found = await fired(redis_url, p, fn, "uploads")
    assert len(found) == 100
    events = await events_of(redis_url, p, list(found))
    seen: dict[str, int] = {}
    delays = []
    for rid, ev in zip(found, events, strict=True):
        [rec] = ev["Records"]
        obj = rec["cos"]["cosObject"]
        assert rec["cos"]["cosBucket"]["name"] == bucket
        assert rec["event"]["eventName"] == "cos:ObjectCreated:Put"
        assert rec["event"]["eventSource"] == "qcs::cos"
        key = obj["key"].removeprefix(f"/imagefn/{bucket}/")
        seen[key] = obj["size"]
        assert obj["meta"]["x-cos-request-id"] == rid
        delays.append(float(found[rid]["created_at"]) - uploaded_at[key])
    assert seen == sizes
    delays.sort()
    print(
        f"\nupload → accepted invocation: p50 {delays[50] * 1000:.0f} ms, "
        f"max {delays[-1] * 1000:.0f} ms"
    )


async def test_a_multipart_upload_gives_one_event_for_the_final_object(
    cos_platform: Platform, seaweedfs: SeaweedFS, client: aiohttp.ClientSession, redis_url: str
) -> None:
    p = cos_platform
    fn = unique("cosmp")
    await p.deploy(client, fn)
    bucket = await new_bucket(seaweedfs)
    await add_trigger(client, p, fn, "big", bucket=bucket)
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    await asyncio.to_thread(
        s3(seaweedfs).upload_fileobj,
        io.BytesIO(b"m" * (12 * MiB)),
        bucket,
        "videos/big.bin",
        Config=config,
    )
    found = await wait_done(redis_url, p, fn, "big", 1)
    await asyncio.sleep(3)
    found = await fired(redis_url, p, fn, "big")
    assert len(found) == 1, found
    [ev] = await events_of(redis_url, p, list(found))
    obj = ev["Records"][0]["cos"]["cosObject"]
    assert obj["key"] == f"/imagefn/{bucket}/videos/big.bin"
    assert obj["size"] == 12 * MiB
    assert obj["meta"]["ETag"].endswith("-3")


async def test_prefix_suffix_and_event_filters(
    cos_platform: Platform, seaweedfs: SeaweedFS, client: aiohttp.ClientSession, redis_url: str
) -> None:
    p = cos_platform
    fn = unique("cosf")
    await p.deploy(client, fn)
    bucket = await new_bucket(seaweedfs)
    await add_trigger(client, p, fn, "jpgs", bucket=bucket, prefix="img/", suffix=".jpg")
    await add_trigger(client, p, fn, "gone", bucket=bucket, events=["removed"])
    s3c = s3(seaweedfs)
    for key in ("img/a.jpg", "img/b.png", "doc/c.jpg", "img/sub/d.jpg"):
        await asyncio.to_thread(s3c.put_object, Bucket=bucket, Key=key, Body=b"1")
    await asyncio.to_thread(s3c.delete_object, Bucket=bucket, Key="img/b.png")
    jpgs = await wait_done(redis_url, p, fn, "jpgs", 2)
    gone = await wait_done(redis_url, p, fn, "gone", 1)
    await asyncio.sleep(2)
    jpgs, gone = await fired(redis_url, p, fn, "jpgs"), await fired(redis_url, p, fn, "gone")
    keys = sorted(
        e["Records"][0]["cos"]["cosObject"]["key"]
        for e in await events_of(redis_url, p, list(jpgs))
    )
    assert keys == [f"/imagefn/{bucket}/img/a.jpg", f"/imagefn/{bucket}/img/sub/d.jpg"]
    [removed] = await events_of(redis_url, p, list(gone))
    assert removed["Records"][0]["event"]["eventName"] == "cos:ObjectRemoved:Delete"
    assert removed["Records"][0]["cos"]["cosObject"]["key"] == f"/imagefn/{bucket}/img/b.png"


async def test_an_s3_notification_posted_to_the_webhook_invokes_once(
    cos_platform: Platform, seaweedfs: SeaweedFS, client: aiohttp.ClientSession, redis_url: str
) -> None:
    p = cos_platform
    fn = unique("coswh")
    await p.deploy(client, fn)
    bucket = await new_bucket(seaweedfs)
    await add_trigger(client, p, fn, "hook", bucket=bucket, suffix=".csv")
    note = {
        "EventName": "s3:ObjectCreated:Put",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "eventTime": "2026-12-03T17:00:00.000Z",
                "eventName": "s3:ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": bucket},
                    "object": {"key": "reports/q4+2026.csv", "size": 7, "eTag": "abc"},
                },
            },
            {
                "eventName": "s3:ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": "skip.txt", "size": 1}},
            },
        ],
    }
    url = f"{p.url}/v1/triggers/s3-events"
    async with client.post(url, json=note) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["events"] == 2
    [inv] = answer["invocations"]
    assert (inv["trigger"], inv["status"]) == (f"{fn}/hook", "queued")
    # The sender's retry of the same notification runs nothing twice.
    async with client.post(url, json=note) as r:
        assert [i["status"] for i in (await r.json())["invocations"]] == ["duplicate"]
    found = await wait_done(redis_url, p, fn, "hook", 1)
    [ev] = await events_of(redis_url, p, list(found))
    obj = ev["Records"][0]["cos"]["cosObject"]
    assert (obj["key"], obj["size"]) == (f"/imagefn/{bucket}/reports/q4 2026.csv", 7)
    # Not a notification: 400.
    async with client.post(url, json={"hello": 1}) as r:
        assert r.status == 400
    # Without a key: 401.
    async with aiohttp.ClientSession() as anon, anon.post(url, json=note) as r:
        assert r.status == 401


async def test_a_bucket_that_does_not_exist_is_refused_naming_bucket(
    cos_platform: Platform, client: aiohttp.ClientSession
) -> None:
    p = cos_platform
    fn = unique("cosbad")
    await p.deploy(client, fn)
    doc = {"type": "cos", "bucket": "no-such-bucket-here"}
    async with client.put(f"{p.url}/v1/functions/{fn}/triggers/t", json=doc) as r:
        body = await r.json()
        assert r.status == 400, body
    assert "bucket" in body["error"]["fields"], body
    assert "no bucket 'no-such-bucket-here'" in body["error"]["message"]
    async with client.get(f"{p.url}/v1/functions/{fn}/triggers") as r:
        assert (await r.json())["triggers"] == []


# -- the media example (examples/media): upload a clip, get its thumbnail and preview ----------

MEDIA_IMAGE = "imagefn-examples/media:latest"


@pytest.fixture(scope="module")
def function_front(
    seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FunctionFront]:
    # The s3.json the store was started with sits in its directory.
    front = start_function_front(seaweedfs, seaweedfs.log_path.parent)
    yield front
    front.stop()


def make_clip(seconds: int = 2) -> bytes:
    """An H.264 test-pattern clip, made by the example image's own ffmpeg, offline."""
    done = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            MEDIA_IMAGE,
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=duration={seconds}:size=320x240:rate=12",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "frag_keyframe+empty_moov",
            "-f",
            "mp4",
            "pipe:1",
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout, done.stderr[-1000:]
    return done.stdout


async def test_the_media_example_turns_an_uploaded_clip_into_its_outputs(
    cos_platform: Platform,
    seaweedfs: SeaweedFS,
    function_front: FunctionFront,
    client: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    p = cos_platform
    fn = unique("media")
    s3c = s3(seaweedfs)
    src, out, other = unique("media-in"), unique("media-out"), unique("private")
    for bucket in (src, out, other):
        await asyncio.to_thread(s3c.create_bucket, Bucket=bucket)
    await asyncio.to_thread(s3c.put_object, Bucket=other, Key="secret.txt", Body=b"no")
    # As examples/media/deploy.sh does: keys of the function's own, for its two buckets.
    access, secret = unique("mediakey"), uuid.uuid4().hex
    command = (
        f"s3.configure -user {fn} -access_key {access} -secret_key {secret} "
        f"-buckets {src},{out} -actions Read,Write,List -apply"
    )
    shell = await asyncio.to_thread(
        subprocess.run,
        [weed_binary(), "shell", f"-master={seaweedfs.master}"],
        input=command.encode(),
        capture_output=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr[-1000:]
    env = {
        "S3_ENDPOINT": function_front.endpoint,
        "S3_ACCESS_KEY": access,
        "S3_SECRET_KEY": secret,
        "OUTPUT_BUCKET": out,
    }
    await p.deploy(client, fn, image=MEDIA_IMAGE, memory_mb=512, tmp_mb=256, timeout_s=120, env=env)
    await add_trigger(client, p, fn, "uploads", bucket=src, suffix=".mp4")
    clip = await asyncio.to_thread(make_clip)
    await asyncio.to_thread(s3c.put_object, Bucket=src, Key="clips/cat.mp4", Body=clip)
    await asyncio.to_thread(s3c.put_object, Bucket=src, Key="clips/notes.txt", Body=b"skip")
    [rid] = await wait_done(redis_url, p, fn, "uploads", 1, timeout_s=120)
    thumb = await asyncio.to_thread(s3c.get_object, Bucket=out, Key="clips/cat.thumb.jpg")
    preview = await asyncio.to_thread(s3c.get_object, Bucket=out, Key="clips/cat.preview.mp4")
    assert thumb["ContentType"] == "image/jpeg"
    assert thumb["Body"].read()[:3] == b"\xff\xd8\xff"  # a JPEG
    assert preview["ContentType"] == "video/mp4"
    assert preview["Body"].read()[4:8] == b"ftyp"  # an MP4
    # The function's answer names what it wrote.
    r = aioredis.Redis.from_url(redis_url)
    try:
        result = json.loads(await r.get(Keys(p.prefix).result(rid)))
    finally:
        await r.aclose()
    [done] = json.loads(result["body"])["results"]
    assert done["outputs"] == [
        f"s3://{out}/clips/cat.thumb.jpg",
        f"s3://{out}/clips/cat.preview.mp4",
    ]
    # Its keys reach its own buckets only (the store's check, as the example relies on).
    mine = boto3.client(
        "s3",
        endpoint_url=seaweedfs.endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )
    with pytest.raises(ClientError, match="AccessDenied"):
        await asyncio.to_thread(mine.get_object, Bucket=other, Key="secret.txt")
