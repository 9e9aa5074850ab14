"""Every Redis key name imagefn uses, in one place."""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def functions(self) -> str:
        """Hash: function name → FunctionRecord JSON of its newest version ($LATEST)."""
        return f"{self.prefix}:functions"

    @property
    def version_counter(self) -> str:
        """Hash: function name → last version number handed out (survives deletes, so
        version numbers only grow and are never reused)."""
        return f"{self.prefix}:version-counter"

    def versions(self, function: str) -> str:
        """Hash: version number → FunctionRecord JSON; published versions never change."""
        return f"{self.prefix}:versions:{function}"

    def aliases(self, function: str) -> str:
        """Hash: alias name → version number."""
        return f"{self.prefix}:aliases:{function}"

    @property
    def api_keys(self) -> str:
        """Hash: API key id → its record (JSON: name, scopes, the secret's SHA-256, times);
        the secret itself is never stored (shared/apikeys.py)."""
        return f"{self.prefix}:api-keys"

    @property
    def audit(self) -> str:
        """Stream, capped: one entry per control action (shared/audit.py)."""
        return f"{self.prefix}:audit"

    @property
    def triggers(self) -> str:
        """Hash: "function/name" → trigger JSON (shared/triggers.py)."""
        return f"{self.prefix}:triggers"

    def trigger_state(self, trigger_id: str) -> str:
        """Hash: what runners observed of one trigger (last/next fire, errors, lag)."""
        return f"{self.prefix}:trigger-state:{trigger_id}"

    def invocation(self, request_id: str) -> str:
        """Hash with a TTL: the record of one invocation (shared/invocations.py): its
        state, metadata and one field per attempt."""
        return f"{self.prefix}:invocation:{request_id}"

    def result(self, request_id: str) -> str:
        """String with a TTL (result_ttl_s): the result of a finished async invocation."""
        return f"{self.prefix}:result:{request_id}"

    @property
    def delayed(self) -> str:
        """Sorted set: invocations waiting to be retried (member "request_id:attempt",
        score: the time they are due)."""
        return f"{self.prefix}:delayed"

    def delayed_item(self, member: str) -> str:
        """Hash: the encoded fields (m, r, b) of one waiting retry."""
        return f"{self.prefix}:delayed:{member}"

    def dlq(self, function: str) -> str:
        """Hash: request id → dead-letter entry (JSON) of one function."""
        return f"{self.prefix}:dlq:{function}"

    def dlq_index(self, function: str) -> str:
        """Sorted set: request id → when it was parked (the listing order)."""
        return f"{self.prefix}:dlq-index:{function}"

    @property
    def dlq_functions(self) -> str:
        """Set: functions that have dead letters (for listing and purging)."""
        return f"{self.prefix}:dlq-functions"

    def batch(self, batch_id: str) -> str:
        """Hash: a batch's metadata, counters and state."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_items(self, batch_id: str) -> str:
        """List: the batch's item bodies, in item order."""
        return f"{self.prefix}:batch:{batch_id}:items"

    def batch_results(self, batch_id: str) -> str:
        """Hash: item index → the item's result line (JSON)."""
        return f"{self.prefix}:batch:{batch_id}:results"

    @property
    def batches(self) -> str:
        """Sorted set: batches still being fed (id → created_at)."""
        return f"{self.prefix}:batches"

    @property
    def destinations(self) -> str:
        """Stream (outbox): destination records waiting to be sent."""
        return f"{self.prefix}:destinations"

    destinations_group = "dispatchers"

    def destination_stats(self, function: str) -> str:
        """Hash: delivered / failed counts and the last error of a function's
        destinations."""
        return f"{self.prefix}:destination-stats:{function}"

    @property
    def scheduler_lease(self) -> str:
        """String with a TTL: the id of the scheduler allowed to act."""
        return f"{self.prefix}:scheduler:lease"

    def inflight(self, function: str) -> str:
        """Sorted set: the function's invocations in flight (member: slot id, score: the
        call's deadline), for max_concurrency."""
        return f"{self.prefix}:inflight:{function}"

    def rate_key(self, key_id: str) -> str:
        """Hash with a TTL: the token bucket (tokens, at) of one API key's calls
        (gateway/ratelimit.py); gone once it would be full again."""
        return f"{self.prefix}:rate:key:{key_id}"

    def rate_function(self, function: str) -> str:
        """Hash with a TTL: the token bucket of one function's invocations."""
        return f"{self.prefix}:rate:fn:{function}"

    @property
    def invocations(self) -> str:
        """Stream of pending invocations, read by the ``workers`` consumer group."""
        return f"{self.prefix}:invocations"

    def worker_invocations(self, worker_id: str) -> str:
        """Stream of invocations routed to one worker (it holds a warm instance)."""
        return f"{self.prefix}:invocations:w:{worker_id}"

    workers_group = "workers"

    def replies(self, gateway_id: str) -> str:
        """Stream of results for one gateway process."""
        return f"{self.prefix}:replies:{gateway_id}"

    def worker_heartbeat(self, worker_id: str) -> str:
        """String with a TTL: present while the worker is alive; its value is the worker's
        inventory (JSON: memory and instances per function version)."""
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers_index(self) -> str:
        """Sorted set: worker id → time of its last heartbeat (see shared.liveness)."""
        return f"{self.prefix}:workers"

    def worker_control(self, worker_id: str) -> str:
        """Stream of desired-state commands for one worker (from the cold-start manager)."""
        return f"{self.prefix}:control:{worker_id}"

    @property
    def coldstart_lease(self) -> str:
        """String with a TTL: the id of the cold-start manager allowed to act."""
        return f"{self.prefix}:coldstart:lease"
