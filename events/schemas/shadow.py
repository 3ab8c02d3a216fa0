"""`modelcd.shadow-predictions` and `modelcd.shadow-comparisons`."""

from __future__ import annotations

from typing import Any

import msgspec

from .base import Event, now

PREDICTIONS_TOPIC = "modelcd.shadow-predictions"
COMPARISONS_TOPIC = "modelcd.shadow-comparisons"


class ShadowPrediction(Event, frozen=True, kw_only=True, tag="modelcd.shadow.prediction.v1"):
    topic = PREDICTIONS_TOPIC
    request_id: str
    primary_model: str
    primary_version: str
    shadow_model: str
    shadow_version: str
    primary_outputs: dict[str, Any] = {}
    shadow_outputs: dict[str, Any] = {}
    primary_latency_ms: float = 0.0
    shadow_latency_ms: float = 0.0
    shadow_error: str | None = None
    node: str = ""
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.primary_model


class ShadowComparison(Event, frozen=True, kw_only=True, tag="modelcd.shadow.comparison.v1"):
    topic = COMPARISONS_TOPIC
    primary: str  # name:version
    shadow: str  # name:version
    window_start: float
    window_end: float
    count: int
    errors: int = 0
    agreement: float | None = None  # classifiers
    mean_abs_diff: float | None = None  # regressors
    max_abs_diff: float | None = None
    primary_latency_ms: dict[str, float] = {}  # p50/p90/p99
    shadow_latency_ms: dict[str, float] = {}
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return f"{self.primary}/{self.shadow}"


ShadowPredictionEvent = ShadowPrediction
ShadowComparisonEvent = ShadowComparison
