"""The shadow side of the node's hooks: `attach` is the `ShadowFactory` a serving node is given.

`attach(hooks)` builds the executor from what the node lends (modelcd.serving.hooks): `predict`
runs a shadow exactly as the node runs any model (registry resolve -> acquire -> predict, with
the node's prediction timeout), `emit` is the node's bounded telemetry buffer, `convert` turns
numpy outputs into the JSON the prediction log uses, `input_names` tells which features a shadow
needs. `ShadowCollector` exposes the executor's counters and gauges on the node's /metrics.

This module knows only the hooks' interface, never the node's registry or protocol modules; the
node knows only `ShadowHook`. `modelcd up` / `modelcd serve` pass `attach` to the node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modelcd.serving.hooks import NodeHooks

from .executor import ExecutorConfig, ShadowExecutor
from .features import FeatureFetcher, RedisFeatureStore

_COUNTERS = {
    "offered": "Primary predictions offered to the shadow executor.",
    "matched": "(request, shadow) pairs the shadow relations selected.",
    "submitted": "Shadow jobs queued.",
    "dropped_full": "Shadow jobs dropped because the shadow queue was full.",
    "dropped_paused": "Shadow jobs dropped (or shed from the queue) while shadowing was paused.",
    "completed": "Shadow predictions produced (with outputs or an error).",
    "errors": "Shadow predictions that raised, timed out or lacked features.",
    "timeouts": "Shadow predictions that timed out (MODELCD_SHADOW_TIMEOUT).",
    "emit_errors": "Shadow predictions the telemetry buffer refused.",
    "pauses": "Times shadowing paused under pressure.",
}


def attach(hooks: NodeHooks) -> tuple[ShadowExecutor, ShadowCollector]:
    """The node's executor (not started: the node runs `executor.run()` in its TaskGroup) and its collector.

    This is the `ShadowFactory` (modelcd.serving.hooks) that `modelcd up` and `modelcd serve` hand a node.
    """
    settings = hooks.settings
    features = None
    if settings.feature_store_url:
        features = FeatureFetcher(RedisFeatureStore.from_url(settings.feature_store_url))
    executor = ShadowExecutor(predict=hooks.predict, emit=hooks.emit, node=hooks.node_id,
                              config=ExecutorConfig.from_settings(settings), features=features,
                              needs=hooks.input_names, convert=hooks.convert)
    return executor, ShadowCollector(executor)


class ShadowCollector(Collector):
    """Prometheus collector: `modelcd_shadow_*_total` counters, queue depth and paused gauges."""

    def __init__(self, executor: ShadowExecutor) -> None:
        self.executor = executor

    def collect(self) -> Iterator[Any]:
        ex = self.executor
        for attr, doc in _COUNTERS.items():
            c = CounterMetricFamily(f"modelcd_shadow_{attr}", doc)
            c.add_metric([], float(getattr(ex, attr)))
            yield c
        if ex.features is not None:
            c = CounterMetricFamily("modelcd_shadow_feature_lookups", "Feature-store lookups made for shadows.")
            c.add_metric([], float(ex.features.lookups))
            yield c
        g = GaugeMetricFamily("modelcd_shadow_queue_depth", "Shadow jobs waiting.")
        g.add_metric([], float(ex.queue_depth))
        yield g
        g = GaugeMetricFamily("modelcd_shadow_paused", "1 while shadowing is paused under pressure.")
        g.add_metric([], 1.0 if ex.paused else 0.0)
        yield g
        g = GaugeMetricFamily("modelcd_shadow_loop_busy", "Share of the last second the event loop was busy.")
        g.add_metric([], ex.pressure.busy or 0.0)
        yield g

    def describe(self) -> list[Any]:
        return []
