"""The one safety check for every action that changes what serves: pure, no I/O, no clock.

Every part that changes what serves asks this module first, with what it knows of the system
(a `World`: the target state's models, each endpoint's policy, the rollouts in progress):

    action                                     check                    who asks
    retire NAME VERSION (CLI, DELETE /models)  `check_retire`           ingest's API, ingest's pipeline
    auto-retirement                            `endpoint_uses` (same)   retirement.policy (protections)
    traffic set / PUT /endpoints/{e}/traffic   `check_serving`          rollout.traffic_ops
    rollout start --to                         `check_serving`          rollout.traffic_ops
    shadow add / POST /endpoints/{e}/shadows   `check_serving`          shadow.relations
    traffic delete / DELETE /endpoints/{e}     `check_endpoint_delete`  rollout.traffic_ops

Invariants:
- a model is *in use* when an endpoint routes to it with weight > 0, a rollout in progress
  moves traffic to or from it, or a shadow relation sends it traffic; `endpoint_uses` is the
  only place that says so, for the manual retire and for the auto-retirement processor alike;
- a refusal (`Unsafe`) names each endpoint, rollout or shadow involved and the command that
  resolves it, and says what `--force` would break where forcing is offered at all;
- a version named in a policy (a route, a rollout's canary, a shadow) must be in the target
  state with target "serving"; the refusal lists the versions of that model that are;
- an endpoint a policy, rollout or shadow names matches `ENDPOINT_NAME` (it becomes a store key
  part, a Kafka key and a URL segment): the API answers 400 for any other name on every route.

The part's shells turn `Unsafe` into their errors: a CLI error (exit 1) or HTTP 409 / 404.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from modelcd.events.schemas import ModelState, RolloutStep, TrafficPolicy

# Rollout facts after which a rollout no longer moves traffic.
ROLLOUT_ENDED = frozenset({"complete", "abort", "rollback"})

Kind = Literal["conflict", "not_found"]


class Unsafe(ValueError):
    """An action refused because it would break live traffic or name what does not serve.

    `kind`: "conflict" (HTTP 409: something in use is in the way, or a version named that does not
    serve) or "not_found" (HTTP 404: no such endpoint). `uses`: what is in the way.
    """

    def __init__(self, message: str, kind: Kind = "conflict", uses: Sequence[Use] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.uses = tuple(uses)


@dataclass(frozen=True)
class Use:
    """One reason a model serves: `what` reads as a sentence after the model, `resolve` is a command."""

    kind: Literal["route", "rollout", "shadow"]
    endpoint: str
    what: str  # "serves 100% of endpoint winep"
    resolve: str  # "modelcd traffic set winep MODEL:VERSION=100"


@dataclass(frozen=True)
class ActiveRollout:
    """A rollout in progress on one endpoint, as its facts on `modelcd.traffic` say."""

    endpoint: str
    rollout_id: str
    canary: str
    baseline: str
    models: frozenset[str]  # canary, baseline and every baseline route


@dataclass
class World:
    """What a check needs to know: the target state and the traffic as the caller could read them."""

    models: Mapping[str, ModelState] = field(default_factory=dict)  # "name:version" -> its target state
    policies: Mapping[str, TrafficPolicy] = field(default_factory=dict)  # endpoint -> its last policy
    rollouts: Mapping[str, ActiveRollout] = field(default_factory=dict)  # endpoint -> rollout in progress


# --- endpoint names -------------------------------------------------------------------------------

# An endpoint's name is a store key part (targets/traffic/NAME.json), a Kafka key and a URL path segment
# (/v2/models/NAME/infer): letters, digits, '.', '_', '-', starting with a letter or digit.
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def endpoint_name_problem(endpoint: str) -> str | None:
    """Why `endpoint` cannot name an endpoint (None when it can)."""
    if ENDPOINT_NAME.fullmatch(endpoint):
        return None
    return (f"endpoint name {endpoint[:80]!r} is not valid: use 1 to 63 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (e.g. iris or fraud-ep)")


# --- folding what the caller read -----------------------------------------------------------------


def fold_traffic(events: Iterable[object]) -> tuple[dict[str, TrafficPolicy], dict[str, ActiveRollout]]:
    """(policies, rollouts in progress) from `modelcd.traffic` events in topic order (commands ignored)."""
    policies: dict[str, TrafficPolicy] = {}
    rollouts: dict[str, ActiveRollout] = {}
    for ev in events:
        if isinstance(ev, TrafficPolicy):
            policies[ev.endpoint] = ev
        elif isinstance(ev, RolloutStep) and not ev.command:
            current = rollouts.get(ev.endpoint)
            if ev.action == "start":
                rollouts[ev.endpoint] = ActiveRollout(
                    endpoint=ev.endpoint, rollout_id=ev.rollout_id, canary=ev.canary, baseline=ev.baseline,
                    models=frozenset({ev.canary, ev.baseline, *(f"{r.model}:{r.version}" for r in ev.baseline_routes)}
                                     - {""}))
            elif current is not None and current.rollout_id == ev.rollout_id and ev.action in ROLLOUT_ENDED:
                del rollouts[ev.endpoint]
    return policies, rollouts


def newest(*sources: Mapping[str, TrafficPolicy]) -> dict[str, TrafficPolicy]:
    """Per endpoint the policy with the highest revision among the sources (the first wins a tie)."""
    out: dict[str, TrafficPolicy] = {}
    for source in sources:
        for endpoint, p in source.items():
            if endpoint not in out or p.revision > out[endpoint].revision:
                out[endpoint] = p
    return out


def world(models: Iterable[ModelState], store_policies: Mapping[str, TrafficPolicy],
          traffic_events: Iterable[object] = ()) -> World:
    """A World from the store's target state and (when the caller could read it) the traffic topic."""
    topic_policies, rollouts = fold_traffic(traffic_events)
    return World(models={f"{m.name}:{m.version}": m for m in models},
                 policies=newest(store_policies, topic_policies), rollouts=rollouts)


