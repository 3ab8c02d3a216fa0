"""The narrow interface between a serving node and the shadow executor that runs beside it.

The node never imports the shadow part, and the shadow part never reaches into the node's
registry: whoever starts a node (`modelcd up`, `modelcd serve`, a test) passes a
`ShadowFactory`. The node calls it once with `NodeHooks` — its way of running a loaded model
(`predict`), the input names a loaded model declares (`input_names`), its bounded telemetry
buffer (`emit`) and the converter from raw outputs to the prediction-log JSON (`convert`) — and
gets back a `ShadowHook` plus an optional Prometheus collector for its `/metrics`.

What the node promises the hook: `run()` is started in the node's TaskGroup and cancelled at
drain, after the HTTP server stopped and before telemetry is flushed; every
TrafficPolicy the node applies reaches `update_policy` (events) or `reconcile` (the store);
`offer(PrimaryResult)` is called after the response was sent, only while `rules` is truthy.
What the hook promises the node: `offer` is synchronous, cheap and never raises; a result > 0
means the request was shadowed (the node then skips its PredictionLog).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.registry import Collector

from modelcd.events.schemas import TrafficPolicy
from modelcd.settings import Settings


@dataclass(frozen=True, slots=True)
class PrimaryResult:
    """What the node hands over once the primary answered."""

    request_id: str
    model: str
    version: str
    inputs: Mapping[str, Any]  # name -> value (the request's inputs plus features looked up for the primary)
    outputs: Any  # JSON-ready dict, or raw (numpy arrays) converted by the executor's `convert` off the request path
    latency_ms: float
    headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] = field(default_factory=dict)  # or ASGI's pairs
    params: Mapping[str, Any] = field(default_factory=dict)
    entity: str | None = None  # feature-store entity id, when the request names one
    at: float | None = None  # when the primary answered (epoch seconds); None: now


# Run `model:version` on `inputs` exactly as the node runs any request; return (raw outputs, latency in ms).
NodePredict = Callable[[str, str, Mapping[str, Any]], Awaitable[tuple[Any, float]]]


@dataclass(frozen=True, slots=True)
class NodeHooks:
    """What a node lends the work beside it."""

    node_id: str
    settings: Settings
    predict: NodePredict
    input_names: Callable[[str, str], list[str] | None]  # None: not loaded, signature unknown
    emit: Callable[[Any], Any]  # the node's bounded telemetry buffer (never blocks)
    convert: Callable[[Mapping[str, Any]], Any]  # raw outputs -> prediction-log JSON


class ShadowHook(Protocol):
    """What the node calls on its shadow executor (the whole interface)."""

    rules: Any  # truthy while any shadow relation is known

    def offer(self, primary: PrimaryResult) -> int: ...

    def update_policy(self, policy: TrafficPolicy) -> None: ...

    def reconcile(self, policies: Iterable[TrafficPolicy], started: float) -> None: ...

    async def run(self) -> None: ...


ShadowFactory = Callable[[NodeHooks], tuple[ShadowHook, Collector | None]]
