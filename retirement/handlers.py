"""What the retirement processor does with each message, without Kafka: entries in, entries and events out.

The processor's state is one `ModelEntry` per model name (the key of `modelcd.usage`
and `modelcd.retirement`, so all of one model's state lives on one partition):
a `Record` per version, and the protections each endpoint currently puts on each
version. `service.py` decodes, calls these, publishes the events and stores the entry.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import msgspec

from modelcd.events.schemas import (
    Event,
    ModelState,
    RetirementDecision,
    RetirementWarning,
    RetireRequested,
    UsageReport,
)

from . import policy
from .policy import Action, Decision, Record

REQUESTED_BY = "retirement"
_ID_NAMESPACE = uuid.UUID("5b0f8a52-6a3c-4b5e-9a55-2f1d0c6f4e11")


class ModelEntry(msgspec.Struct, kw_only=True):
    """All the processor knows about one model name (a faust table value, stored as builtins)."""

    versions: dict[str, Record] = msgspec.field(default_factory=dict)
    # version (or "*": every version) -> endpoint -> reasons that endpoint protects it for
    protections: dict[str, dict[str, list[str]]] = msgspec.field(default_factory=dict)

    def reasons(self, version: str) -> list[str]:
        out: list[str] = []
        for scope in (version, "*"):
            for reasons in self.protections.get(scope, {}).values():
                out.extend(reasons)
        return out


# --- internal messages on the processor's own repartition topic (keyed by model name) ------------


class StateChanged(msgspec.Struct, frozen=True, kw_only=True, tag="state"):
    state: ModelState


class ProtectionChanged(msgspec.Struct, frozen=True, kw_only=True, tag="protection"):
    model: str
    version: str  # or "*"
    endpoint: str
    reasons: list[str]


class Check(msgspec.Struct, frozen=True, kw_only=True, tag="check"):
    at: float


Update = StateChanged | ProtectionChanged | Check
update_encoder = msgspec.json.Encoder()
update_decoder = msgspec.json.Decoder(Update)


def entry_from_table(value: object) -> ModelEntry:
    return ModelEntry() if value is None else msgspec.convert(value, ModelEntry)


def entry_to_table(entry: ModelEntry) -> object:
    return msgspec.to_builtins(entry)


# --- handlers ------------------------------------------------------------------------------------


def handle_usage(entry: ModelEntry, report: UsageReport, now: float = 0.0) -> bool:
    """Fold a usage report in; True when the entry changed (so the table is written only then). `now` is
    when the processor handles it: a version new to the table is tracked from then (`Record.tracked_since`)."""
    before = entry.versions.get(report.version)
    after = policy.on_usage(before, report, now)
    if after is before:
        return False
    entry.versions[report.version] = after
    return True


def handle_state(entry: ModelEntry, state: ModelState, now: float = 0.0, last_used: float = 0.0) -> bool:
    """Fold a ModelState in; True when it created the version's record (`last_used`: what the store remembers)."""
    before = entry.versions.get(state.version)
    entry.versions[state.version] = policy.on_state(before, state, now, last_used)
    return before is None


def handle_protection(entry: ModelEntry, msg: ProtectionChanged) -> None:
    scope = entry.protections.setdefault(msg.version, {})
    if msg.reasons:
        scope[msg.endpoint] = list(msg.reasons)
    else:
        scope.pop(msg.endpoint, None)
        if not scope:
            del entry.protections[msg.version]


@dataclass(frozen=True)
class Outcome:
    """One decision about one version, and the events that carry it out (in publish order)."""

    record: Record
    decision: Decision
    events: list[tuple[Event, str]] = field(default_factory=list)  # (event, deterministic event id)


def handle_check(entry: ModelEntry, now: float, warn_share: float) -> list[Outcome]:
    """Decide for every version of the model; updates `entry` as if the events were published.

    Event ids are derived from what they decide (model, version, idle spell), so an event
    republished after a crash between publish and table write carries the same id and
    consumers, which are idempotent per id, handle it once.
    """
    outcomes = []
    for version, record in list(entry.versions.items()):
        decision = policy.decide(record, now, entry.reasons(version), warn_share)
        if decision.action is Action.NONE:
            continue
        outcomes.append(Outcome(record, decision, events_for(record, decision, now)))
        entry.versions[version] = policy.apply(record, decision, now)
    return outcomes


def _event_id(*parts: object) -> str:
    return uuid.uuid5(_ID_NAMESPACE, "|".join(map(str, parts))).hex


def events_for(record: Record, decision: Decision, now: float) -> list[tuple[Event, str]]:
    name, version, spell = record.name, record.version, record.idle_since
    match decision.action:
        case Action.WARN:
            return [(RetirementWarning(model=name, version=version, owner=record.owner, last_used=record.last_used,
                                       retire_at=record.retire_at, at=now),
                     _event_id(name, version, spell, "warn"))]
        case Action.RETIRE:
            decision_event = RetirementDecision(model=name, version=version, owner=record.owner, action="retire",
                                                reason=decision.reason, last_used=record.last_used, at=now)
            request = RetireRequested(deployment_id=_event_id(name, version, spell, "retire-request"),
                                      model=name, version=version, requested_by=REQUESTED_BY,
                                      reason=f"auto-retired: {decision.reason}", requested_at=now)
            # The decision first: whoever sees the model retired can already read why.
            return [(decision_event, _event_id(name, version, spell, "retire")),
                    (request, _event_id(name, version, spell, "retire-requested"))]
        case Action.SKIP:
            return [(RetirementDecision(model=name, version=version, owner=record.owner, action="skip",
                                        reason=decision.reason, last_used=record.last_used, at=now),
                     _event_id(name, version, spell, "skip", decision.reason))]
        case Action.CANCEL:
            return [(RetirementDecision(model=name, version=version, owner=record.owner, action="cancel",
                                        reason=decision.reason, last_used=record.last_used, at=now),
                     _event_id(name, version, record.warned_at, "cancel"))]
        case _:
            return []
