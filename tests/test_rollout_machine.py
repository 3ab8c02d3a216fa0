"""The rollout state machine, pure: plans, commands, analysis verdicts, the fold, the policies it implies."""

from __future__ import annotations

import pytest

from modelcd.events.schemas import RolloutStep, Route, TrafficPolicy
from modelcd.rollout.analysis import Analysis, Check, Status, Verdict
from modelcd.rollout.machine import (
    PLANS,
    Phase,
    Rollout,
    RolloutError,
    apply,
    fold,
    make_plan,
    on_analysis,
    on_command,
    parse_duration,
    parse_steps,
    pending_commands,
    policy_for,
    same_traffic,
)

POLICY = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)], sticky_key="user")


def cmd(action: str, **kw: object) -> RolloutStep:
    return RolloutStep(endpoint="iris", rollout_id=str(kw.pop("rollout_id", "r1")), action=action,  # type: ignore[arg-type]
                       command=True, command_id=str(kw.pop("command_id", f"c-{action}")), **kw)  # type: ignore[arg-type]


def verdict(v: Verdict) -> Analysis:
    status = {Verdict.PROMOTE: Status.PASS, Verdict.HOLD: Status.INCONCLUSIVE, Verdict.ROLLBACK: Status.FAIL}[v]
    return Analysis(v, (Check("error_rate", status, 0.01, 0.0, 0.02, 0.05, 100, "figures"),),
                    {"canary": {"requests": 100, "errors": 1}, "baseline": {"requests": 900, "errors": 9}})


def started(plan_name: str = "standard", now: float = 1000.0, **plan_kw: object) -> tuple[Rollout, list[RolloutStep]]:
    plan = make_plan(plan_name, **plan_kw)  # type: ignore[arg-type]
    facts = on_command(None, cmd("start", canary="iris:2", plan=plan), POLICY, now)
    r = None
    for f in facts:
        r = apply(r, f)
    assert r is not None
    return r, facts


def step(r: Rollout, v: Verdict, now: float) -> list[RolloutStep]:
    facts = on_analysis(r, verdict(v), now)
    for f in facts:
        apply(r, f)
    return facts


def test_plans_and_their_validation() -> None:
    """Named plans exist; overrides are validated with a message that says what to fix."""
    assert PLANS["standard"].steps == [1.0, 10.0, 50.0, 100.0] and PLANS["blue-green"].shadow_first
    assert make_plan("fast", steps=[5, 100], interval_s=1.0).steps == [5, 100]
    assert make_plan("standard", max_error_rate=0.01).thresholds.max_error_rate == 0.01
    for bad in ([10, 5, 100], [1, 10, 50], [100], [0, 100]):
        with pytest.raises(RolloutError):
            make_plan("standard", steps=bad)
    with pytest.raises(RolloutError, match="unknown plan"):
        make_plan("yolo")
    assert parse_duration("10m") == 600 and parse_duration("1.5s") == 1.5 and parse_duration("250ms") == 0.25
    assert parse_steps("1,10,50%,100") == [1, 10, 50, 100]
    with pytest.raises(RolloutError):
        parse_duration("soon")


def test_start_records_the_baseline_and_first_weight() -> None:
    """start: canary at the first step, the original routes kept for rollback, first analysis one interval on."""
    r, facts = started(interval_s=60.0)
    assert [f.action for f in facts] == ["start"] and facts[0].command_id == "c-start"
    assert r.phase is Phase.RUNNING and r.weight == 1.0 and r.baseline == "iris:1"
    assert r.baseline_routes == POLICY.routes and r.due_at == 1060.0


def test_start_refused_without_baseline_or_while_running() -> None:
    """No policy to roll out against, or a rollout already running: the command is refused."""
    plan = make_plan("standard")
    with pytest.raises(RolloutError, match="no baseline"):
        on_command(None, cmd("start", canary="iris:2", plan=plan), None, 0.0)
    r, _ = started()
    with pytest.raises(RolloutError, match="already has rollout"):
        on_command(r, cmd("start", canary="iris:3", plan=plan, command_id="c2"), POLICY, 0.0)


