"""`modelcd.usage`: per node, per interval, per model aggregates (never one event per prediction)."""

from __future__ import annotations

import msgspec

from .base import Event, now

TOPIC = "modelcd.usage"


class UsageReport(Event, frozen=True, kw_only=True, tag="modelcd.usage.report.v1"):
    topic = TOPIC
    model: str
    version: str
    node: str
    interval_start: float
    interval_end: float
    count: int
    errors: int = 0
    last_used: float
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


UsageEvent = UsageReport
