"""`modelcd.traffic`: the traffic policy of one endpoint (a state topic, last write wins).

An endpoint is a named group of models: a weighted split (sticky per request key),
plus shadow relations with a time window, a sampling rate and request criteria.
Rollout controller events travel on the same topic, keyed by endpoint, so a
controller's state is rebuilt by reading it back.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .base import Event, now

TOPIC = "modelcd.traffic"


class Route(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    version: str
    weight: float  # share in percent; the routes of a policy add up to 100


class Criterion(msgspec.Struct, frozen=True, kw_only=True):
    """A condition on the request: `field` is `header:<name>`, `param:<name>` or `input:<name>`."""

    field: str
    op: Literal["eq", "ne", "in", "gt", "ge", "lt", "le", "exists"] = "eq"
    value: Any = None


class ShadowRelation(msgspec.Struct, frozen=True, kw_only=True):
    primary: str  # model name (any version) or name:version
    shadow: str  # name:version
    start: float = 0.0
    end: float | None = None
    sample_rate: float = 1.0
    criteria: list[Criterion] = []


class TrafficPolicy(Event, frozen=True, kw_only=True, tag="modelcd.traffic.policy.v1"):
    topic = TOPIC
    endpoint: str
    routes: list[Route] = []
    sticky_key: str | None = "x-modelcd-key"  # header (or parameter) whose value pins a caller to a model
    shadows: list[ShadowRelation] = []
    revision: int = 0
    reason: str = ""
    deleted: bool = False
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.endpoint


class RolloutStep(Event, frozen=True, kw_only=True, tag="modelcd.rollout.step.v1"):
    """A rollout controller's decision: start, promote a step, hold, roll back, finish."""

    topic = TOPIC
    endpoint: str
    rollout_id: str
    action: Literal["start", "promote", "hold", "rollback", "pause", "resume", "abort", "complete"]
    step: int = 0
    weight: float = 0.0
    canary: str = ""
    baseline: str = ""
    evidence: dict[str, Any] = {}
    reason: str = ""
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.endpoint


TrafficEvent = TrafficPolicy | RolloutStep
