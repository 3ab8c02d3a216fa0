"""`modelcd.usage`: per node, per interval, per model aggregates (never one event per prediction)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.usage"


class UsageReport(Event, frozen=True, kw_only=True, tag="modelcd.usage.report.v1"):
    """How often one node used one model version over one interval (aggregated, never per request)."""

    topic = TOPIC
    model: Annotated[str, Doc("Model name; also the record key.")]
    version: Annotated[str, Doc("Model version.")]
    node: Annotated[str, Doc("Node that served the requests.")]
    interval_start: Annotated[
        float,
        Doc("Start of the aggregation interval, seconds since the Unix epoch (UTC, fractional)."),
    ]
    interval_end: Annotated[float, Doc("End of the interval, seconds since the Unix epoch (UTC, fractional).")]
    count: Annotated[int, Doc("Requests answered by this version on this node in the interval.")]
    errors: Annotated[
        int,
        Doc("Requests to this version that failed in the interval, whoever's fault: the client's (4xx) and the "
            "model's or node's (5xx)."),
    ] = 0
    client_errors: Annotated[
        int,
        Doc("Of `errors`, those refused as the client's mistake (4xx: wrong shape, datatype, ...); rollout "
            "analysis does not count them against the model."),
    ] = 0
    last_used: Annotated[float, Doc("Last request in the interval, seconds since the Unix epoch (UTC, fractional).")]
    at: Annotated[
        float,
        Doc("When the report was published, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model


UsageEvent = UsageReport
