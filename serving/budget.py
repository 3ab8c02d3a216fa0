"""The memory budget's decisions: which models to evict, which to load at start. Pure, no I/O.

Invariants:
- the sum of the sizes of resident models plus the reservations of loads in progress
  never exceeds the budget: a load reserves its size *before* it starts;
- eviction is least-recently-used first; a model that is loading is never evicted
  (a model serving a request may be: the request holds its own reference and finishes);
- a model larger than the whole budget is never loaded (it could only fit by
  evicting everything and still overflow).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A package compresses little (skops, ONNX, JSON trees); loaded objects take a few times their
# bytes on disk in Python. Used only when ingest did not measure the model (memory_bytes == 0).
ESTIMATE_FACTOR = 4
ESTIMATE_FLOOR = 1 << 20


@dataclass(frozen=True, slots=True)
class Resident:
    key: str
    size: int
    last_used: float
    evictable: bool = True  # False while loading


def estimate_size(declared: int, package_bytes: int) -> int:
    """Bytes the budget charges for a model: what ingest measured, else an estimate from its package."""
    if declared > 0:
        return declared
    return max(ESTIMATE_FLOOR, package_bytes * ESTIMATE_FACTOR)


def plan_eviction(resident: Iterable[Resident], need: int, budget: int) -> list[str] | None:
    """Keys to evict (LRU first) so `need` more bytes fit; [] if they already fit; None if they cannot.

    None means "not now": either `need` exceeds the budget, or what is not evictable
    (loads in progress) leaves too little room; the caller waits for a load to finish.
    """
    items = list(resident)
    used = sum(r.size for r in items)
    if used + need <= budget:
        return []
    if need > budget:
        return None
    evict: list[str] = []
    for r in sorted((r for r in items if r.evictable), key=lambda r: r.last_used):
        evict.append(r.key)
        used -= r.size
        if used + need <= budget:
            return evict
    return None


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str
    size: int
    pinned: bool = False
    deployed_at: float = 0.0
    last_used: float = 0.0  # the last request before the node restarted (serving/recent.py), 0: none


def hot_set(candidates: Sequence[Candidate], budget: int) -> list[str]:
    """The models a starting node loads: pinned first, then the most recently requested, then the newest
    deployed, while they fit (serving/recent.py splits them into before and after ready).

    Greedy: a model that does not fit is skipped and smaller ones after it may still fit.
    The rest load on their first request.
    """
    order = sorted(candidates, key=lambda c: (not c.pinned, -c.last_used, -c.deployed_at, c.key))
    out: list[str] = []
    used = 0
    for c in order:
        if used + c.size <= budget:
            out.append(c.key)
            used += c.size
    return out
