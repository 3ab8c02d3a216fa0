"""Retirement decisions without I/O: table-driven, `now` passed in."""

from __future__ import annotations

import msgspec
import pytest

from modelcd.events.schemas import ModelState, RolloutStep, Route, ShadowRelation, TrafficPolicy, UsageReport
from modelcd.retirement import handlers, policy
from modelcd.retirement.policy import Action, Decision, Record

T0 = 1_000_000.0


def rec(**kw: object) -> Record:
    base: dict[str, object] = dict(name="m", version="1", owner="ann", deployed_at=T0, expiry_seconds=100, known=True)
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


CASES = [
    # (id, record, now, protections, expected action)
    ("fresh deployment", rec(), T0 + 10, (), Action.NONE),
    ("idle below the warn share", rec(), T0 + 79, (), Action.NONE),
    ("idle at the warn share", rec(), T0 + 80, (), Action.WARN),
    ("idle counts from last use", rec(last_used=T0 + 50), T0 + 100, (), Action.NONE),
    ("deployed after last use", rec(last_used=T0 - 500), T0 + 10, (), Action.NONE),
    ("already warned, not yet expired", rec(warned_at=T0 + 80), T0 + 90, (), Action.NONE),
    ("warned and expired", rec(warned_at=T0 + 80), T0 + 100, (), Action.RETIRE),
    ("past expiry but never warned: warn first", rec(), T0 + 500, (), Action.WARN),
    ("used after the warning", rec(warned_at=T0 + 80, last_used=T0 + 85), T0 + 90, (), Action.CANCEL),
    ("retire already requested", rec(warned_at=T0 + 80, retire_requested_at=T0 + 100), T0 + 200, (), Action.NONE),
    ("retired", rec(retired=True, warned_at=T0 + 80), T0 + 200, (), Action.NONE),
    ("usage only, no state yet", rec(known=False), T0 + 200, (), Action.NONE),
    ("no expiry set", rec(expiry_seconds=0), T0 + 10_000, (), Action.NONE),
    ("pinned and due", rec(pinned=True), T0 + 200, (), Action.SKIP),
    ("pinned, not due yet", rec(pinned=True), T0 + 10, (), Action.NONE),
    ("in traffic and due", rec(), T0 + 200, ("serves 50% of endpoint e",), Action.SKIP),
    ("skip already said", rec(pinned=True, skip_reason="pinned by its owner"), T0 + 200, (), Action.NONE),
    ("skip reason changed", rec(pinned=True, skip_reason="pinned by its owner"), T0 + 200, ("rollout r",), Action.SKIP),
    ("protection ended", rec(skip_reason="pinned by its owner"), T0 + 200, (), Action.RESUME),
    ("protected after a warning", rec(warned_at=T0 + 80), T0 + 90, ("rollout r",), Action.SKIP),
]


