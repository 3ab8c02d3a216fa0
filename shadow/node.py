"""The adapter between a serving node and its ShadowExecutor: the one module that knows both.

`build_executor(settings, registry, telemetry, node_id)` returns an executor whose `predict`
runs a shadow exactly as the node runs any model (registry resolve -> acquire -> predict:
inline or in the pool, with the node's prediction timeout), whose `emit` is the node's bounded
telemetry buffer, and whose `convert` turns numpy outputs into the JSON the prediction log uses.
`ShadowCollector` exposes the executor's counters and gauges on the node's /metrics.

The serving package imports this module (see shadow/__init__.py for the five wiring points);
this module imports serving's registry and protocol lazily, so shadow's pure parts never need
serving's dependencies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


def build_executor(settings: Any, registry: Any, telemetry: Any, node_id: str) -> ShadowExecutor:
    """The node's executor (not started: run `executor.run()` in the node's TaskGroup)."""
    import numpy as np

    from modelcd.serving.protocol import tensors_to_log

    async def predict(model: str, version: str, inputs: Mapping[str, Any]) -> tuple[Any, float]:
        entry, _ = registry.resolve(model, version)
        loaded = entry.loaded or await registry.acquire(entry)
        arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in inputs.items()}
        first = next(iter(arrays.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        t0 = time.perf_counter()
        outputs = await registry.predict(entry, loaded, arrays, rows)
        return outputs, (time.perf_counter() - t0) * 1000.0

    def needs(model: str, version: str) -> list[str] | None:
        entry = registry.entries.get(f"{model}:{version}")
        if entry is None or entry.loaded is None:
            return None  # not loaded yet: its signature is unknown, it gets the request's inputs
        return [spec.name for spec in entry.loaded.manifest.inputs]

    features = None
    if getattr(settings, "feature_store_url", None):
        features = FeatureFetcher(RedisFeatureStore.from_url(settings.feature_store_url))
    return ShadowExecutor(predict=predict, emit=telemetry.offer, node=node_id, config=ExecutorConfig.from_settings(settings),
                          features=features, needs=needs, convert=tensors_to_log)


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
