"""The fleet as its heartbeats describe it. Pure: `now` is passed in (monotonic seconds of the reader).

A node is *alive* while its last `NodeStatus` is younger than the time-to-live (a few heartbeat
intervals); it is a *member* (it takes a share of the placement) while alive and not stopping. A
stopping node is still alive: it answers requests until what it holds is loaded elsewhere. A node
that stops heartbeating (killed, partitioned) leaves both sets once its last heartbeat expires.

`holders` is what the nodes report, not what placement says: a model is held by a node whose last
heartbeat lists it `ready`. The front door routes to holders; a node hands a model off once its new
owners hold it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from modelcd.events.schemas import NodeStatus

from .hashing import Member


@dataclass(frozen=True, slots=True)
class Seen:
    status: NodeStatus
    received: float


class Membership:
    """Last heartbeat per node, and the views placement and routing need from them."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.nodes: dict[str, Seen] = {}

    def observe(self, status: NodeStatus, now: float) -> None:
        seen = self.nodes.get(status.node)
        if seen is not None and seen.status.at > status.at:
            return  # an older heartbeat delivered late
        self.nodes[status.node] = Seen(status, now)

    def forget(self, node: str) -> None:
        self.nodes.pop(node, None)

    def alive(self, now: float) -> list[NodeStatus]:
        return [s.status for s in self.nodes.values() if now - s.received <= self.ttl]

    def members(self, now: float) -> list[Member]:
        """Alive, not stopping: the nodes placement shares the models among, weighted by memory budget."""
        return sorted(Member(st.node, float(st.memory_budget or 1)) for st in self.alive(now) if not st.stopping)

    def holders(self, now: float) -> dict[str, set[str]]:
        """{name:version: nodes whose last heartbeat lists it ready}, alive nodes only."""
        out: dict[str, set[str]] = {}
        for st in self.alive(now):
            for m in st.models:
                if m.state == "ready":
                    out.setdefault(f"{m.name}:{m.version}", set()).add(st.node)
        return out

    def expire(self, now: float, keep: float = 10.0) -> list[str]:
        """Drop nodes silent for `keep` x ttl (bounded memory); returns their names."""
        gone = [n for n, s in self.nodes.items() if now - s.received > self.ttl * keep]
        for n in gone:
            del self.nodes[n]
        return gone


def member_set(members: Iterable[Member]) -> tuple[Member, ...]:
    """A hashable, ordered form of a membership (to cache placements computed from it)."""
    return tuple(sorted(members))
