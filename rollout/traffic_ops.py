"""Traffic and rollout operations shared by the CLI and the deployment API.

Each function takes what the traffic topic says about an endpoint (an `EndpointView`) and the
operator's request, checks it, and returns the event to publish; none does I/O, so the CLI
(`modelcd traffic|rollout`) and the HTTP API (`/endpoints/...`) refuse the same things with the
same reasons. `TrafficError.kind` says which HTTP status a refusal maps to.

Every operation that changes what serves passes the store's safety check (`modelcd.store.safety`)
with the `World` the caller read: the versions a policy names must be deployed and serving, and an
endpoint a rollout drives is not deleted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from modelcd.events.bus import KafkaConfig, read_topic
from modelcd.events.schemas import RolloutPlan, RolloutStep, Route, TrafficPolicy, new_id
from modelcd.events.topics import TRAFFIC
from modelcd.store.safety import (
    ActiveRollout,
    Unsafe,
    World,
    check_endpoint_delete,
    check_serving,
    endpoint_name_problem,
)

from .analysis import time_to_verdict
from .machine import Rollout, RolloutError, apply, split_ref, summary

Kind = Literal["invalid", "conflict", "not_found"]


class TrafficError(ValueError):
    def __init__(self, message: str, kind: Kind = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class EndpointView:
    """What the traffic topic says about one endpoint: its last policy and its rollout, if any."""

    def __init__(self, endpoint: str, events: Iterable[Any]) -> None:
        self.endpoint = endpoint
        self.policy: TrafficPolicy | None = None
        self.rollout: Rollout | None = None
        self.steps: list[RolloutStep] = []
        for event in events:
            if getattr(event, "endpoint", None) != endpoint:
                continue
            if isinstance(event, TrafficPolicy):
                self.policy = event
            elif isinstance(event, RolloutStep):
                self.steps.append(event)
                self.rollout = apply(self.rollout, event)


async def load_view(cfg: KafkaConfig, endpoint: str, targets: Any = None) -> EndpointView:
    """The endpoint as the traffic topic has it, merged with the store's (`targets`: a `TargetState`) when given:
    the one reader of an endpoint's policy and rollout for the CLI and the API (docs/ARCHITECTURE.md, "Durable
    state")."""
    view = EndpointView(endpoint, [e for e, _env, _r in await read_topic(cfg, TRAFFIC)])
    if targets is not None:
        with_store(view, await targets.get_traffic(endpoint), await targets.get_rollout(endpoint))
    return view


def with_store(view: EndpointView, policy: TrafficPolicy | None, facts: Sequence[RolloutStep]) -> EndpointView:
    """Fill in what a short topic lost (a broker restarted empty, retention, compaction) from the store: its
    policy when the topic has none or a lower revision; its rollout's facts when the topic holds none of that
    rollout (and no later one) or fewer of them. What the topic has newer wins."""
    if policy is not None and (view.policy is None or view.policy.revision < policy.revision):
        view.policy = policy
    if facts:
        r = view.rollout
        stored_id, started = facts[0].rollout_id, facts[0].at
        if r is None or (r.rollout_id == stored_id and len(r.history) < len(facts)) or (
                r.rollout_id != stored_id and r.started_at < started):
            rollout = None
            for fact in facts:
                rollout = apply(rollout, fact)
            view.rollout = rollout
            view.steps = [*facts, *(s for s in view.steps if s not in facts)]
    return view


def check_routes(routes: Sequence[Route]) -> None:
    """Weights are percentages adding up to 100, each model:version once, log rates shares."""
    if not routes:
        raise TrafficError("a policy needs at least one route (MODEL:VERSION=WEIGHT)")
    for r in routes:
        try:
            split_ref(f"{r.model}:{r.version}")
        except RolloutError as exc:
            raise TrafficError(str(exc)) from None
        if not math.isfinite(r.weight):  # NaN passes every comparison: the sum check below would wave it through
            raise TrafficError(f"a weight is a number of percent: {r.model}:{r.version}={r.weight}")
        if r.weight < 0:
            raise TrafficError(f"weights cannot be negative: {r.model}:{r.version}={r.weight:g}")
        if r.log_rate is not None and not 0.0 <= r.log_rate <= 1.0:
            raise TrafficError(f"log_rate of {r.model}:{r.version} is a share of requests, 0..1: {r.log_rate}")
    refs = [f"{r.model}:{r.version}" for r in routes]
    if len(set(refs)) != len(refs):
        raise TrafficError("each MODEL:VERSION may appear once")
    total = sum(r.weight for r in routes)
    if abs(total - 100.0) > 0.01:
        raise TrafficError(f"weights add up to {total:g}, not 100")


def check_endpoint_name(endpoint: str) -> None:
    """An endpoint a policy may name (a store key part, a Kafka key, a URL segment); TrafficError otherwise."""
    if (problem := endpoint_name_problem(endpoint)) is not None:
        raise TrafficError(problem)