def test_healthy_rollout_goes_through_every_step() -> None:
    """promote verdicts walk 1 → 10 → 50 → 100 %, and the last step completes with a summary."""
    r, _ = started(interval_s=10.0)
    weights = []
    for i in range(3):
        facts = step(r, Verdict.PROMOTE, 1010.0 + 10 * i)
        weights.append(facts[0].weight)
    assert weights == [10.0, 50.0, 100.0]
    assert [f.action for f in r.history] == ["start", "promote", "promote", "promote", "complete"]
    assert r.phase is Phase.COMPLETED and r.history[-1].evidence["summary"]["totals"]["canary"]["requests"] == 300
    assert policy_for(r, POLICY).routes == [Route(model="iris", version="2", weight=100.0)]


def test_hold_keeps_the_step_and_rollback_restores_the_baseline() -> None:
    """hold: same step, next analysis one interval later; rollback: original routes, reason recorded."""
    r, _ = started(interval_s=10.0)
    facts = step(r, Verdict.HOLD, 1010.0)
    assert facts[0].action == "hold" and r.step == 0 and r.due_at == 1020.0 and r.window_start == 1000.0
    facts = step(r, Verdict.ROLLBACK, 1020.0)
    assert facts[0].action == "rollback" and "error_rate fail" in facts[0].reason
    assert facts[0].evidence["checks"][0]["status"] == "fail"
    assert r.phase is Phase.ROLLED_BACK and policy_for(r, POLICY).routes == POLICY.routes


def test_promote_resets_the_evidence_window() -> None:
    """Each step is judged on its own traffic: the window starts at the promotion."""
    r, _ = started(interval_s=10.0)
    step(r, Verdict.PROMOTE, 1013.0)
    assert r.window_start == 1013.0 and r.due_at == 1023.0 and r.step == 1


def test_pause_resume_abort_promote_now() -> None:
    """Operator commands: pause stops the clock, resume restarts it, abort restores, promote completes."""
    r, _ = started(interval_s=10.0)
    for f in on_command(r, cmd("pause"), POLICY, 1005.0):
        apply(r, f)
    assert r.phase is Phase.PAUSED and r.due_at is None
    with pytest.raises(RolloutError, match="already paused"):
        on_command(r, cmd("pause", command_id="again"), POLICY, 1006.0)
    for f in on_command(r, cmd("resume"), POLICY, 1050.0):
        apply(r, f)
    assert r.phase is Phase.RUNNING and r.due_at == 1060.0
    promote = on_command(r, cmd("promote"), POLICY, 1051.0)
    assert [f.action for f in promote] == ["promote", "complete"] and promote[-1].weight == 100.0
    aborted, _ = started()
    for f in on_command(aborted, cmd("abort"), POLICY, 1001.0):
        apply(aborted, f)
    assert aborted.phase is Phase.ABORTED and policy_for(aborted, POLICY).routes == POLICY.routes
    with pytest.raises(RolloutError, match="no rollout in progress"):
        on_command(aborted, cmd("resume", command_id="late"), POLICY, 1002.0)


def test_a_command_is_applied_once_and_only_to_its_rollout() -> None:
    """A redelivered command yields nothing; a command naming another rollout is refused."""
    r, _ = started()
    for f in on_command(r, cmd("pause"), POLICY, 1001.0):
        apply(r, f)
    assert on_command(r, cmd("pause"), POLICY, 1002.0) == []
    with pytest.raises(RolloutError, match="is in progress"):
        on_command(r, cmd("resume", rollout_id="other", command_id="x"), POLICY, 1003.0)


def test_fold_rebuilds_the_same_state_and_pending_commands() -> None:
    """Replaying the facts gives the live state; commands after the last fact, unanswered, are pending."""
    r, facts = started(interval_s=10.0)
    facts += step(r, Verdict.PROMOTE, 1010.0)
    facts += step(r, Verdict.HOLD, 1020.0)
    late = cmd("pause", command_id="late")
    log = [cmd("start", command_id="c-start"), *facts, late]
    again = fold(log)["iris"]
    assert (again.step, again.weight, again.phase, again.due_at, again.window_start) == \
        (r.step, r.weight, r.phase, r.due_at, r.window_start) == (1, 10.0, Phase.RUNNING, 1030.0, 1010.0)
    assert pending_commands(log) == [late]