@pytest.mark.parametrize(("record", "now", "protections", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(record: Record, now: float, protections: tuple[str, ...], expected: Action) -> None:
    """decide() gives the expected action for each situation."""
    assert policy.decide(record, now, protections, warn_share=0.8).action is expected


def test_skip_reason_names_every_protection() -> None:
    """A skip decision names the pin and each traffic protection."""
    d = policy.decide(rec(pinned=True), T0 + 200, ("serves 10% of endpoint e",), 0.8)
    assert d == Decision(Action.SKIP, "pinned by its owner; serves 10% of endpoint e")


def test_warn_then_retire_sequence_warns_once() -> None:
    """Stepping time through an idle spell gives exactly one WARN, then one RETIRE, then nothing."""
    r, actions = rec(), []
    for now in range(int(T0), int(T0) + 300, 5):
        d = policy.decide(r, now, (), 0.8)
        actions.append(d.action)
        r = policy.apply(r, d, now)
    done = [a for a in actions if a is not Action.NONE]
    assert done == [Action.WARN, Action.RETIRE]


def test_usage_takes_the_latest_across_nodes() -> None:
    """Last use is the maximum over nodes, whatever order reports arrive in."""
    def report(node: str, t: float) -> UsageReport:
        return UsageReport(model="m", version="1", node=node, interval_start=0, interval_end=0, count=1, last_used=t)

    r = policy.on_usage(None, report("a", 50.0))
    r = policy.on_usage(r, report("b", 70.0))
    r = policy.on_usage(r, report("a", 60.0))
    assert r.last_used == 70.0 and not r.known


def test_redeploy_starts_a_new_idle_spell() -> None:
    """A new deployment of a warned version clears the warning; the same state replayed keeps it."""
    state = ModelState(name="m", version="1", target="serving", owner="ann", expiry_seconds=100, deployed_at=T0)
    r = msgspec.structs.replace(policy.on_state(None, state), warned_at=T0 + 80)
    assert policy.on_state(r, state).warned_at == T0 + 80
    again = msgspec.structs.replace(state, deployed_at=T0 + 500)
    assert policy.on_state(r, again).warned_at is None


def test_traffic_protections_follow_weights_and_rollouts() -> None:
    """Weight > 0 and rollouts in progress protect; weight 0 and ended rollouts do not."""
    view = policy.on_traffic(None, TrafficPolicy(endpoint="e", routes=[
        Route(model="m", version="1", weight=90.0), Route(model="m", version="2", weight=10.0),
        Route(model="old", version="1", weight=0.0)]))
    view = policy.on_traffic(view, RolloutStep(endpoint="e", rollout_id="r1", action="start",
                                               canary="m:3", baseline="m:1"))
    prot = policy.endpoint_protections(view)
    assert set(prot) == {"m:1", "m:2", "m:3"}
    ended = policy.on_traffic(view, RolloutStep(endpoint="e", rollout_id="r1", action="complete"))
    changed = policy.changed_protections(prot, policy.endpoint_protections(ended))
    assert changed == {"m:3": [], "m:1": ["serves 90% of endpoint e"]}


def test_a_shadow_relation_protects_the_shadow_until_removed() -> None:
    """A shadow takes no traffic of its own (shadow predictions are not usage): its relation protects it."""
    relation = ShadowRelation(primary="m", shadow="m:2")
    view = policy.on_traffic(None, TrafficPolicy(endpoint="e", routes=[Route(model="m", version="1", weight=100.0)],
                                                 shadows=[relation]))
    prot = policy.endpoint_protections(view)
    assert prot["m:2"] == ["shadows m on endpoint e"] and "m:1" in prot
    # a rollout step keeps the shadows it did not change
    view = policy.on_traffic(view, RolloutStep(endpoint="e", rollout_id="r9", action="abort"))
    assert "m:2" in policy.endpoint_protections(view)
    removed = policy.on_traffic(view, TrafficPolicy(endpoint="e", routes=[Route(model="m", version="1",
                                                                                weight=100.0)]))
    assert policy.changed_protections(prot, policy.endpoint_protections(removed)) == {"m:2": []}


def test_check_emits_decision_then_retire_request() -> None:
    """A RETIRE check yields the RetirementDecision, then the RetireRequested, with stable ids."""
    entry = handlers.ModelEntry(versions={"1": rec(warned_at=T0 + 80)})
    outcomes = handlers.handle_check(entry, T0 + 100, 0.8)
    [(decision, id1), (request, id2)] = outcomes[0].events
    assert decision.action == "retire" and request.requested_by == "retirement"  # type: ignore[attr-defined]
    again = handlers.handle_check(handlers.ModelEntry(versions={"1": rec(warned_at=T0 + 80)}), T0 + 100, 0.8)
    assert [i for _, i in again[0].events] == [id1, id2]
    assert entry.versions["1"].retire_requested_at == T0 + 100


def test_an_expiry_of_10_to_the_30_is_clamped_and_the_table_value_encodes() -> None:
    """A ModelState with expiry 10^30 s (which overflowed the table's int64 JSON) folds into a bounded record."""
    from faust.utils import json as faust_json

    from modelcd.store.package import MAX_EXPIRY_SECONDS

    state = ModelState(name="m", version="1", target="serving", owner="ann", expiry_seconds=10**30, deployed_at=T0)
    entry = handlers.ModelEntry()
    handlers.handle_state(entry, state)
    assert entry.versions["1"].expiry_seconds == MAX_EXPIRY_SECONDS
    faust_json.dumps(handlers.entry_to_table(entry))  # what the processor writes to its table: no OverflowError
    assert policy.decide(entry.versions["1"], T0 + 10 * 365 * 86400).action is Action.NONE


def test_a_retire_refused_because_the_model_became_protected_ends_the_wait() -> None:
    """Decided for retirement, then routed: ingest refuses (store.safety); the processor skips instead of waiting forever."""
    waiting = policy.apply(rec(warned_at=T0 + 80), policy.Decision(Action.RETIRE, "unused"), T0 + 200)
    assert policy.decide(waiting, T0 + 201, ()).action is Action.NONE  # still under way
    skip = policy.decide(waiting, T0 + 201, ("serves 100% of endpoint e",))
    assert skip.action is Action.SKIP and skip.reason == "serves 100% of endpoint e"
    kept = policy.apply(waiting, skip, T0 + 201)
    assert kept.retire_requested_at is None and policy.decide(kept, T0 + 202, ("serves 100% of endpoint e",)).action \
        is Action.NONE
    # The route goes away: the model is judged again (still idle past its expiry: retired, after its warning).
    resumed = policy.apply(kept, policy.decide(kept, T0 + 300, ()), T0 + 300)
    assert policy.decide(resumed, T0 + 301, ()).action is Action.RETIRE
