"""What the console knows, folded from the bus: sans-I/O, every event in, `now` passed to queries.

`ConsoleState.apply(event)` folds one event of the topics the feed reads (deployments, model
state, traffic and rollouts, usage, health, shadow comparisons, retirement) and returns the
sections of the page it changed; `feed.py` is the I/O shell that calls it, `figures.py` and
`render.py` read it.

Invariants:
- nothing here is invented: a figure no event carries stays absent (None), and the page says so;
- folding reuses the owning parts' own folds, so the console agrees with their CLIs: deployments
  through ingest's `TrackingView`, rollouts through `rollout.machine.apply`, protections and
  retirement records through `retirement.policy`;
- memory is bounded: deployments (`max_deployments`), usage reports per model (`USAGE_KEEP`),
  comparison windows per pair (`WINDOWS_KEEP`), policy revisions per endpoint (`POLICIES_KEEP`);
- state topics (model state, traffic) are read from the beginning, last write per key wins.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

from modelcd.events.schemas import (
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentProgress,
    Event,
    ModelHealth,
    ModelState,
    NodeStatus,
    RetirementDecision,
    RetirementWarning,
    RolloutStep,
    ShadowComparison,
    TrafficPolicy,
    UsageReport,
)
from modelcd.ingest.tracking import TrackingView
from modelcd.retirement import policy as retirement
from modelcd.rollout.machine import Rollout
from modelcd.rollout.machine import apply as apply_rollout

SECTIONS = ("deployments", "models", "endpoints", "shadows", "fleet")

USAGE_KEEP = 512
WINDOWS_KEEP = 240
POLICIES_KEEP = 20
COMMANDS_KEEP = 20


@dataclass
class Counters:
    """What the feed did, shown on the page's status line."""

    events: int = 0
    undecodable: int = 0


