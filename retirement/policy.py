"""Expiry and retirement decisions, sans-I/O: records and events in, decisions out, `now` passed in.

Invariants (what `decide` and `apply` guarantee together):
- idle time counts from max(deployed_at, last_used, tracked_since): a freshly deployed model is
  not idle, and neither is one the processor has only just begun to track. `tracked_since` is when
  this record was created in the processor's table (`now` of the first event about the version):
  the table lives on the broker (faust changelog), so a broker that lost it also lost the usage
  history, and a model used three days ago must not look idle since its deployment 60 days ago.
  With no usage history since the processor's start, the clock starts at that start: a lost
  history only ever delays a warning (by at most one expiry period), never brings one forward;
- a model is warned at most once per idle spell: `apply(WARN)` sets `warned_at`, and a
  warned record is never warned again until a use cancels the warning;
- a model is never retired without a warning first: RETIRE needs `warned_at`, so the
  owner always gets at least one check interval's notice, even after an outage;
- a protected model (pinned, weight > 0 in a traffic policy, the shadow of a shadow
  relation, part of a rollout in progress) is never warned or retired; a SKIP naming
  the protections is decided once per change of reason, only for a model that would
  otherwise be acted on;
- a use that makes the model no longer idle enough to deserve its warning CANCELs it;
- after RETIRE the record waits (`retire_requested_at`) for the retired ModelState, unless the
  model became protected meanwhile: ingest refuses to retire a model in use (the same check), so
  a SKIP ends the wait and the model is kept;
- a record's `expiry_seconds` is at most `MAX_EXPIRY_SECONDS` (100 years), whatever a ModelState says:
  ingest refuses longer ones, and a state written by anything else must not overflow the table's
  int64 JSON encoding (orjson) and stop the processor.

The service keeps one `Record` per `name:version` in a faust table, calls `decide`
on each check, publishes what the decision says and stores `apply(record, decision, now)`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from modelcd.events.schemas import ModelState, RolloutStep, TrafficPolicy, UsageReport
from modelcd.store.package import MAX_EXPIRY_SECONDS
from modelcd.store.safety import ROLLOUT_ENDED, endpoint_uses


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What the processor knows about one `name:version` (a faust table value)."""

    name: str
    version: str
    owner: str = ""
    deployed_at: float = 0.0
    expiry_seconds: int = 0
    last_used: float = 0.0
    warned_at: float | None = None
    pinned: bool = False
    retired: bool = False
    known: bool = False  # a serving ModelState was seen: usage may arrive before the state
    skip_reason: str = ""  # the last SKIP's reason, so a skip is published once per change
    retire_requested_at: float | None = None
    tracked_since: float = 0.0  # when the processor's table first held this version (0: unknown)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def idle_since(self) -> float:
        return max(self.deployed_at, self.last_used, self.tracked_since)

    @property
    def retire_at(self) -> float:
        """When the model retires if it stays unused (its owner's expiry after the last use)."""
        return self.idle_since + self.expiry_seconds

    def warn_at(self, warn_share: float) -> float:
        return self.idle_since + warn_share * self.expiry_seconds


class Action(enum.StrEnum):
    NONE = "none"
    WARN = "warn"
    RETIRE = "retire"
    SKIP = "skip"
    CANCEL = "cancel"
    # Internal: the protections ended, so forget the last skip reason (nothing is published).
    RESUME = "resume"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str = ""

    @classmethod
    def none(cls) -> Decision:
        return _NONE


_NONE = Decision(Action.NONE)


def protection_reason(record: Record, protections: Iterable[str]) -> str:
    """Every reason the model may not be retired, sorted and joined ("" when none)."""
    reasons = set(protections)
    if record.pinned:
        reasons.add("pinned by its owner")
    return "; ".join(sorted(reasons))


def decide(record: Record, now: float, protections: Iterable[str] = (), warn_share: float = 0.8) -> Decision:
    """What to do about `record` at `now`; `protections` are the traffic reasons (pinned is read from the record)."""
    if record.retired or not record.known or record.expiry_seconds <= 0:
        return Decision.none()
    reason = protection_reason(record, protections)
    if record.retire_requested_at is not None:
        if reason and reason != record.skip_reason:
            # Protected since the decision: ingest refuses to retire a model in use (the same check,
            # modelcd.store.safety), so the request has ended and the model is kept; stop waiting.
            return Decision(Action.SKIP, reason)
        return Decision.none()  # retirement is under way; ingest will answer with the retired state
    idle = now - record.idle_since
    warn_after = warn_share * record.expiry_seconds
    if reason:
        # Only a model that would otherwise be acted on is worth a "skipped" event.
        due = record.warned_at is not None or idle >= warn_after
        if due and reason != record.skip_reason:
            return Decision(Action.SKIP, reason)
        return Decision.none()
    if record.skip_reason:
        return Decision(Action.RESUME)
    if record.warned_at is not None:
        # Used since the warning (or a late report shows it was not idle after all).
        if record.last_used > record.warned_at or idle < warn_after:
            return Decision(Action.CANCEL, "used after the warning")
        if idle >= record.expiry_seconds:
            return Decision(Action.RETIRE, f"unused for {idle:.0f}s, expiry {record.expiry_seconds}s")
        return Decision.none()
    if idle >= warn_after:
        return Decision(Action.WARN, f"unused for {idle:.0f}s of its {record.expiry_seconds}s expiry")
    return Decision.none()


