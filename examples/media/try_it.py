"""Try the media example: make a short test clip (ffmpeg in the example's own image),
upload it to the bucket media-in, wait for the function's outputs in media-out and show
them. Run after examples/media/deploy.sh:

    .venv/bin/python examples/media/try_it.py [--clip FILE.mp4]

Uses the store's admin keys from the credentials file (or IMAGEFN_S3_* in the
environment), as a user uploading with their own tools would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

CREDENTIALS = Path(os.environ.get("IMAGEFN_ENV_FILE", "/var/lib/imagefn/credentials.env"))
IMAGE = "imagefn-examples/media:latest"


def setting(name: str) -> str:
    if os.environ.get(name):
        return os.environ[name]
    try:
        for line in CREDENTIALS.read_text().splitlines():
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1]
    except OSError as e:
        sys.exit(f"try_it: cannot read {CREDENTIALS}: {e.strerror} (run deploy/setup.sh)")
    sys.exit(f"try_it: {name} is not set and not in {CREDENTIALS} (run deploy/setup.sh)")


def client() -> Any:
    return boto3.client(
        "s3",
        endpoint_url=setting("IMAGEFN_S3_ENDPOINT"),
        aws_access_key_id=setting("IMAGEFN_S3_ACCESS_KEY"),
        aws_secret_access_key=setting("IMAGEFN_S3_SECRET_KEY"),
        region_name="us-east-1",
    )


def make_buckets(s3: Any, names: list[str]) -> None:
    for name in names:
        try:
            s3.create_bucket(Bucket=name)
            print(f"created bucket {name}")
        except ClientError as e:
            if e.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
            print(f"bucket {name} exists")


def test_clip(seconds: int = 3) -> bytes:
    """An H.264 clip of ffmpeg's test pattern, made offline in the example's image."""
    done = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            IMAGE,
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=duration={seconds}:size=640x360:rate=24",
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
    if done.returncode != 0 or not done.stdout:
        sys.exit(f"try_it: could not make a clip: {done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout


def wait_for(s3: Any, bucket: str, key: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            head: dict[str, Any] = s3.head_object(Bucket=bucket, Key=key)
            return head
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey"):
                raise
        if time.monotonic() > deadline:
            sys.exit(
                f"try_it: no s3://{bucket}/{key} after {timeout_s:.0f} s; see "
                "`imagefn logs media --since 5m` and `imagefn dlq ls media`"
            )
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", help="upload this .mp4 instead of a generated one")
    p.add_argument("--make-buckets", nargs="+", metavar="BUCKET", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    s3 = client()
    if args.make_buckets:
        make_buckets(s3, args.make_buckets)
        return
    data = Path(args.clip).read_bytes() if args.clip else test_clip()
    key = f"demo/clip-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    t0 = time.monotonic()
    s3.put_object(Bucket="media-in", Key=key, Body=data, ContentType="video/mp4")
    print(f"uploaded s3://media-in/{key} ({len(data)} bytes)")
    stem = key.removesuffix(".mp4")
    saved = Path(".imagefn")
    saved.mkdir(exist_ok=True)
    for suffix in ("thumb.jpg", "preview.mp4"):
        out = f"{stem}.{suffix}"
        head = wait_for(s3, "media-out", out, args.timeout)
        local = saved / Path(out).name
        s3.download_file("media-out", out, str(local))
        print(
            f"  -> s3://media-out/{out}: {head['ContentLength']} bytes, "
            f"{head.get('ContentType', '?')} (after {time.monotonic() - t0:.1f} s; copy: {local})"
        )


if __name__ == "__main__":
    main()
