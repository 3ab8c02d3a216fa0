"""Gradual rollout: plans, the pure rollout state machine, and the controller's entry point.

Invariants:
- A rollout is the fold of its facts (`RolloutStep`, `command=False`) in topic order: `apply`
  is the only thing that changes a `Rollout`, both live and on replay, so a restarted
  controller is at the same step as the one that stopped — no step skipped or repeated.
- Decisions are pure: `on_command` and `on_analysis` take the state, the input and `now`, and
  return the facts to publish; the service publishes them, then applies them.
- Operators' commands (`command=True`) are requests. Each accepted command is answered by a
  fact carrying its `command_id`; a command is applied at most once.
- The traffic policy is derived from the state (`policy_for`): the canary gets the step's
  weight, the baseline routes share the rest in their original proportions; rollback and
  abort restore the original routes; completion leaves the canary alone at 100 %.

Transitions (phase after the fact):

    start ─▶ running ─┬─ promote (next step) ─▶ running ... ─ promote to 100 % ─▶ complete
                      ├─ hold (inconclusive) ─▶ running (same step, window goes on)
                      ├─ abort (still inconclusive after the plan's max_hold) ─▶ aborted
                      ├─ rollback (a check failed) ─▶ rolled_back
                      ├─ pause ─▶ paused ─ resume ─▶ running (the step's timer restarts)
                      ├─ abort (operator) ─▶ aborted          (from running or paused)
                      └─ promote-now (operator "promote") ─▶ complete
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgspec

from modelcd import units
from modelcd.events.schemas import (
    AnalysisThresholds, Route, RolloutPlan, RolloutStep, ShadowRelation, TrafficPolicy, new_id,
)

from .analysis import Analysis, Verdict

if TYPE_CHECKING:
    pass


class RolloutError(ValueError):
    """A plan or command that cannot be applied; the message says what to change."""


# --- plans --------------------------------------------------------------------------------------

PLANS: dict[str, RolloutPlan] = {
    # Slow and careful: four steps, ten minutes of evidence each.
    "standard": RolloutPlan(name="standard", steps=[1.0, 10.0, 50.0, 100.0], interval_s=600.0, max_hold_s=3600.0),
    # A hot fix: two steps, two minutes each, and smaller sample minimums (the old model is the bug).
    "fast": RolloutPlan(name="fast", steps=[10.0, 100.0], interval_s=120.0, max_hold_s=1800.0,
                        thresholds=AnalysisThresholds(min_requests=30, min_latency_samples=30,
                                                      min_divergence_samples=100, max_error_rate_increase=0.05)),
    # Blue-green: the canary shadows the baseline (0 %, paired samples) and then takes all traffic.
    "blue-green": RolloutPlan(name="blue-green", steps=[0.0, 100.0], interval_s=600.0, max_hold_s=3600.0,
                              shadow_first=True),
}

def parse_duration(text: str) -> float:
    """'10m' / '90s' / '1.5h' / '500ms' / '30' (seconds) → seconds (the grammar of modelcd.units)."""
    try:
        return units.parse_duration(text)
    except units.UnitError as exc:
        raise RolloutError(str(exc)) from None


def parse_steps(text: str) -> list[float]:
    """'1,10,50,100' → [1.0, 10.0, 50.0, 100.0]."""
    try:
        return [float(s.strip().rstrip("%")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RolloutError(f"not a list of percentages: {text!r} (use e.g. 1,10,50,100)") from None


def make_plan(name: str = "standard", *, steps: Sequence[float] | None = None, interval_s: float | None = None,
              log_rate: float | None = None, max_hold_s: float | None = None, **thresholds: Any) -> RolloutPlan:
    """A named plan with overrides; raises RolloutError when the result is not a valid plan."""
    if name not in PLANS:
        raise RolloutError(f"unknown plan {name!r}; plans: {', '.join(PLANS)}")
    base = PLANS[name]
    t = base.thresholds
    overrides = {k: v for k, v in thresholds.items() if v is not None}
    if overrides:
        try:
            t = msgspec.structs.replace(t, **overrides)
        except TypeError as exc:
            raise RolloutError(str(exc)) from None
    plan = msgspec.structs.replace(base, thresholds=t,
                                   steps=list(steps) if steps is not None else list(base.steps),
                                   interval_s=base.interval_s if interval_s is None else interval_s,
                                   log_rate=base.log_rate if log_rate is None else log_rate,
                                   max_hold_s=base.max_hold_s if max_hold_s is None else max_hold_s)
    validate_plan(plan)
    return plan


def validate_plan(plan: RolloutPlan) -> None:
    s = plan.steps
    if len(s) < 2:
        raise RolloutError("a plan needs at least two steps, the last one 100 (e.g. 1,10,50,100): "
                           "the analysis compares the canary with a baseline that still serves")
    if any(not 0.0 <= w <= 100.0 for w in s) or any(b <= a for a, b in zip(s, s[1:], strict=False)):
        raise RolloutError(f"steps must increase strictly within 0..100: {s}")
    if s[-1] != 100.0:
        raise RolloutError(f"the last step must be 100: {s}")
    if s[0] == 0.0 and not plan.shadow_first:
        raise RolloutError("a first step of 0 % only makes sense with analysis on shadow traffic (blue-green)")
    if not plan.interval_s > 0 or not math.isfinite(plan.interval_s):
        raise RolloutError(f"the interval must be positive: {plan.interval_s}")
    if not 0.0 <= plan.log_rate <= 1.0:
        raise RolloutError(f"the log rate is a share of requests, 0..1: {plan.log_rate}")
    if not plan.max_hold_s > 0 or not math.isfinite(plan.max_hold_s):
        raise RolloutError(f"max_hold must be a positive duration (e.g. 30m): {plan.max_hold_s}")
    _check_thresholds(plan.thresholds)


_SHARES = ("max_error_rate", "max_error_rate_increase", "max_client_error_increase", "min_agreement",
           "min_label_overlap", "max_ks_statistic")
_COUNTS = ("min_requests", "min_latency_samples", "min_divergence_samples")


def _check_thresholds(t: AnalysisThresholds) -> None:
    """Bounds that can decide: a NaN bound never fails nor passes (every step holds until max_hold), a share
    above 1 or below 0 always fails or always passes, a count below 1 judges on no evidence."""
    bad = [f"{k}={getattr(t, k)} (a share, 0..1)" for k in _SHARES if not 0.0 <= getattr(t, k) <= 1.0]
    bad += [f"{k}={getattr(t, k)} (at least 1)" for k in _COUNTS if getattr(t, k) < 1]
    if not 0.0 < t.confidence < 1.0:
        bad.append(f"confidence={t.confidence} (between 0 and 1, e.g. 0.95)")
    if not (0.0 <= t.max_mean_shift and math.isfinite(t.max_mean_shift)):
        bad.append(f"max_mean_shift={t.max_mean_shift} (standard deviations, 0 or more)")
    for k in ("max_latency_p50_ms", "max_latency_p99_ms"):
        v = getattr(t, k)
        if v is not None and not (v > 0 and math.isfinite(v)):
            bad.append(f"{k}={v} (milliseconds, above 0)")
    if bad:
        raise RolloutError("analysis thresholds out of range: " + "; ".join(bad))


# --- state --------------------------------------------------------------------------------------


class Phase(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


ACTIVE = (Phase.RUNNING, Phase.PAUSED)


@dataclass
class Rollout:
    """One rollout of one endpoint, as its facts made it."""

    endpoint: str
    rollout_id: str
    canary: str  # name:version
    baseline: str  # name:version of the largest baseline route: the arm the canary is judged against
    plan: RolloutPlan
    baseline_routes: list[Route]
    started_at: float
    phase: Phase = Phase.RUNNING
    step: int = 0
    weight: float = 0.0
    window_start: float = 0.0  # evidence of the current step counts from here
    hold_from: float = 0.0  # the step's max_hold counts from here (its start, or the last resume)
    due_at: float | None = None  # next analysis (None: paused or finished)
    history: list[RolloutStep] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)  # command ids answered

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    @property
    def hold_deadline(self) -> float:
        """When the current step, still without a verdict, ends the rollout (max_hold)."""
        return self.hold_from + self.plan.max_hold_s

    def next_due(self, at: float) -> float:
        """The next analysis after `at`: an interval later, but never past the hold deadline."""
        return max(at, min(at + self.plan.interval_s, self.hold_deadline))

    @property
    def last_evidence(self) -> dict[str, Any]:
        for ev in reversed(self.history):
            if ev.evidence:
                return ev.evidence
        return {}


def apply(rollout: Rollout | None, fact: RolloutStep) -> Rollout | None:
    """Fold one fact into the endpoint's rollout (the only state transition there is)."""
    if fact.command:
        return rollout
    if fact.action == "start":
        if fact.plan is None:  # a start without a plan cannot be followed; keep what we had
            return rollout
        r = Rollout(endpoint=fact.endpoint, rollout_id=fact.rollout_id, canary=fact.canary,
                    baseline=fact.baseline, plan=fact.plan, baseline_routes=list(fact.baseline_routes),
                    started_at=fact.at, step=fact.step, weight=fact.weight, window_start=fact.at,
                    hold_from=fact.at)
        r.due_at = r.next_due(fact.at)
    elif rollout is None or rollout.rollout_id != fact.rollout_id or not rollout.active:
        return rollout  # a fact of a rollout we do not follow (older, or already finished)
    else:
        r = rollout
        match fact.action:
            case "promote":
                r.step, r.weight, r.window_start, r.hold_from = fact.step, fact.weight, fact.at, fact.at
                r.due_at = r.next_due(fact.at)
            case "hold":
                r.due_at = r.next_due(fact.at)
            case "pause":
                r.phase, r.due_at = Phase.PAUSED, None
            case "resume":
                r.phase, r.hold_from = Phase.RUNNING, fact.at
                r.due_at = r.next_due(fact.at)
            case "rollback":
                r.phase, r.weight, r.due_at = Phase.ROLLED_BACK, 0.0, None
            case "abort":
                r.phase, r.weight, r.due_at = Phase.ABORTED, 0.0, None
            case "complete":
                r.phase, r.step, r.weight, r.due_at = Phase.COMPLETED, fact.step, 100.0, None
    r.history.append(fact)
    if fact.command_id:
        r.acked.add(fact.command_id)
    return r


