"""`modelcd.health`: node heartbeats and per-model health checks, keyed by node."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.health"


class LoadedModel(msgspec.Struct, frozen=True, kw_only=True):
    """One model version held by a node."""

    name: Annotated[str, Doc("Model name.")]
    version: Annotated[str, Doc("Model version.")]
    sha256: Annotated[str, Doc("Package id (sha256 hex of the archive).")]
    state: Annotated[
        Literal["loading", "ready", "failed", "unloaded"],
        Doc("loading, ready, failed or unloaded."),
    ] = "ready"
    memory_bytes: Annotated[int, Doc("Resident memory the model holds on the node, in bytes.")] = 0
    error: Annotated[str | None, Doc("Why it failed to load (null unless failed).")] = None
    quarantined: Annotated[bool, Doc("true when its worker kept dying and the node stopped restarting it (state "
                                     "is failed; error says why).")] = False
    restarts: Annotated[int, Doc("Deaths of its worker process on this node (crashes and kills).")] = 0


class NodeStatus(Event, frozen=True, kw_only=True, tag="modelcd.node.status.v1"):
    """A serving node's heartbeat: readiness, models held and memory."""

    topic = TOPIC
    node: Annotated[str, Doc("Node id (MODELCD_NODE_ID, default host:port); also the record key.")]
    url: Annotated[str, Doc("Base URL of the node's Open Inference Protocol API.")] = ""
    ready: Annotated[bool, Doc("true once the node has caught up with the state topics and answers predictions.")]
    models: Annotated[list[LoadedModel], Doc("Every model the node holds, with its state.")] = []
    memory_bytes: Annotated[int, Doc("Resident memory of the loaded models, in bytes.")] = 0
    memory_budget: Annotated[int, Doc("The node's memory budget for models, in bytes (MODELCD_MEMORY_BUDGET).")] = 0
    stopping: Annotated[bool, Doc("true while the node drains before exiting.")] = False
    at: Annotated[
        float,
        Doc("When, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.node


class ModelHealth(Event, frozen=True, kw_only=True, tag="modelcd.model.health.v1"):
    """The result of a health check of one model version on one node."""

    topic = TOPIC
    node: Annotated[str, Doc("Node that ran the check; also the record key.")]
    model: Annotated[str, Doc("Model name.")]
    version: Annotated[str, Doc("Model version.")]
    ok: Annotated[bool, Doc("true if the check passed.")]
    check: Annotated[
        Literal["load", "predict", "samples"],
        Doc("load (the model loaded), predict, or samples (predicted on its own sample data and matched the expected "
            "outputs)."),
    ] = "samples"
    latency_ms: Annotated[float, Doc("Time the check took, in milliseconds.")] = 0.0
    detail: Annotated[str, Doc("Why it failed, in words (empty when ok).")] = ""
    quarantined: Annotated[bool, Doc("true when the node quarantined the model after repeated deaths of its "
                                     "worker process.")] = False
    at: Annotated[
        float,
        Doc("When, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.node


class NodeDrain(Event, frozen=True, kw_only=True, tag="modelcd.node.drain.v1"):
    """A request that one serving node leave the fleet: it hands its models off, drains and exits (a release roll)."""

    topic = TOPIC
    node: Annotated[str, Doc("Node id that should leave; also the record key.")]
    reason: Annotated[str, Doc("Why, in words (e.g. replaced by a new release).")] = ""
    at: Annotated[
        float,
        Doc("When, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.node


HealthEvent = NodeStatus | ModelHealth | NodeDrain
