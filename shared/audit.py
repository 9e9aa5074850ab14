"""The audit log: one entry per control action (deploy, delete, alias, key created or
revoked, dead letters redriven or purged, batches cancelled), with who (key id), from
where (source address), when and the outcome (the HTTP status), kept in a capped Redis
stream shared by every gateway and read back newest first."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import ServiceUnavailable
from shared.keys import Keys

FILTER_WINDOW = 10_000


@dataclass(frozen=True)
class AuditEntry:
    action: str
    key_id: str
    source: str
    status: int
    request_id: str
    function: str = ""
    target: str = ""
    at: float = 0.0

    @property
    def outcome(self) -> str:
        if self.status < 400:
            return "ok"
        return "denied" if self.status in (401, 403) else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome}


class AuditLog:
    def __init__(self, client: aioredis.Redis, keys: Keys, max_entries: int) -> None:
        self._r = client
        self._stream = keys.audit
        self._max = max_entries

    async def record(self, entry: AuditEntry) -> None:
        doc = asdict(entry)
        doc["at"] = entry.at or time.time()
        await self._r.xadd(
            self._stream,
            {"e": json.dumps(doc, separators=(",", ":"))},
            maxlen=self._max,
            approximate=True,
        )

    async def read(self, limit: int, function: str = "") -> list[dict[str, Any]]:
        """Newest first; only ``function``'s entries when it is given."""
        try:
            # Filtering by function reads a bounded window of the newest entries.
            rows: list[tuple[bytes, dict[bytes, bytes]]] = await self._r.xrevrange(
                self._stream, count=limit if not function else FILTER_WINDOW
            )  # type: ignore[assignment]
        except RedisError as e:
            raise ServiceUnavailable(f"audit log unavailable (Redis): {e}") from e
        out: list[dict[str, Any]] = []
        for _, fields in rows:
            entry = AuditEntry(**json.loads(fields[b"e"]))
            if function and entry.function != function:
                continue
            out.append(entry.to_dict())
            if len(out) >= limit:
                break
        return out