def test_policy_splits_the_rest_among_baseline_routes() -> None:
    """The canary's weight comes out of every baseline route in proportion; sticky key and revision carry on."""
    base = TrafficPolicy(endpoint="iris", sticky_key="user", revision=7,
                         routes=[Route(model="iris", version="1", weight=80.0),
                                 Route(model="iris", version="0", weight=20.0)])
    plan = make_plan("standard")
    r = apply(None, on_command(None, cmd("start", canary="iris:2", plan=plan), base, 0.0)[0])
    assert r is not None
    r.weight = 50.0
    p = policy_for(r, base)
    assert {f"{x.model}:{x.version}": x.weight for x in p.routes} == {"iris:2": 50.0, "iris:1": 40.0, "iris:0": 10.0}
    assert p.sticky_key == "user" and p.revision == 8 and same_traffic(p, policy_for(r, p))


def test_blue_green_shadows_first_then_switches() -> None:
    """Blue-green: at 0 % the canary shadows the baseline; promoted, it takes 100 % and the shadow goes."""
    r, _ = started("blue-green", interval_s=10.0)
    p = policy_for(r, POLICY)
    assert [(x.model, x.version) for x in p.routes] == [("iris", "1")]
    assert [(s.primary, s.shadow, s.sample_rate) for s in p.shadows] == [("iris:1", "iris:2", 1.0)]
    step(r, Verdict.PROMOTE, 1010.0)
    done = policy_for(r, p)
    assert r.phase is Phase.COMPLETED and done.shadows == [] and done.routes[0].weight == 100.0


def test_both_arms_log_at_the_plan_rate_while_running_and_stop_after() -> None:
    """The divergence checks need prediction logs: a running rollout raises both arms' log rate, the end restores it."""
    r, _ = started("fast", interval_s=10.0, log_rate=0.25)
    running = policy_for(r, POLICY)
    assert {(x.model, x.version): x.log_rate for x in running.routes} == {("iris", "2"): 0.25, ("iris", "1"): 0.25}
    step(r, Verdict.PROMOTE, 1010.0)  # 10 % -> 100 %: the last step completes the rollout
    assert step(r, Verdict.PROMOTE, 1020.0) == []  # a late analysis decides nothing
    done = policy_for(r, running)
    assert r.phase is Phase.COMPLETED and [x.log_rate for x in done.routes] == [None]
    # same weights, different log rate: still a change to publish
    assert not same_traffic(running, TrafficPolicy(endpoint="iris", routes=[
        msgspec_replace(x, log_rate=None) for x in running.routes], sticky_key=running.sticky_key))
    with pytest.raises(RolloutError, match="log rate"):
        make_plan("fast", log_rate=1.5)


def msgspec_replace(route: Route, **kw: object) -> Route:
    import msgspec

    return msgspec.structs.replace(route, **kw)


@pytest.mark.parametrize("bad", [
    {"max_error_rate_increase": float("nan")},  # `--max-error-increase nan`: the check could never decide
    {"max_error_rate_increase": -1.0},  # always fails: every canary rolled back
    {"min_agreement": 7.0},
    {"max_latency_p99_ms": -5.0},
    {"max_latency_p50_ms": float("inf")},
    {"min_requests": 0},  # judging on no evidence
    {"min_divergence_samples": -1},
    {"confidence": 1.0},
    {"max_mean_shift": float("nan")},
])
def test_thresholds_that_cannot_judge_are_refused(bad: dict[str, float]) -> None:
    """A plan whose analysis bounds are NaN, out of 0..1, negative or zero counts is a usage error naming the bound."""
    with pytest.raises(RolloutError, match=f"thresholds out of range: {next(iter(bad))}="):
        make_plan("fast", **bad)
    make_plan("fast", max_error_rate_increase=0.1, min_agreement=0.8, max_latency_p99_ms=250.0, min_requests=1)
