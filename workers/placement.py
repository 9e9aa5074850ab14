"""Where provisioned instances go: a pure function of targets and worker inventories.

The cold-start manager calls ``plan_provisioning`` every tick; it answers, per worker, how
many instances of each function version to keep ready. The plan is stable (a worker keeps
what it already holds, up to the target) and spreads new instances across workers (the
one with the fewest of that version first, then the most free memory), within each
worker's memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerView:
    id: str
    memory_capacity_mb: int
    memory_used_mb: int
    # "name@version" → provisioned instances the worker holds now.
    provisioned: Mapping[str, int] = field(default_factory=dict)


def plan_provisioning(
    targets: Mapping[str, int],
    memory_mb: Mapping[str, int],
    workers: list[WorkerView],
) -> dict[str, dict[str, int]]:
    """``targets``: "name@version" → instances wanted across all workers; ``memory_mb``:
    the memory one instance of each needs. Returns worker id → "name@version" → count
    (every worker present; an empty map means "keep none"). What does not fit anywhere is
    left out (and retried next
    tick, when memory may have freed)."""
    plan: dict[str, dict[str, int]] = {w.id: {} for w in workers}
    # Memory still free per worker after what it keeps; instances it already holds for a
    # target are counted as used already (they are in memory_used_mb).
    free = {w.id: w.memory_capacity_mb - w.memory_used_mb for w in workers}
    for key in sorted(targets):
        want = targets[key]
        need = memory_mb.get(key, 0)
        # 1. Keep what workers already hold, most first, up to the target.
        for w in sorted(workers, key=lambda w: (-w.provisioned.get(key, 0), w.id)):
            keep = min(w.provisioned.get(key, 0), want - _placed(plan, key))
            if keep > 0:
                plan[w.id][key] = keep
            surplus = w.provisioned.get(key, 0) - max(keep, 0)
            if surplus > 0:
                free[w.id] += surplus * need  # demoted instances idle out and free memory
        # 2. Place the rest one at a time on the worker with the fewest of this key,
        #    then the most free memory.
        while _placed(plan, key) < want:
            fits = [w for w in workers if free[w.id] >= need]
            if not fits:
                break
            best = min(fits, key=lambda w: (plan[w.id].get(key, 0), -free[w.id], w.id))
            plan[best.id][key] = plan[best.id].get(key, 0) + 1
            free[best.id] -= need
    return plan


def _placed(plan: dict[str, dict[str, int]], key: str) -> int:
    return sum(counts.get(key, 0) for counts in plan.values())