def fold(events: Sequence[RolloutStep]) -> dict[str, Rollout]:
    """Every endpoint's latest rollout from a topic's RolloutStep events in order."""
    out: dict[str, Rollout] = {}
    for ev in events:
        r = apply(out.get(ev.endpoint), ev)
        if r is not None:
            out[ev.endpoint] = r
    return out


def pending_commands(events: Sequence[RolloutStep]) -> list[RolloutStep]:
    """Commands written after their endpoint's last fact and not answered: the ones to apply on start.

    A command before a later fact was seen by the controller that wrote the fact (it consumes
    the endpoint's partition in order), so it was applied or refused then.
    """
    last_fact: dict[str, int] = {}
    for i, ev in enumerate(events):
        if not ev.command:
            last_fact[ev.endpoint] = i
    acked = {ev.command_id for ev in events if not ev.command and ev.command_id}
    return [ev for i, ev in enumerate(events)
            if ev.command and i > last_fact.get(ev.endpoint, -1) and ev.command_id not in acked]


# --- decisions ----------------------------------------------------------------------------------


def key_of(route: Route) -> str:
    return f"{route.model}:{route.version}"


def split_ref(ref: str) -> tuple[str, str]:
    """'name:version' → (name, version); raises RolloutError otherwise."""
    name, sep, version = ref.rpartition(":")
    if not sep or not name or not version:
        raise RolloutError(f"expected MODEL:VERSION, got {ref!r}")
    return name, version


