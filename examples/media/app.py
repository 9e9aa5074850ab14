"""Media processing, as an SCF image function: triggered by an upload to a bucket (a COS
event), it reads the object from the store, makes a JPEG thumbnail and a small H.264
preview of it with ffmpeg, and writes both to another bucket.

Settings (the function's env; `imagefn deploy --env` sets the machine's values):
  S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY   the store, and keys of this function's own
  OUTPUT_BUCKET                                where the outputs go
  THUMB_WIDTH (160), PREVIEW_WIDTH (320), PREVIEW_SECONDS (10)

Outputs, for an upload `clips/cat.mp4`: `clips/cat.thumb.jpg` and `clips/cat.preview.mp4`.
The answer lists them; a file ffmpeg cannot read is a 422 naming the object (a user error:
the platform retries it as configured, then moves it to the dead-letter queue).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


class Failed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def setting(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise Failed(500, f"the function's env has no {name} (see examples/media/README.md)")
    return value


def store() -> Any:
    return boto3.client(
        "s3",
        endpoint_url=setting("S3_ENDPOINT"),
        aws_access_key_id=setting("S3_ACCESS_KEY"),
        aws_secret_access_key=setting("S3_SECRET_KEY"),
        region_name="us-east-1",
        # Path-style: a self-hosted store has no per-bucket host names.
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def ffmpeg(*args: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise Failed(504, f"ffmpeg took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise Failed(422, done.stderr.decode(errors="replace").strip()[-500:] or "ffmpeg failed")


def object_key(record: dict[str, Any]) -> tuple[str, str]:
    """(bucket, key) of a COS record: its key is `/<appid>/<bucket>/<key>`."""
    cos = record.get("cos", {})
    bucket = cos.get("cosBucket", {}).get("name", "")
    full = cos.get("cosObject", {}).get("key", "")
    appid = cos.get("cosBucket", {}).get("appid", "")
    prefix = f"/{appid}/{bucket}/"
    if not bucket or not full.startswith(prefix):
        raise Failed(400, f"not a COS event record: {json.dumps(record)[:200]}")
    return bucket, full[len(prefix) :]


def process(client: Any, bucket: str, key: str, deadline: float) -> list[str]:
    out_bucket = setting("OUTPUT_BUCKET")
    thumb_w = int(setting("THUMB_WIDTH", "160"))
    preview_w = int(setting("PREVIEW_WIDTH", "320"))
    seconds = setting("PREVIEW_SECONDS", "10")
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    # /tmp is the only writable place, and its size counts against the function's memory.
    work = tempfile.mkdtemp(prefix="media-", dir="/tmp")
    try:
        src = os.path.join(work, "input")
        try:
            client.download_file(bucket, key, src)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = 404 if code in ("404", "NoSuchKey") else 502
            raise Failed(status, f"cannot read s3://{bucket}/{key}: {code or e}") from None
        thumb, preview = os.path.join(work, "thumb.jpg"), os.path.join(work, "preview.mp4")
        ffmpeg(
            "-i",
            src,
            "-frames:v",
            "1",
            "-vf",
            f"scale={thumb_w}:-2",
            thumb,
            timeout=max(1.0, deadline - time.time()),
        )
        ffmpeg(
            "-i",
            src,
            "-t",
            seconds,
            "-vf",
            f"scale={preview_w}:-2",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-an",
            "-movflags",
            "+faststart",
            preview,
            timeout=max(1.0, deadline - time.time()),
        )
        outputs = []
        for path, suffix, ctype in (
            (thumb, "thumb.jpg", "image/jpeg"),
            (preview, "preview.mp4", "video/mp4"),
        ):
            out_key = f"{stem}.{suffix}"
            try:
                client.upload_file(path, out_bucket, out_key, ExtraArgs={"ContentType": ctype})
            except (ClientError, BotoCoreError) as e:
                raise Failed(502, f"cannot write s3://{out_bucket}/{out_key}: {e}") from None
            outputs.append(f"s3://{out_bucket}/{out_key}")
        return outputs
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # http.server calls it by this name
        request_id = self.headers.get("X-Scf-Request-Id", "")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/event-invoke":
            return self.answer(404, {"error": f"no route {self.path}"})
        # The invocation's time limit, less a margin to answer in.
        timeout = float(self.headers.get("X-Scf-Timeout") or 60)
        deadline = time.time() + max(1.0, timeout - 2)
        try:
            event = json.loads(raw or b"{}")
            records = event.get("Records") if isinstance(event, dict) else None
            if not isinstance(records, list) or not records:
                raise Failed(400, 'expected a COS event: {"Records": [...]}')
            client = store()
            results = []
            for record in records:
                bucket, key = object_key(record)
                name = record.get("event", {}).get("eventName", "")
                if not name.startswith("cos:ObjectCreated"):
                    results.append({"object": f"s3://{bucket}/{key}", "skipped": name})
                    continue
                t0 = time.monotonic()
                outputs = process(client, bucket, key, deadline)
                ms = round((time.monotonic() - t0) * 1000)
                print(f"[{request_id}] s3://{bucket}/{key} -> {', '.join(outputs)} ({ms} ms)")
                results.append({"object": f"s3://{bucket}/{key}", "outputs": outputs, "ms": ms})
        except ValueError as e:
            return self.answer(400, {"error": f"the event is not JSON: {e}"})
        except Failed as e:
            print(f"[{request_id}] failed ({e.status}): {e}", file=sys.stderr)
            return self.answer(e.status, {"error": str(e)})
        self.answer(200, {"results": results})

    def answer(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per object above is enough


def main() -> None:
    # PID 1 in its container ignores an unhandled SIGTERM: exit at once instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    HTTPServer(("0.0.0.0", 9000), Handler).serve_forever()


if __name__ == "__main__":
    main()