# --- what uses a model ---------------------------------------------------------------------------


def endpoint_uses(endpoint: str, weights: Mapping[str, float], shadows: Mapping[str, Sequence[str]],
                  rollouts: Mapping[str, Iterable[str]]) -> dict[str, list[Use]]:
    """{"name:version" (or "name:*" for a bare name): uses} that one endpoint puts on models.

    `weights`: route "name:version" -> percent; `shadows`: shadow "name:version" -> its primaries;
    `rollouts`: rollout id -> the models it moves traffic between.
    """
    out: dict[str, list[Use]] = {}
    # While a rollout drives the endpoint, `traffic set` and `traffic delete` are refused: end it first.
    first = f"modelcd rollout abort {endpoint}, then " if rollouts else ""
    for model, weight in sorted(weights.items()):
        if weight > 0:
            out.setdefault(model, []).append(Use(
                "route", endpoint, f"serves {weight:g}% of endpoint {endpoint}",
                f"{first}modelcd traffic set {endpoint} MODEL:VERSION=100 (without {model}), or modelcd traffic "
                f"delete {endpoint}"))
    # A shadow under evaluation takes no traffic of its own, so it looks unused: its relation protects it.
    for model, primaries in sorted(shadows.items()):
        for primary in sorted(primaries):
            out.setdefault(model, []).append(Use(
                "shadow", endpoint, f"shadows {primary} on endpoint {endpoint}",
                f"modelcd shadow remove {primary} {model} --endpoint {endpoint}"))
    for rid, models in sorted(rollouts.items()):
        for model in sorted(set(models)):
            key = model if ":" in model else f"{model}:*"
            out.setdefault(key, []).append(Use(
                "rollout", endpoint, f"is moved by rollout {rid} in progress on endpoint {endpoint}",
                f"modelcd rollout abort {endpoint} (or wait for it to end: modelcd rollout status {endpoint})"))
    return out


def uses_of(ref: str, w: World) -> list[Use]:
    """Every use of `ref` ("name:version") across the world's endpoints, endpoint by endpoint."""
    name = ref.partition(":")[0]
    found: list[Use] = []
    for endpoint in sorted(set(w.policies) | set(w.rollouts)):
        p = w.policies.get(endpoint)
        weights: dict[str, float] = {}
        shadows: dict[str, list[str]] = {}
        if p is not None and not p.deleted:
            for r in p.routes:
                weights[f"{r.model}:{r.version}"] = weights.get(f"{r.model}:{r.version}", 0.0) + r.weight
            for rel in p.shadows:
                shadows.setdefault(rel.shadow, []).append(rel.primary)
        ro = w.rollouts.get(endpoint)
        rollouts = {ro.rollout_id: ro.models} if ro is not None else {}
        uses = endpoint_uses(endpoint, weights, shadows, rollouts)
        found.extend(uses.get(ref, []) + uses.get(f"{name}:*", []))
    return found


# --- the checks ----------------------------------------------------------------------------------


def check_retire(ref: str, w: World, *, force: bool = False, force_hint: str = "--force") -> list[Use]:
    """Refuse to retire a model in use (unless forced); returns the uses a forced retire breaks."""
    uses = uses_of(ref, w)
    if uses and not force:
        lines = "; ".join(f"it {u.what} (resolve: {u.resolve})" for u in uses)
        raise Unsafe(f"{ref} is in use, so retiring it would fail the requests that reach it (503 from every "
                     f"node): {lines}. Resolve these first, or retire anyway with {force_hint}", uses=uses)
    return uses


def serving_versions(name: str, w: World) -> list[str]:
    versions = [m.version for m in w.models.values() if m.name == name and m.target == "serving"]
    return sorted(versions, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


def check_serving(refs: Iterable[str], w: World, *, role: str) -> None:
    """Every "name:version" in `refs` is deployed and serving; a bare name needs one serving version.

    `role` says where the refs were named ("route", "canary", "shadow", "primary") for the message.
    """
    problems = []
    for ref in refs:
        name, _, version = ref.partition(":")
        deployed = serving_versions(name, w)
        if version:
            state = w.models.get(ref)
            if state is not None and state.target == "serving":
                continue
            status = "was retired" if state is not None else "is not deployed"
        elif deployed:
            continue
        else:
            status = "has no serving version"
        if deployed:
            problems.append(f"{role} {ref} {status} (serving versions of {name}: {', '.join(deployed)})")
        else:
            problems.append(f"{role} {ref} {status} (no version of {name} serves; deploy it first: modelcd "
                            f"deploy PACKAGE)")
    if problems:
        raise Unsafe("; ".join(problems) + ". `modelcd models` lists what is deployed")


def check_endpoint_delete(endpoint: str, w: World) -> TrafficPolicy:
    """The endpoint's policy, if it may be deleted: it exists, and no rollout drives it."""
    p = w.policies.get(endpoint)
    if p is None or p.deleted:
        raise Unsafe(f"no endpoint {endpoint!r} (modelcd traffic show {endpoint})", "not_found")
    ro = w.rollouts.get(endpoint)
    if ro is not None:
        raise Unsafe(f"rollout {ro.rollout_id} drives endpoint {endpoint} ({ro.canary} against {ro.baseline}); "
                     f"end it first: modelcd rollout abort {endpoint}",
                     uses=[Use("rollout", endpoint, f"rollout {ro.rollout_id} in progress on endpoint {endpoint}",
                               f"modelcd rollout abort {endpoint}")])
    return p