def on_command(rollout: Rollout | None, cmd: RolloutStep, policy: TrafficPolicy | None,
               now: float) -> list[RolloutStep]:
    """The facts answering an operator's command; raises RolloutError when it cannot apply."""
    if rollout is not None and cmd.command_id and cmd.command_id in rollout.acked:
        return []  # already answered (a redelivery)
    base = dict(endpoint=cmd.endpoint, command_id=cmd.command_id, at=now)
    if cmd.action == "start":
        if rollout is not None and rollout.active:
            raise RolloutError(f"endpoint {cmd.endpoint!r} already has rollout {rollout.rollout_id} "
                               f"({rollout.phase}); abort it first")
        plan = cmd.plan or PLANS["standard"]
        validate_plan(plan)
        split_ref(cmd.canary)
        routes = [r for r in (policy.routes if policy and not policy.deleted else []) if r.weight > 0]
        baseline_routes = [r for r in routes if key_of(r) != cmd.canary]
        if not baseline_routes:
            raise RolloutError(f"endpoint {cmd.endpoint!r} has no baseline to roll out against: "
                               f"set its traffic first (modelcd traffic set {cmd.endpoint} MODEL:VERSION=100)")
        baseline = key_of(max(baseline_routes, key=lambda r: r.weight))
        return [RolloutStep(**base, rollout_id=cmd.rollout_id or new_id(), action="start", step=0,
                            weight=plan.steps[0], canary=cmd.canary, baseline=baseline, plan=plan,
                            baseline_routes=baseline_routes, reason=cmd.reason or "started by operator")]
    if rollout is None or not rollout.active:
        raise RolloutError(f"endpoint {cmd.endpoint!r} has no rollout in progress")
    if cmd.rollout_id and cmd.rollout_id != rollout.rollout_id:
        raise RolloutError(f"command for rollout {cmd.rollout_id}, but {rollout.rollout_id} is in progress")
    ids = dict(rollout_id=rollout.rollout_id, canary=rollout.canary, baseline=rollout.baseline)
    reason = cmd.reason or f"{cmd.action} by operator"
    match cmd.action:
        case "pause":
            if rollout.phase is Phase.PAUSED:
                raise RolloutError("the rollout is already paused")
            return [RolloutStep(**base, **ids, action="pause", step=rollout.step, weight=rollout.weight,
                                reason=reason)]
        case "resume":
            if rollout.phase is not Phase.PAUSED:
                raise RolloutError("the rollout is not paused")
            return [RolloutStep(**base, **ids, action="resume", step=rollout.step, weight=rollout.weight,
                                reason=reason)]
        case "abort":
            return [RolloutStep(**base, **ids, action="abort", step=rollout.step, weight=0.0, reason=reason)]
        case "promote":  # promote-now: straight to 100 %, no more analysis
            last = len(rollout.plan.steps) - 1
            return [
                RolloutStep(**base, **ids, action="promote", step=last, weight=100.0, reason=reason),
                RolloutStep(**base, **ids, action="complete", step=last, weight=100.0, reason=reason,
                            evidence={"summary": summary(rollout)}),
            ]
    raise RolloutError(f"{cmd.action!r} is not a command (use start, pause, resume, abort or promote)")


