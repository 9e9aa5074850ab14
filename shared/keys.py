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

    def invocation(self, request_id: str) -> str:
        """String with a TTL: the record of one finished invocation (JSON)."""
        return f"{self.prefix}:invocation:{request_id}"

    def inflight(self, function: str) -> str:
        """Sorted set: the function's invocations in flight (member: slot id, score: the
        call's deadline), for max_concurrency."""
        return f"{self.prefix}:inflight:{function}"

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
