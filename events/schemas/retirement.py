"""`modelcd.retirement`: warnings and decisions of the retirement processor, keyed by model."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.retirement"


class RetirementWarning(Event, frozen=True, kw_only=True, tag="modelcd.retirement.warning.v1"):
    """A model version unused for most of its expiry period: its owner is warned before it is retired."""

    topic = TOPIC
    model: Annotated[str, Doc("Model name; also the record key.")]
    version: Annotated[str, Doc("Model version.")]
    owner: Annotated[str, Doc("Owner to warn.")]
    last_used: Annotated[
        float,
        Doc("Last prediction seen for this version, seconds since the Unix epoch (UTC, fractional)."),
    ]
    retire_at: Annotated[
        float,
        Doc("When it will be retired if it stays unused, seconds since the Unix epoch (UTC, fractional)."),
    ]
    at: Annotated[
        float,
        Doc("When the warning was issued, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


class RetirementDecision(Event, frozen=True, kw_only=True, tag="modelcd.retirement.decision.v1"):
    """What the retirement processor decided for a model version past its expiry."""

    topic = TOPIC
    model: Annotated[str, Doc("Model name; also the record key.")]
    version: Annotated[str, Doc("Model version.")]
    owner: Annotated[str, Doc("Owner of the model.")] = ""
    action: Annotated[
        Literal["retire", "skip", "cancel"],
        Doc("retire (it is being retired), skip (not retired although due, e.g. pinned; reason says why) or cancel "
            "(used again after a warning)."),
    ]
    reason: Annotated[str, Doc("Why, in words.")] = ""
    last_used: Annotated[
        float,
        Doc("Last prediction seen for this version, seconds since the Unix epoch (UTC, fractional) (0: never used)."),
    ] = 0.0
    at: Annotated[
        float,
        Doc("When the decision was made, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


RetirementEvent = RetirementWarning | RetirementDecision
