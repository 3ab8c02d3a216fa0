"""`modelcd.predictions`: sampled prediction logs, keyed by model."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.predictions"


class PredictionLog(Event, frozen=True, kw_only=True, tag="modelcd.prediction.log.v1"):
    """One sampled prediction: the request's inputs, the model's outputs, latency and error."""

    topic = TOPIC
    request_id: Annotated[
        str,
        Doc("The request's id: the client's `id` field or `x-request-id` header, else one the node made (returned in "
            "the response's `id` and `x-request-id`)."),
    ]
    model: Annotated[str, Doc("Model name that answered; also the record key.")]
    version: Annotated[str, Doc("Model version that answered.")]
    endpoint: Annotated[str, Doc("Endpoint the request was sent to (empty when a model was called directly).")] = ""
    node: Annotated[str, Doc("Node that answered.")] = ""
    inputs: Annotated[
        dict[str, Any],
        Doc("The request's input tensors by name: `{name: {\"datatype\", \"shape\", \"data\"}}` (Open Inference "
            "Protocol, data flattened row-major)."),
    ] = {}
    outputs: Annotated[dict[str, Any], Doc("The response's output tensors by name, in the same form as inputs.")] = {}
    latency_ms: Annotated[float, Doc("Time the model took to answer, in milliseconds.")] = 0.0
    error: Annotated[str | None, Doc("Why the prediction failed (null when it succeeded).")] = None
    status: Annotated[
        int,
        Doc("HTTP status of the answer: 200, a 4xx the caller caused (a malformed or mismatched request: `error` "
            "says why, `outputs` is empty) or a 5xx the model or node caused."),
    ] = 200
    at: Annotated[
        float,
        Doc("When the prediction was answered, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


PredictionEvent = PredictionLog