def due(rollout: Rollout, now: float) -> bool:
    return rollout.phase is Phase.RUNNING and rollout.due_at is not None and now >= rollout.due_at


def on_analysis(rollout: Rollout, analysis: Analysis, now: float) -> list[RolloutStep]:
    """The facts that follow one analysis of the current step's window (none once the rollout ended)."""
    if rollout.phase is not Phase.RUNNING:
        return []  # an analysis that finished after a pause, abort or the last step decides nothing
    ids = dict(endpoint=rollout.endpoint, rollout_id=rollout.rollout_id, canary=rollout.canary,
               baseline=rollout.baseline, at=now)
    evidence = {**analysis.evidence(), "analyzed_step": rollout.step, "analyzed_weight": rollout.weight}
    match analysis.verdict:
        case Verdict.ROLLBACK:
            return [RolloutStep(**ids, action="rollback", step=rollout.step, weight=0.0, evidence=evidence,
                                reason=analysis.reason)]
        case Verdict.HOLD if now >= rollout.hold_deadline - 1e-6:
            held = _duration(now - rollout.hold_from)
            evidence["outcome"] = "max_hold"
            return [RolloutStep(**ids, action="abort", step=rollout.step, weight=0.0, evidence=evidence,
                                reason=f"no verdict within max_hold {_duration(rollout.plan.max_hold_s)} at step "
                                       f"{rollout.step + 1} of {len(rollout.plan.steps)} ({rollout.weight:g}%, held "
                                       f"{held}): {analysis.reason}")]
        case Verdict.HOLD:
            return [RolloutStep(**ids, action="hold", step=rollout.step, weight=rollout.weight, evidence=evidence,
                                reason=analysis.reason)]
    nxt = rollout.step + 1
    weight = rollout.plan.steps[nxt]
    facts = [RolloutStep(**ids, action="promote", step=nxt, weight=weight, evidence=evidence,
                         reason=f"{analysis.reason}: {rollout.weight:g}% → {weight:g}%")]
    if weight >= 100.0:
        # 100 % leaves no baseline to compare with: the last step completes the rollout at once.
        done = replace_history(rollout, facts[0])
        facts.append(RolloutStep(**ids, action="complete", step=nxt, weight=100.0,
                                 reason=f"{rollout.canary} serves 100%", evidence={"summary": summary(done)}))
    return facts


