"""`modelcd.shadow-predictions` and `modelcd.shadow-comparisons`."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .base import Doc, Event, now

PREDICTIONS_TOPIC = "modelcd.shadow-predictions"
COMPARISONS_TOPIC = "modelcd.shadow-comparisons"


class ShadowPrediction(Event, frozen=True, kw_only=True, tag="modelcd.shadow.prediction.v1"):
    """One shadow prediction beside the primary's answer to the same request."""

    topic = PREDICTIONS_TOPIC
    request_id: Annotated[str, Doc("The primary request's id (as in modelcd.predictions).")]
    primary_model: Annotated[str, Doc("Model that answered the caller; also the record key.")]
    primary_version: Annotated[str, Doc("Its version.")]
    shadow_model: Annotated[str, Doc("Model that predicted in the shadow.")]
    shadow_version: Annotated[str, Doc("Its version.")]
    primary_outputs: Annotated[
        dict[str, Any],
        Doc("The primary's output tensors by name (`{name: {\"datatype\", \"shape\", \"data\"}}`)."),
    ] = {}
    shadow_outputs: Annotated[dict[str, Any], Doc("The shadow's output tensors by name.")] = {}
    primary_latency_ms: Annotated[float, Doc("Primary prediction time, in milliseconds.")] = 0.0
    shadow_latency_ms: Annotated[float, Doc("Shadow prediction time, in milliseconds.")] = 0.0
    shadow_error: Annotated[str | None, Doc("Why the shadow failed (null when it answered).")] = None
    node: Annotated[str, Doc("Node that ran both.")] = ""
    at: Annotated[
        float,
        Doc("When, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.primary_model


class ShadowComparison(Event, frozen=True, kw_only=True, tag="modelcd.shadow.comparison.v1"):
    """Agreement and error metrics of a primary and its shadow over one tumbling window."""

    topic = COMPARISONS_TOPIC
    primary: Annotated[str, Doc("Primary as `name:version`.")]
    shadow: Annotated[str, Doc("Shadow as `name:version`. The record key is `primary/shadow`.")]
    window_start: Annotated[float, Doc("Start of the tumbling window, seconds since the Unix epoch (UTC, fractional).")]
    window_end: Annotated[float, Doc("End of the window, seconds since the Unix epoch (UTC, fractional).")]
    count: Annotated[int, Doc("Shadow predictions in the window.")]
    errors: Annotated[int, Doc("Shadow predictions that failed.")] = 0
    agreement: Annotated[
        float | None,
        Doc("Classifiers: share (0..1) of requests where both predicted the same label (null for regressors)."),
    ] = None
    mean_abs_diff: Annotated[
        float | None,
        Doc("Regressors: mean |primary - shadow| over the window (null for classifiers)."),
    ] = None
    max_abs_diff: Annotated[float | None, Doc("Regressors: largest |primary - shadow| in the window.")] = None
    primary_latency_ms: Annotated[
        dict[str, float],
        Doc("Primary latency percentiles in milliseconds: keys p50, p90, p99."),
    ] = {}
    shadow_latency_ms: Annotated[
        dict[str, float],
        Doc("Shadow latency percentiles in milliseconds: keys p50, p90, p99."),
    ] = {}
    at: Annotated[
        float,
        Doc("When the window was closed, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return f"{self.primary}/{self.shadow}"


ShadowPredictionEvent = ShadowPrediction
ShadowComparisonEvent = ShadowComparison
