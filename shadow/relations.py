"""Editing the shadow relations of a TrafficPolicy, and parsing what a user types: pure.

Used by `modelcd shadow add|remove` and the deployment API's `/endpoints/{e}/shadows`: every edit returns a
new policy with `revision + 1`, so the last write per endpoint wins on the traffic topic. A relation
added passes the store's safety check (`modelcd.store.safety.check_serving`): its shadow, and its
primary, are deployed and serving.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec

from modelcd import units
from modelcd.events.schemas import Criterion, ShadowRelation, TrafficPolicy
from modelcd.store.safety import Unsafe, World, check_serving, endpoint_name_problem

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Longest operators first, so `>=` is not read as `>`.
_WHERE = re.compile(r"^(?P<field>(?:header|param|input):[^=!<>\s]+)\s*(?P<op>!=|>=|<=|=|>|<|\s+in\s+|\s+exists$)"
                    r"\s*(?P<value>.*)$", re.IGNORECASE)
_OPS = {"=": "eq", "!=": "ne", ">": "gt", ">=": "ge", "<": "lt", "<=": "le", "in": "in", "exists": "exists"}


class RelationError(ValueError):
    """What the user typed cannot be a shadow relation; the message says what to type instead.

    `kind` maps to an HTTP status as rollout's TrafficError does: "invalid" (400), "conflict" (409:
    a version named does not serve)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def parse_time(text: str, now: float) -> float | None:
    """'14d' / '12h' / '30m' (from now), an ISO date or datetime (UTC if no zone), or 'never' -> None."""
    t = text.strip()
    if t.lower() in {"never", "none", ""}:
        return None
    m = _DURATION.match(t)
    if m:
        return now + float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not re.match(r"^\d{4}-\d{2}-\d{2}", t):  # not an ISO date: any duration of modelcd.units (1d12h, 90s)
        try:
            return now + units.parse_duration(t)
        except units.UnitError:
            pass
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise RelationError(f"{text!r} is not a time: use a duration from now (14d, 12h, 30m), "
                            "an ISO date (2030-01-31T12:00) or 'never'") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _value(text: str) -> object:
    """JSON when it parses (numbers, true, "quoted"), else the text itself."""
    try:
        return msgspec.json.decode(text.encode())
    except msgspec.DecodeError:
        return text


def parse_where(text: str) -> Criterion:
    """'header:x-country=DE', 'input:age>=18', 'param:tier in gold,silver', 'header:x-beta exists'."""
    m = _WHERE.match(text.strip())
    if not m:
        raise RelationError(
            f"criterion {text!r}: expected FIELD OP VALUE, FIELD being header:<name>, param:<name> or input:<name> "
            "and OP one of = != > >= < <= 'in' (comma-separated values) 'exists', e.g. input:age>=18")
    op = _OPS[m.group("op").strip().lower()]
    raw = m.group("value").strip()
    if op == "exists":
        return Criterion(field=m.group("field"), op="exists")
    if not raw:
        raise RelationError(f"criterion {text!r}: no value after the operator")
    if op == "in":
        return Criterion(field=m.group("field"), op="in", value=[_value(v.strip()) for v in raw.split(",") if v.strip()])
    value = raw if m.group("field").lower().startswith("header:") else _value(raw)
    return Criterion(field=m.group("field"), op=op, value=value)  # type: ignore[arg-type]


def check_refs(primary: str, shadow: str) -> None:
    if not primary or primary.count(":") > 1:
        raise RelationError(f"primary {primary!r}: expected a model name or name:version")
    name, _, version = shadow.partition(":")
    if not name or not version:
        raise RelationError(f"shadow {shadow!r}: expected name:version (the exact version that shadows)")
    if primary == shadow:
        raise RelationError("a model cannot shadow itself")


def when(value: str | float | None, now: float, default: float | None) -> float | None:
    """A time as the CLI or the API gives it: epoch seconds, text for `parse_time`, or None -> `default`."""
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return parse_time(str(value), now)


def make_relation(primary: str, shadow: str, *, now: float, sample_rate: float = 1.0,
                  start: str | float | None = None, end: str | float | None = "14d",
                  where: Sequence[str] = (), criteria: Sequence[Criterion] = ()) -> ShadowRelation:
    """The relation `modelcd shadow add` and `POST /endpoints/{e}/shadows` describe; `start`
    defaults to now, `end` (None or 'never': no end) to 14 days from now. Checked by `add_relation`."""
    check_refs(primary, shadow)
    return ShadowRelation(primary=primary, shadow=shadow, start=when(start, now, now) or now,
                          end=when(end, now, None), sample_rate=sample_rate,
                          criteria=[*criteria, *(parse_where(w) for w in where)])


def add_relation(policy: TrafficPolicy | None, endpoint: str, relation: ShadowRelation, *,
                 now: float, world: World) -> TrafficPolicy:
    """The policy with `relation` added (replacing one with the same primary and shadow).

    Its shadow must be deployed and serving (else every shadowed request logs an error), and so must
    its primary (a name: one of its versions)."""
    if (problem := endpoint_name_problem(endpoint)) is not None:
        raise RelationError(problem)
    check_refs(relation.primary, relation.shadow)
    if not 0.0 < relation.sample_rate <= 1.0:
        raise RelationError(f"rate {relation.sample_rate}: expected a share in (0, 1], e.g. 0.1 for 10 %")
    if relation.end is not None and relation.end <= relation.start:
        raise RelationError("the end time is not after the start time")
    try:
        check_serving([relation.shadow], world, role="shadow")
        check_serving([relation.primary], world, role="primary")
    except Unsafe as exc:
        raise RelationError(str(exc), exc.kind) from None
    if policy is None or policy.deleted:
        policy = TrafficPolicy(endpoint=endpoint)
    kept = [r for r in policy.shadows if (r.primary, r.shadow) != (relation.primary, relation.shadow)]
    return msgspec.structs.replace(
        policy, shadows=[*kept, relation], revision=policy.revision + 1, deleted=False, at=now,
        reason=f"shadow {relation.shadow} on {relation.primary}")


def remove_relation(policy: TrafficPolicy, primary: str, shadow: str, *, now: float) -> TrafficPolicy | None:
    """The policy without that relation, or None when it has no such relation."""
    kept = [r for r in policy.shadows if (r.primary, r.shadow) != (primary, shadow)]
    if len(kept) == len(policy.shadows):
        return None
    return msgspec.structs.replace(policy, shadows=kept, revision=policy.revision + 1, at=now,
                                   reason=f"shadow {shadow} removed from {primary}")


def describe_criterion(c: Criterion) -> str:
    sym = {v: k for k, v in _OPS.items()}
    if c.op == "exists":
        return f"{c.field} exists"
    if c.op == "in":
        return f"{c.field} in {','.join(str(v) for v in c.value)}"
    return f"{c.field}{sym[c.op]}{c.value}"


def status(rel: ShadowRelation, now: float) -> str:
    if now < rel.start:
        return "scheduled"
    if rel.end is not None and now >= rel.end:
        return "ended"
    return "active"
