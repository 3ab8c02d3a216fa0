"""Prometheus metrics of one serving node, in a registry of its own (several nodes may share a process).

Request-path metrics are labelled children created once per model at load, so a
request only increments and observes. Everything that describes state (loaded models,
memory, telemetry drops) is read at scrape time by a collector, never kept in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Microsecond models and second-long ones share a node: buckets span both.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """The labelled children one model's requests touch."""

    requests: Any
    latency: Any
    errors: Callable[[str], Any]


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("modelcd_requests", "Inference requests answered, per model version.",
                                ["model", "version"], registry=self.registry)
        self.errors = Counter("modelcd_request_errors", "Inference requests that failed, per model and kind "
                              "(invalid, predict, timeout, unavailable).", ["model", "version", "kind"],
                              registry=self.registry)
        self.latency = Histogram("modelcd_request_duration_seconds", "Time to answer an inference request "
                                 "(decode, predict, encode).", ["model", "version"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.unrouted = Counter("modelcd_requests_unrouted", "Requests for no known model or endpoint, or "
                                "rejected before reaching a model.", ["reason"], registry=self.registry)
        self.loads = Counter("modelcd_model_loads", "Model loads by outcome (ok, failed).", ["outcome"],
                             registry=self.registry)
        self.worker_deaths = Counter("modelcd_worker_deaths", "Model worker processes that died or were killed, per "
                                     "model and cause (a signal name, killed, exited).", ["model", "version", "cause"],
                                     registry=self.registry)
        self.evictions = Counter("modelcd_model_evictions", "Models unloaded to stay under the memory budget.",
                                 registry=self.registry)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        errors = self.errors

        def error_child(kind: str) -> Any:
            return errors.labels(model, version, kind)

        return ModelMetrics(self.requests.labels(model, version), self.latency.labels(model, version), error_child)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Reads gauges from a callable at scrape time: [(name, doc, [(labels, value)])]."""

    def __init__(self, read: Callable[[], list[tuple[str, str, list[tuple[dict[str, str], float]]]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for name, doc, samples in self._read():
            labels = sorted(samples[0][0]) if samples else []
            family = GaugeMetricFamily(name, doc, labels=labels)
            for lbl, value in samples:
                family.add_metric([lbl[k] for k in labels], value)
            yield family

    def describe(self) -> list[Metric]:
        return []