@dataclass
class ConsoleState:
    deployments: TrackingView = field(default_factory=lambda: TrackingView(max_deployments=500))
    models: dict[str, ModelState] = field(default_factory=dict)  # "name:version" -> latest state
    records: dict[str, retirement.Record] = field(default_factory=dict)  # retirement's view of each model
    usage: dict[str, collections.deque[UsageReport]] = field(default_factory=dict)
    health: dict[str, dict[str, ModelHealth]] = field(default_factory=dict)  # model -> node -> last check
    retirement: dict[str, RetirementWarning | RetirementDecision] = field(default_factory=dict)
    policies: dict[str, TrafficPolicy] = field(default_factory=dict)
    policy_history: dict[str, collections.deque[TrafficPolicy]] = field(default_factory=dict)
    protections: dict[str, retirement.EndpointView] = field(default_factory=dict)
    rollouts: dict[str, Rollout] = field(default_factory=dict)
    commands: dict[str, collections.deque[RolloutStep]] = field(default_factory=dict)  # sent by operators
    windows: dict[tuple[str, str], dict[float, ShadowComparison]] = field(default_factory=dict)
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)

    def apply(self, event: Event) -> frozenset[str]:
        """Fold one event in; the sections whose rendering may have changed."""
        self.counters.events += 1
        match event:
            case DeploymentProgress() | DeploymentCompleted() | DeploymentFailed():
                self.deployments.apply(event)
                return frozenset({"deployments"})
            case ModelState():
                key = f"{event.name}:{event.version}"
                self.models[key] = event
                self.records[key] = retirement.on_state(self.records.get(key), event)
                return frozenset({"models", "deployments"})
            case UsageReport():
                key = f"{event.model}:{event.version}"
                self.usage.setdefault(key, collections.deque(maxlen=USAGE_KEEP)).append(event)
                self.records[key] = retirement.on_usage(self.records.get(key), event)
                return frozenset({"models"})
            case NodeStatus():
                self.nodes[event.node] = event
                self.deployments.apply(event)
                return frozenset({"fleet", "models", "deployments"})
            case ModelHealth():
                self.health.setdefault(f"{event.model}:{event.version}", {})[event.node] = event
                return frozenset({"models"})
            case TrafficPolicy():
                self.policies[event.endpoint] = event
                self.policy_history.setdefault(event.endpoint, collections.deque(maxlen=POLICIES_KEEP)).append(event)
                self.protections[event.endpoint] = retirement.on_traffic(self.protections.get(event.endpoint), event)
                return frozenset({"endpoints", "models", "shadows"})
            case RolloutStep():
                if event.command:
                    self.commands.setdefault(event.endpoint, collections.deque(maxlen=COMMANDS_KEEP)).append(event)
                else:
                    r = apply_rollout(self.rollouts.get(event.endpoint), event)
                    if r is not None:
                        self.rollouts[event.endpoint] = r
                    self.protections[event.endpoint] = retirement.on_traffic(
                        self.protections.get(event.endpoint), event)
                return frozenset({"endpoints", "models"})
            case ShadowComparison():
                pair = self.windows.setdefault((event.primary, event.shadow), {})
                pair[event.window_start] = event  # a window re-emitted after a crash replaces the first one
                if len(pair) > WINDOWS_KEEP:
                    del pair[min(pair)]
                return frozenset({"shadows", "models"})
            case RetirementWarning() | RetirementDecision():
                self.retirement[f"{event.model}:{event.version}"] = event
                return frozenset({"models"})
        self.counters.events -= 1
        return frozenset()

    def apply_all(self, events: Iterable[Event]) -> frozenset[str]:
        changed: set[str] = set()
        for e in events:
            changed |= self.apply(e)
        return frozenset(changed)

    # -- derived views the renderer shares ---------------------------------------------------------

    def pending_commands(self, endpoint: str) -> list[RolloutStep]:
        """Operators' commands the controller has not answered yet (no fact carries their id)."""
        r = self.rollouts.get(endpoint)
        acked = r.acked if r is not None else set()
        return [c for c in self.commands.get(endpoint, ()) if c.command_id not in acked
                and (r is None or c.action == "start" or c.rollout_id == r.rollout_id) and not _superseded(c, r)]

    def protection_index(self) -> dict[str, set[str]]:
        """{"name:version" or "name:*": reasons} over every endpoint (compute once per rendering)."""
        index: dict[str, set[str]] = {}
        for view in self.protections.values():
            for k, why in retirement.endpoint_protections(view).items():
                index.setdefault(k, set()).update(why)
        return index

    def protections_of(self, key: str, index: dict[str, set[str]] | None = None) -> list[str]:
        """Why retirement keeps `name:version` (traffic, shadows, rollouts, pinned), as retirement decides it."""
        index = self.protection_index() if index is None else index
        reasons = index.get(key, set()) | index.get(f"{key.rpartition(':')[0]}:*", set())
        record = self.records.get(key)
        return sorted(reasons | ({"pinned by its owner"} if record is not None and record.pinned else set()))

    def loaded_index(self) -> dict[tuple[str, str], list[tuple[str, int]]]:
        """{(name, version): [(node, resident bytes)]} of ready models on nodes that are not stopping."""
        index: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for node, s in sorted(self.nodes.items()):
            if s.stopping:
                continue
            for m in s.models:
                if m.state == "ready":
                    index.setdefault((m.name, m.version), []).append((node, m.memory_bytes))
        return index

    def nodes_with(self, name: str, version: str) -> list[str]:
        """Nodes whose latest heartbeat lists name:version loaded and ready (stopping nodes serve nothing)."""
        return [node for node, _bytes in self.loaded_index().get((name, version), [])]


def _superseded(cmd: RolloutStep, r: Rollout | None) -> bool:
    # A start command is answered by a start fact with a new rollout id; once a later rollout runs, older
    # start commands are history, not pending.
    return cmd.action == "start" and r is not None and r.started_at >= cmd.at
