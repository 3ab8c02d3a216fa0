"""`modelcd.health`: node heartbeats and per-model health checks, keyed by node."""

from __future__ import annotations

from typing import Literal

import msgspec

from .base import Event, now

TOPIC = "modelcd.health"


class LoadedModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: str
    sha256: str
    state: Literal["loading", "ready", "failed", "unloaded"] = "ready"
    memory_bytes: int = 0
    error: str | None = None


class NodeStatus(Event, frozen=True, kw_only=True, tag="modelcd.node.status.v1"):
    topic = TOPIC
    node: str
    url: str = ""
    ready: bool
    models: list[LoadedModel] = []
    memory_bytes: int = 0
    memory_budget: int = 0
    stopping: bool = False
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.node


class ModelHealth(Event, frozen=True, kw_only=True, tag="modelcd.model.health.v1"):
    topic = TOPIC
    node: str
    model: str
    version: str
    ok: bool
    check: Literal["load", "predict", "samples"] = "samples"
    latency_ms: float = 0.0
    detail: str = ""
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.node


HealthEvent = NodeStatus | ModelHealth
