"""`modelcd.retirement`: warnings and decisions of the retirement processor, keyed by model."""

from __future__ import annotations

from typing import Literal

import msgspec

from .base import Event, now

TOPIC = "modelcd.retirement"


class RetirementWarning(Event, frozen=True, kw_only=True, tag="modelcd.retirement.warning.v1"):
    topic = TOPIC
    model: str
    version: str
    owner: str
    last_used: float
    retire_at: float
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


class RetirementDecision(Event, frozen=True, kw_only=True, tag="modelcd.retirement.decision.v1"):
    topic = TOPIC
    model: str
    version: str
    owner: str = ""
    action: Literal["retire", "skip", "cancel"]
    reason: str = ""
    last_used: float = 0.0
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


RetirementEvent = RetirementWarning | RetirementDecision
