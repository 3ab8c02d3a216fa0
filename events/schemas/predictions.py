"""`modelcd.predictions`: sampled prediction logs, keyed by model."""

from __future__ import annotations

from typing import Any

import msgspec

from .base import Event, now

TOPIC = "modelcd.predictions"


class PredictionLog(Event, frozen=True, kw_only=True, tag="modelcd.prediction.log.v1"):
    topic = TOPIC
    request_id: str
    model: str
    version: str
    endpoint: str = ""
    node: str = ""
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    latency_ms: float = 0.0
    error: str | None = None
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


PredictionEvent = PredictionLog
