"""What a node should serve: events folded with periodic snapshots of the store. Pure, no I/O.

Events are the fast path and the store is the source of truth, so a snapshot of the
store repairs what events missed. A snapshot is not atomic with the event stream,
though: an event may arrive while the snapshot is being read. The rules:
- a key in the snapshot wins unless what the node knows for it is newer (`at`);
- a key the snapshot lacks is dropped only if the node learned it before the snapshot
  started (`received`, the node's own monotonic clock): a younger one may simply not
  have been visible to the read yet, and the next reconciliation decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from modelcd.events.schemas import ModelState, TrafficPolicy

S = TypeVar("S", ModelState, TrafficPolicy)


@dataclass(frozen=True, slots=True)
class Known(Generic[S]):
    state: S
    received: float  # monotonic seconds when this node applied it


@dataclass(frozen=True, slots=True)
class Plan(Generic[S]):
    apply: list[S]  # newer than what the node knows: apply as if the event had arrived
    drop: list[str]  # keys the target state no longer has


def plan_reconcile(known: Mapping[str, Known[S]], snapshot: Iterable[S], started: float) -> Plan[S]:
    snap = {s.key(): s for s in snapshot}
    apply = [s for key, s in snap.items() if key not in known or s.at > known[key].state.at]
    drop = [key for key, k in known.items() if key not in snap and k.received < started]
    return Plan(apply=apply, drop=drop)