def _duration(seconds: float) -> str:
    """90 → '1m30s', 1800 → '30m', 7200 → '2h'."""
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def replace_history(rollout: Rollout, *extra: RolloutStep) -> Rollout:
    return replace(rollout, history=[*rollout.history, *extra])


# --- traffic ------------------------------------------------------------------------------------


def weighted_routes(rollout: Rollout) -> list[Route]:
    """The routes the rollout's current state asks for."""
    if rollout.phase is Phase.COMPLETED:
        name, version = split_ref(rollout.canary)
        return [Route(model=name, version=version, weight=100.0)]
    if rollout.phase in (Phase.ROLLED_BACK, Phase.ABORTED):
        return list(rollout.baseline_routes)
    w = rollout.weight
    total = sum(r.weight for r in rollout.baseline_routes) or 1.0
    # While it runs, both arms log at the plan's rate: the divergence checks compare their outputs.
    rate = rollout.plan.log_rate
    routes = [Route(model=r.model, version=r.version, log_rate=rate,
                    weight=round(r.weight / total * (100.0 - w), 6)) for r in rollout.baseline_routes]
    if w > 0:
        name, version = split_ref(rollout.canary)
        routes.insert(0, Route(model=name, version=version, weight=w, log_rate=rate))
    return [r for r in routes if r.weight > 0]


def policy_for(rollout: Rollout, current: TrafficPolicy | None) -> TrafficPolicy:
    """The endpoint's policy for the rollout's state; other settings (sticky key, shadows) kept.

    The endpoint's own shadow relations stay, also one whose shadow is the canary: while the
    canary serves, a node never shadows a model with itself, and the baseline's requests it
    shadows are paired evidence; after a rollback it goes on evaluating the canary as before.
    """
    own = blue_green_relation(rollout)
    shadows = [s for s in (current.shadows if current else []) if s != own]
    if rollout.plan.shadow_first and rollout.active and rollout.weight == 0:
        # Blue-green's first step: every baseline request is also answered by the canary, off the path.
        shadows.append(own)
    action = rollout.history[-1].action if rollout.history else "start"
    return TrafficPolicy(
        endpoint=rollout.endpoint,
        routes=weighted_routes(rollout),
        sticky_key=current.sticky_key if current else "x-modelcd-key",
        shadows=shadows,
        revision=(current.revision if current else 0) + 1,
        reason=f"rollout {rollout.rollout_id} {action}: {rollout.canary} at {rollout.weight:g}%",
    )


def blue_green_relation(rollout: Rollout) -> ShadowRelation:
    """The relation blue-green's first step adds (and the following steps remove)."""
    return ShadowRelation(primary=rollout.baseline, shadow=rollout.canary, start=rollout.started_at, sample_rate=1.0)


def same_traffic(a: TrafficPolicy | None, b: TrafficPolicy) -> bool:
    """Equal routes and shadows (revision, reason and time aside): nothing to republish."""
    if a is None or a.deleted:
        return False
    return (sorted((key_of(r), round(r.weight, 4), r.log_rate or 0.0) for r in a.routes)
            == sorted((key_of(r), round(r.weight, 4), r.log_rate or 0.0) for r in b.routes)
            and a.shadows == b.shadows and a.sticky_key == b.sticky_key)


