"""A node's share of the fleet: it loads only what placement puts on it, plus what it is handing off.

Sits between the node's followers and the registry: model-state and traffic events and the
fleet's heartbeats come in (`on_model`, `on_traffic`, `on_status`); the registry is told to serve
what this node's plan holds (`refresh`). Placement itself is pure (modelcd.placement); this is its
only I/O-facing user on the node, and the registry knows nothing of it.

Invariants:
- every model-state is recorded; a retired one, or one the registry already has, reaches the
  registry at once (retirement and package changes never wait for placement);
- a serving model placed on this node reaches the registry on the next `refresh`;
- a model placed elsewhere is released in two phases: once every new owner reports it ready, the
  node's heartbeats stop listing it ready (published at once) while it keeps serving it; `grace`
  seconds later, if it is still placed elsewhere, it is unloaded. The front door, which routes to
  owners that report a model ready, has moved its route by then; a membership change during the
  grace (another node leaving) cancels the release;
- while `leaving`, nothing is released: the node keeps serving everything until what it holds is
  ready elsewhere (`handed_off`), then drains;
- `MODELCD_REPLICAS=0`: no placement, every model reaches the registry (every node loads everything).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec

from modelcd.events.schemas import ModelState, NodeStatus, TrafficPolicy
from modelcd.logs import get_logger
from modelcd.placement.groups import groups
from modelcd.placement.hashing import Member, owners
from modelcd.placement.membership import Membership
from modelcd.placement.plan import NodePlan, node_plan, replicas_of
from modelcd.settings import Settings

from .desired import Known, plan_reconcile
from .registry import Registry

log = get_logger("modelcd.serving.placement")

# Seconds between announcing a release (heartbeats stop listing the model ready) and unloading it: the
# front door must have seen the heartbeat (~0.5 s), updated its table (0.2 s) and Caddy refreshed (0.5 s).
RELEASE_GRACE = 2.0


def membership_ttl(settings: Settings) -> float:
    """How long a node counts as alive after its last heartbeat: three missed heartbeats."""
    return 3 * settings.heartbeat_interval + 1.0


class NodePlacement:
    def __init__(self, node: str, registry: Registry, settings: Settings,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.node = node
        self.registry = registry
        self.default_replicas = settings.replicas
        self.weight = float(settings.memory_budget or 1)
        # The front door reads the same heartbeats and moves its routes within a fraction of a second.
        self.grace = RELEASE_GRACE
        self.on_change = on_change  # publish a heartbeat now (a release announced or cancelled, a model released)
        self.fleet = Membership(membership_ttl(settings))
        self.states: dict[str, Known[ModelState]] = {}
        self.policies: dict[str, Known[TrafficPolicy]] = {}
        self.leaving = False
        self.plan = NodePlan(frozenset(), frozenset())
        self._members: tuple[Member, ...] = ()
        self._owners: dict[tuple[str, int], list[str]] = {}
        self._group_of: dict[str, str] | None = None
        self._releasable: dict[str, float] = {}  # key -> when its new owners were first all ready
        self.dirty = True

    @property
    def enabled(self) -> bool:
        return self.default_replicas > 0

    # ------------------------------------------------------------------ inputs

    def on_model(self, state: ModelState, received: float | None = None) -> None:
        key = state.key()
        known = self.states.get(key)
        if known is not None and known.state.at > state.at:
            return
        self.states[key] = Known(state, time.monotonic() if received is None else received)
        if state.target == "serving" and known is not None and known.state.replicas != state.replicas:
            self._group_of = None  # a group's replica count may change
        if (not self.enabled or state.target != "serving" or key in self.registry.entries
                or (self.registry.eager and self.node in self._owners_for(state, time.monotonic()))):
            # Placed here: at once, so a retirement right behind a new version finds its successor.
            self.registry.apply_model(state, received=received)
        self.dirty = True

    def on_traffic(self, policy: TrafficPolicy) -> None:
        known = self.policies.get(policy.endpoint)
        if known is not None and (known.state.at, known.state.revision) > (policy.at, policy.revision):
            return
        self.policies[policy.endpoint] = Known(policy, time.monotonic())
        self._group_of = None
        self.dirty = True

    def on_status(self, status: NodeStatus, now: float | None = None) -> None:
        self.fleet.observe(status, time.monotonic() if now is None else now)

    def on_snapshot(self, models: Iterable[ModelState], traffic: Iterable[TrafficPolicy],
                    started: float) -> list[ModelState]:
        """Repair what events missed from a store snapshot; returns the snapshot as the registry should see it."""
        models, traffic = list(models), list(traffic)
        plan = plan_reconcile(self.states, models, started)
        for key in plan.drop:
            self.states.pop(key, None)
        for s in plan.apply:
            self.states[s.key()] = Known(s, time.monotonic())
        tplan = plan_reconcile(self.policies, traffic, started)
        for endpoint in tplan.drop:
            self.policies.pop(endpoint, None)
        for p in tplan.apply:
            self.policies[p.endpoint] = Known(p, time.monotonic())
        self._group_of = None
        self.refresh()
        if not self.enabled:
            return models
        # What the node holds stays until `refresh` releases it (after its new owners are ready, never while leaving).
        keep = self.plan.desired | {k for k, e in self.registry.entries.items() if not e.retired}
        return [s for s in models if s.target != "serving" or s.key() in keep]

    # ------------------------------------------------------------------ the plan

    def members(self, now: float) -> tuple[Member, ...]:
        ms = {m.node: m for m in self.fleet.members(now)}
        if self.leaving:
            ms.pop(self.node, None)
        else:
            ms[self.node] = Member(self.node, self.weight)
        return tuple(sorted(ms.values()))

    def placement(self, now: float) -> dict[str, list[str]]:
        """{name:version: owners} for every serving model this node knows, from its view of the membership."""
        members = self.members(now)
        if members != self._members:
            if self._members:
                log.info("fleet membership changed", node=self.node, members=[m.node for m in members])
            self._members = members
            self._owners.clear()
        serving = [k.state for k in self.states.values() if k.state.target == "serving"]
        if self._group_of is None:
            self._group_of = groups((s.name for s in serving), (k.state for k in self.policies.values()))
            self._want: dict[str, int] = {}
            for s in serving:
                g = self._group_of.get(s.name, s.name)
                self._want[g] = max(self._want.get(g, 0), replicas_of(s, self.default_replicas))
        out = {}
        for s in serving:
            g = self._group_of.get(s.name, s.name)
            r = self._want.get(g, replicas_of(s, self.default_replicas))
            own = self._owners.get((g, r))
            if own is None:
                own = self._owners[(g, r)] = owners(g, members, r) if members else []
            out[s.key()] = own
        return out

    def _owners_for(self, state: ModelState, now: float) -> list[str]:
        """Owners of one model without recomputing the whole placement (the groups are cached)."""
        if self._group_of is None or self.members(now) != self._members:
            self.placement(now)  # rebuilds the groups and the membership's owner cache
        assert self._group_of is not None
        g = self._group_of.get(state.name, state.name)
        r = max(self._want.get(g, 0), replicas_of(state, self.default_replicas))
        own = self._owners.get((g, r))
        if own is None:
            own = self._owners[(g, r)] = owners(g, self._members, r) if self._members else []
        return own

    def refresh(self, now: float | None = None) -> int:
        """Bring the registry to this node's plan; returns the models added or released."""
        if not self.enabled:
            return 0
        now = time.monotonic() if now is None else now
        placed = self.placement(now)
        held = [k for k, e in self.registry.entries.items() if not e.retired]
        holders = self.fleet.holders(now)
        for k in self.registry.loaded_keys():
            holders.setdefault(k, set()).add(self.node)
        plan = self.plan = node_plan(self.node, placed, held, holders)
        changes = 0
        for key in sorted(plan.load - set(self.registry.entries)):
            self.registry.apply_model(self.states[key].state)
            changes += 1
        announce = False
        for key in held:
            if key in plan.desired or key not in placed or self.leaving:
                if self._releasable.pop(key, None) is not None:
                    announce = True  # placed here again (the membership moved meanwhile): serving it after all
                continue
            since = self._releasable.get(key)
            if since is None:
                # Phase one: say so (heartbeats stop listing it ready), keep serving it for the grace.
                self._releasable[key] = now
                announce = True
                continue
            if now - since < self.grace:
                continue
            state = self.states[key].state
            log.info("model placed on other nodes: released", model=state.name, version=state.version,
                     owners=placed[key])
            self.registry.apply_model(msgspec.structs.replace(state, target="retired",
                                                              reason="placed on other nodes"))
            self._releasable.pop(key, None)
            changes += 1
        self.dirty = bool(self._releasable) or bool(plan.keep)
        if announce or changes:
            self.on_change()
        return changes

    @property
    def releasing(self) -> set[str]:
        """Keys this node is about to release: its heartbeats no longer list them ready."""
        return set(self._releasable)

    def alone(self, now: float | None = None) -> bool:
        """No other member to hand anything off to."""
        now = time.monotonic() if now is None else now
        return all(m.node == self.node for m in self.fleet.members(now))

    def handed_off(self, now: float | None = None) -> bool:
        """While leaving: every model this node holds is ready on the nodes it moves to (or has no other home)."""
        now = time.monotonic() if now is None else now
        self.refresh(now)
        placed = self.placement(now)
        if not self._members:
            return True  # nobody to hand off to
        return all(not placed.get(k) or k not in self.plan.keep for k in self.registry.entries)