def apply(record: Record, decision: Decision, now: float) -> Record:
    """The record after `decision` was carried out."""
    match decision.action:
        case Action.WARN:
            return msgspec.structs.replace(record, warned_at=now)
        case Action.CANCEL:
            return msgspec.structs.replace(record, warned_at=None)
        case Action.RETIRE:
            return msgspec.structs.replace(record, retire_requested_at=now)
        case Action.SKIP:
            return msgspec.structs.replace(record, skip_reason=decision.reason, retire_requested_at=None)
        case Action.RESUME:
            return msgspec.structs.replace(record, skip_reason="")
        case _:
            return record


# --- folding events into records -------------------------------------------------------------


def on_usage(record: Record | None, report: UsageReport, now: float = 0.0) -> Record:
    """Last use is the latest across all nodes; reports arrive in any order. `now`: when a new record starts
    being tracked (see `tracked_since`)."""
    if record is None:
        return Record(name=report.model, version=report.version, last_used=report.last_used, tracked_since=now)
    if report.last_used <= record.last_used:
        return record
    return msgspec.structs.replace(record, last_used=report.last_used)


def on_state(record: Record | None, state: ModelState, now: float = 0.0, last_used: float = 0.0) -> Record:
    """Fold a ModelState in; a new deployment of the same version starts a fresh idle spell. `now`: when a
    new record starts being tracked (see `tracked_since`); `last_used`: the last use remembered in the store
    for a new record (the table that knew it was lost with the broker)."""
    deployed_at = state.deployed_at or state.at
    base = record or Record(name=state.name, version=state.version, tracked_since=now, last_used=last_used)
    fresh = record is None or (record.retired and state.target == "serving") or (
        record.known and deployed_at != record.deployed_at)
    return msgspec.structs.replace(
        base,
        owner=state.owner,
        deployed_at=deployed_at,
        expiry_seconds=max(min(state.expiry_seconds, MAX_EXPIRY_SECONDS), 0),
        pinned=state.pinned,
        retired=state.target == "retired",
        known=True,
        warned_at=None if fresh else base.warned_at,
        skip_reason="" if fresh else base.skip_reason,
        retire_requested_at=None if fresh else base.retire_requested_at,
    )


# --- traffic → protections --------------------------------------------------------------------


class EndpointView(msgspec.Struct, frozen=True, kw_only=True):
    """One endpoint's routes and rollouts in progress, folded from `modelcd.traffic`."""

    endpoint: str
    weights: dict[str, float] = {}  # "name:version" -> weight (percent)
    rollouts: dict[str, list[str]] = {}  # rollout id -> the models it moves traffic between
    shadows: dict[str, list[str]] = {}  # shadow "name:version" -> the primaries it shadows here


def on_traffic(view: EndpointView | None, event: TrafficPolicy | RolloutStep) -> EndpointView:
    match event:
        case TrafficPolicy(endpoint=endpoint, deleted=True):
            rollouts = view.rollouts if view else {}
            return EndpointView(endpoint=endpoint, rollouts=rollouts)
        case TrafficPolicy(endpoint=endpoint, routes=routes, shadows=relations):
            weights = {f"{r.model}:{r.version}": r.weight for r in routes}
            shadows: dict[str, list[str]] = {}
            for rel in relations:
                shadows.setdefault(rel.shadow, []).append(rel.primary)
            return EndpointView(endpoint=endpoint, weights=weights, rollouts=view.rollouts if view else {},
                                shadows={k: sorted(v) for k, v in shadows.items()})
        case RolloutStep(endpoint=endpoint, rollout_id=rid, action=action):
            rollouts = dict(view.rollouts) if view else {}
            if action in ROLLOUT_ENDED:
                rollouts.pop(rid, None)
            else:
                rollouts[rid] = sorted({m for m in (event.canary, event.baseline) if m}
                                       | set(rollouts.get(rid, [])))
            return EndpointView(endpoint=endpoint, weights=view.weights if view else {}, rollouts=rollouts,
                                shadows=view.shadows if view else {})
    raise TypeError(f"not a traffic event: {event!r}")  # pragma: no cover


def endpoint_protections(view: EndpointView | None) -> dict[str, list[str]]:
    """{"name:version" (or "name:*" for a bare model name): reasons} this endpoint protects.

    The same check as a retire by hand (`modelcd.store.safety.endpoint_uses`), so the processor
    keeps exactly what `modelcd retire` refuses to retire, with the same words.
    """
    if view is None:
        return {}
    uses = endpoint_uses(view.endpoint, view.weights, view.shadows, view.rollouts)
    return {k: sorted({u.what for u in v}) for k, v in uses.items()}


def changed_protections(before: Mapping[str, list[str]], after: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The models whose reasons from one endpoint changed, with their new reasons ([] = none left)."""
    return {k: list(after.get(k, [])) for k in set(before) | set(after) if before.get(k) != after.get(k)}


def time_to_retirement(record: Record, now: float) -> float:
    """Seconds until `record` would be retired if it stays unused (negative: overdue)."""
    return record.retire_at - now