# --- reporting ----------------------------------------------------------------------------------


ANALYSIS_ACTIONS = ("promote", "hold", "rollback", "abort")
DIVERGENCE_CHECKS = ("agreement", "label_overlap", "ks_distance", "mean_shift")


def analysed_at(rollout: Rollout, fact: RolloutStep) -> tuple[int, float]:
    """(step, weight) whose evidence an analysis fact judged (older facts lack `analyzed_step`)."""
    ev = fact.evidence
    if "analyzed_step" in ev:
        return int(ev["analyzed_step"]), float(ev["analyzed_weight"])
    step = fact.step - 1 if fact.action == "promote" else fact.step
    step = max(0, min(step, len(rollout.plan.steps) - 1))
    return step, rollout.plan.steps[step]


def deciding_checks(fact: RolloutStep) -> list[dict[str, Any]]:
    """The checks that made an analysis decide what it did: the failing ones for a rollback, the
    inconclusive ones for a hold or a max_hold abort, the passing ones for a promote."""
    want = {"rollback": "fail", "hold": "inconclusive", "abort": "inconclusive", "promote": "pass"}[fact.action]
    return [{k: c[k] for k in ("name", "status", "value", "detail") if k in c}
            for c in fact.evidence.get("checks", []) if c.get("status") == want]


def summary(rollout: Rollout) -> dict[str, Any]:
    """The launch summary: what each step's analysis decided, on which checks, with which figures.

    One row per step analysed: its last analysis (a step's window grows until it is decided, so
    the last one holds all of the step's evidence), with the number of holds before it. Totals
    add the rows up, so no request is counted twice.
    """
    rows: list[dict[str, Any]] = []
    n_steps = len(rollout.plan.steps)
    for ev in rollout.history:
        if ev.action not in ANALYSIS_ACTIONS or not ev.evidence.get("checks"):
            continue
        step, weight = analysed_at(rollout, ev)
        row: dict[str, Any] = {"action": ev.action, "step": step, "steps": n_steps, "weight": weight, "at": ev.at,
                               "holds": 0, "decided_by": deciding_checks(ev), "reason": ev.reason}
        if ev.evidence.get("outcome"):
            row["outcome"] = ev.evidence["outcome"]
        for arm in ("canary", "baseline"):
            fig = ev.evidence.get(arm, {})
            row[arm] = {k: fig.get(k) for k in ("requests", "errors", "client_errors", "error_rate",
                                                  "latency_p50_ms", "latency_p99_ms") if fig.get(k) is not None}
        div = [c for c in ev.evidence["checks"] if c["name"] in DIVERGENCE_CHECKS and c.get("value") is not None]
        if div:
            row["divergence"] = {c["name"]: c["value"] for c in div}
        if rows and rows[-1]["step"] == step and rows[-1]["action"] == "hold":
            row["holds"] = rows[-1]["holds"] + 1
            rows[-1] = row
        else:
            rows.append(row)
    totals: dict[str, dict[str, Any]] = {}
    for arm in ("canary", "baseline"):
        t = totals[arm] = {k: sum(int(r[arm].get(k) or 0) for r in rows)
                           for k in ("requests", "errors", "client_errors")}
        t["error_rate"] = round(t["errors"] / t["requests"], 6) if t["requests"] else None
        p99 = [float(r[arm]["latency_p99_ms"]) for r in rows if r[arm].get("latency_p99_ms") is not None]
        if p99:
            t["worst_latency_p99_ms"] = max(p99)
    out: dict[str, Any] = {"canary": rollout.canary, "baseline": rollout.baseline, "plan": rollout.plan.name,
                           "started_at": rollout.started_at, "steps": rows, "totals": totals}
    last = rollout.history[-1] if rollout.history else None
    if last is not None and not rollout.active:
        out["outcome"] = {"phase": str(rollout.phase), "action": last.action, "reason": last.reason, "at": last.at}
    return out