def _safe(exc: Unsafe) -> TrafficError:
    return TrafficError(str(exc), exc.kind)


def set_policy(view: EndpointView, routes: Sequence[Route], *, world: World, sticky_key: str | None,
               force: bool = False, reason: str = "set by operator") -> TrafficPolicy:
    """The endpoint's next policy: new routes (each deployed and serving), its shadows kept, the revision bumped.

    `force` overrides only a rollout in progress (whose next step will set the weights again); a
    route to a version that does not serve is never accepted: every request it gets would fail.
    """
    check_endpoint_name(view.endpoint)
    check_routes(routes)
    try:
        check_serving([f"{x.model}:{x.version}" for x in routes], world, role="route")
    except Unsafe as exc:
        raise _safe(exc) from None
    r = view.rollout
    if r is not None and r.active and not force:
        raise TrafficError(f"rollout {r.rollout_id} drives {view.endpoint!r}: abort it first "
                           f"(modelcd rollout abort {view.endpoint}) or force", "conflict")
    old = view.policy
    return TrafficPolicy(endpoint=view.endpoint, routes=list(routes), sticky_key=sticky_key or None,
                         shadows=old.shadows if old else [], revision=(old.revision if old else 0) + 1,
                         reason=reason)


def start_command(view: EndpointView, canary: str, plan: RolloutPlan, *, world: World,
                  reason: str) -> RolloutStep:
    """The command that asks the controller to start rolling `canary` (deployed and serving) out on the endpoint."""
    check_endpoint_name(view.endpoint)
    try:
        split_ref(canary)
    except RolloutError as exc:
        raise TrafficError(str(exc)) from None
    try:
        check_serving([canary], world, role="canary")
    except Unsafe as exc:
        raise _safe(exc) from None
    r = view.rollout
    if r is not None and r.active:
        raise TrafficError(f"{view.endpoint!r} already has rollout {r.rollout_id} ({r.phase}): abort it first",
                           "conflict")
    if view.policy is None or not [x for x in view.policy.routes if x.weight > 0]:
        raise TrafficError(f"{view.endpoint!r} has no traffic to roll out against: set its policy first "
                           f"(modelcd traffic set {view.endpoint} MODEL:VERSION=100)", "not_found")
    return RolloutStep(endpoint=view.endpoint, rollout_id=new_id(), action="start", canary=canary, plan=plan,
                       command=True, command_id=new_id(), reason=reason)


def delete_policy(view: EndpointView, *, reason: str = "deleted by operator") -> TrafficPolicy:
    """The endpoint's tombstone (`deleted=True`): its routes and shadows go; refused while a rollout drives it."""
    r = view.rollout
    rollouts = {view.endpoint: ActiveRollout(endpoint=view.endpoint, rollout_id=r.rollout_id, canary=r.canary,
                                             baseline=r.baseline, models=frozenset({r.canary, r.baseline}))
                } if r is not None and r.active else {}
    try:
        policy = check_endpoint_delete(view.endpoint, World(policies={view.endpoint: view.policy}
                                                            if view.policy else {}, rollouts=rollouts))
    except Unsafe as exc:
        raise _safe(exc) from None
    return TrafficPolicy(endpoint=view.endpoint, routes=[], sticky_key=policy.sticky_key, shadows=[],
                         revision=policy.revision + 1, deleted=True, reason=reason)


def control_command(view: EndpointView, action: str, *, reason: str) -> RolloutStep:
    """pause / resume / abort / promote of the endpoint's rollout in progress."""
    if action not in ("pause", "resume", "abort", "promote"):
        raise TrafficError(f"unknown rollout action {action!r}: pause, resume, abort or promote", "not_found")
    r = view.rollout
    if r is None:
        raise TrafficError(f"{view.endpoint!r} has no rollout in progress (none on record)", "not_found")
    if not r.active:
        raise TrafficError(f"{view.endpoint!r} has no rollout in progress (rollout {r.rollout_id} is {r.phase})",
                           "conflict")
    return RolloutStep(endpoint=view.endpoint, rollout_id=r.rollout_id, action=action,  # type: ignore[arg-type]
                       canary=r.canary, command=True, command_id=new_id(), reason=reason)


def status_dict(r: Rollout) -> dict[str, Any]:
    return {
        "endpoint": r.endpoint, "rollout_id": r.rollout_id, "phase": str(r.phase), "canary": r.canary,
        "baseline": r.baseline, "step": r.step, "steps": r.plan.steps, "weight": r.weight,
        "plan": msgspec.to_builtins(r.plan), "next_analysis_at": r.due_at, "last_analysis": r.last_evidence,
        "hold_deadline": r.hold_deadline if r.active else None,
        "time_to_verdict": time_to_verdict(r.last_evidence) if r.active else None,
        "history": [msgspec.to_builtins(s) for s in r.history],
        "summary": summary(r),
    }
