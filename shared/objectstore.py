"""The object store the cos triggers watch, as the gateway sees it: the check made before
a cos trigger is stored (its bucket must exist), through the store's S3 API with the
platform's credentials (``ObjectStoreSettings``; the secret is never logged).

boto3 is synchronous; one ``HeadBucket`` per trigger PUT runs in a thread, bounded by
``check_timeout_s``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared.errors import InvalidRequest, ServiceUnavailable
from shared.settings_objectstore import ObjectStoreSettings


def s3_client(settings: ObjectStoreSettings) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint,
        aws_access_key_id=settings.access_key or None,
        aws_secret_access_key=settings.secret_key or None,
        region_name=settings.region,
        config=Config(
            connect_timeout=settings.check_timeout_s,
            read_timeout=settings.check_timeout_s,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def _head_bucket(settings: ObjectStoreSettings, bucket: str) -> int:
    """The HTTP status of HeadBucket (200, 403, 404...)."""
    from botocore.exceptions import ClientError

    try:
        s3_client(settings).head_bucket(Bucket=bucket)
    except ClientError as e:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500)
    return 200


async def check_bucket(settings: ObjectStoreSettings, bucket: str) -> None:
    """Nothing when ``bucket`` exists in the store (or no store is configured: the check is
    then skipped); InvalidRequest (400) naming ``bucket`` when it does not, or the
    platform's credentials may not see it; ServiceUnavailable (503) when the store does
    not answer."""
    if not settings.endpoint:
        return
    try:
        async with asyncio.timeout(settings.check_timeout_s + 1):
            status = await asyncio.to_thread(_head_bucket, settings, bucket)
    except Exception as e:  # botocore's connection errors, the timeout
        problem = f"the object store at {settings.endpoint} does not answer ({type(e).__name__})"
        raise ServiceUnavailable(
            f"bucket: {problem}", details={"fields": {"bucket": problem}}
        ) from e
    if status == 200:
        return
    if status == 404:
        problem = (
            f"no bucket {bucket!r} in the object store at {settings.endpoint}; create it first"
        )
    elif status == 403:
        problem = f"the platform's S3 credentials may not read bucket {bucket!r}"
    else:
        raise ServiceUnavailable(
            f"bucket: the object store answered {status} for {bucket!r}",
            details={"fields": {"bucket": f"the store answered {status}"}},
        )
    raise InvalidRequest(f"bucket: {problem}", details={"fields": {"bucket": problem}})
