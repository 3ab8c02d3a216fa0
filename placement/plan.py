"""Where every model goes, and what one node loads and keeps. Pure.

`place` gives the owners of every `name:version` that should serve: its group (groups.py) is
placed on R nodes of the membership by weighted rendezvous hashing (hashing.py), R being the
largest replica count among the group's models (`ModelState.replicas`, 0: the fleet's default),
capped at the number of members.

`node_plan` is one node's share. Invariants:
- a node loads exactly the keys placed on it;
- a node keeps a key it holds but no longer owns until *every* new owner reports it ready (load on
  the new node before unloading on the old: a move never leaves a model without a ready replica,
  as long as one existed). A new owner that cannot load it keeps the old copy in place;
- with no members at all (the last node is leaving), a node keeps everything it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from modelcd.events.schemas import ModelState, TrafficPolicy

from .groups import groups
from .hashing import Member, owners

DEFAULT_REPLICAS = 2


def replicas_of(state: ModelState, default: int = DEFAULT_REPLICAS) -> int:
    return state.replicas if state.replicas > 0 else default


def place(states: Iterable[ModelState], policies: Iterable[TrafficPolicy], members: Iterable[Member],
          default_replicas: int = DEFAULT_REPLICAS) -> dict[str, list[str]]:
    """{name:version: owner nodes, best first} for every serving state; [] when there are no members."""
    serving = [s for s in states if s.target == "serving"]
    members = list(members)
    group_of = groups((s.name for s in serving), policies)
    want: dict[str, int] = {}
    for s in serving:
        g = group_of[s.name]
        want[g] = max(want.get(g, 0), replicas_of(s, default_replicas))
    placed = {g: owners(g, members, r) if members else [] for g, r in want.items()}
    return {s.key(): placed[group_of[s.name]] for s in serving}


@dataclass(frozen=True, slots=True)
class NodePlan:
    load: frozenset[str]  # placed on this node
    keep: frozenset[str]  # held, placed elsewhere, not yet ready on every new owner

    @property
    def desired(self) -> frozenset[str]:
        return self.load | self.keep


def node_plan(node: str, placement: Mapping[str, list[str]], held: Iterable[str],
              holders: Mapping[str, set[str]]) -> NodePlan:
    """What `node` should have: its placement, plus what it holds that its new owners do not hold yet."""
    load = frozenset(k for k, own in placement.items() if node in own)
    keep = set()
    for k in held:
        if k in load or k not in placement:
            continue  # not serving any more: retirement is the registry's business, not placement's
        own = placement[k]
        if not own or not all(o in holders.get(k, ()) for o in own):
            keep.add(k)
    return NodePlan(load, frozenset(keep))


def group_owners(name: str, placement: Mapping[str, list[str]], group_of: Mapping[str, str]) -> list[str]:
    """Owners of the group a model or endpoint name belongs to (the front door's fallback route)."""
    g = group_of.get(name)
    if g is None:
        return []
    for key, own in placement.items():
        if group_of.get(key.partition(":")[0]) == g:
            return own
    return []
