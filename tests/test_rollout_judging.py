"""Rollout analysis judges the model, not the callers: pure tests through the controller's own evidence window.

Findings: with ~10 valid req/s and ~2/s of a wrong input shape, both arms got the same 4xx share and
the canary was rolled back on `error_rate 0.1786 > 0.05`; a rollout short of samples held forever;
`rollout start` deleted the endpoint's shadows; the launch summary said "step at 100%: promote" for an
analysis made at 10 % and "step at 0%: rollback (label_overlap None)" when error_rate failed.
"""

from __future__ import annotations

import pytest

from modelcd.events.schemas import (
    PredictionLog,
    RolloutPlan,
    RolloutStep,
    Route,
    ShadowPrediction,
    ShadowRelation,
    TrafficPolicy,
    UsageReport,
    new_id,
)
from modelcd.rollout.analysis import ArmWindow, Status, Verdict, analyze, samples_eta, time_to_verdict
from modelcd.rollout.cli import render_report, render_status
from modelcd.rollout.machine import Phase, Rollout, apply, make_plan, on_analysis, on_command, policy_for, summary
from modelcd.rollout.service import Evidence

T0 = 1_000_000.0
POLICY = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)])


def begin(plan: RolloutPlan, policy: TrafficPolicy = POLICY) -> Rollout:
    cmd = RolloutStep(endpoint="iris", rollout_id="r1", action="start", canary="iris:2", plan=plan, command=True,
                      command_id="c1")
    r = None
    for f in on_command(None, cmd, policy, T0):
        r = apply(r, f)
    assert r is not None
    return r


def feed(ev: Evidence, version: str, *, answered: int, client: int = 0, server: int = 0, at: float,
         label_shift: int = 0) -> None:
    """What a node reports for one arm: a usage report (4xx counted apart) and logged, labelled rows."""
    ev.add(ev.usage, UsageReport(model="iris", version=version, node="n1", interval_start=at - 10.0,
                                 interval_end=at, count=answered, errors=client + server, client_errors=client,
                                 last_used=at))
    for i in range(min(answered, 300)):
        x = i % 50
        ev.add(ev.logs, PredictionLog(request_id=new_id(), model="iris", version=version, endpoint="iris",
                                      inputs={"x": [[x]]}, outputs={"label": [(x + label_shift) % 3]},
                                      latency_ms=5.0, at=at))


def judge(r: Rollout, ev: Evidence, now: float) -> list[RolloutStep]:
    canary, baseline, pairs = ev.window(r)
    facts = on_analysis(r, analyze(canary, baseline, r.plan.thresholds, pairs, window_s=now - r.window_start), now)
    for f in facts:
        apply(r, f)
    return facts


def test_client_errors_on_both_arms_do_not_roll_back_a_healthy_canary() -> None:
    """The finding's traffic (baseline 19.7 %, canary 15.7 % wrong-shape 4xx, no model errors) promotes."""
    r = begin(make_plan("fast"))
    ev = Evidence(20_000)
    now = T0 + 120.0
    feed(ev, "2", answered=128, client=24, at=now - 1)  # 10 % of 12 req/s for 2 minutes; 15.8 % refused
    feed(ev, "1", answered=1150, client=282, at=now - 1)  # 19.7 % refused
    canary, baseline, _ = ev.window(r)
    assert (canary.requests, canary.errors, canary.client_errors) == (128, 0, 24)
    facts = judge(r, ev, now)
    assert [f.action for f in facts] == ["promote", "complete"], facts[0].reason
    checks = {c["name"]: c for c in facts[0].evidence["checks"]}
    assert checks["error_rate"]["status"] == "pass" and checks["client_errors"]["status"] == "pass"
    assert "canary 15.79% vs baseline 19.69% refused" in checks["client_errors"]["detail"]


def test_model_errors_still_roll_back_and_equal_failure_does_not() -> None:
    """5xx on the canary alone fail error_rate; the same 5xx share on both arms never does."""
    bad = begin(make_plan("fast"))
    ev = Evidence(20_000)
    feed(ev, "2", answered=180, server=20, at=T0 + 100)
    feed(ev, "1", answered=1800, at=T0 + 100)
    facts = judge(bad, ev, T0 + 120)
    assert [f.action for f in facts] == ["rollback"] and "error_rate fail" in facts[0].reason
    assert "canary 10.00% vs baseline 0.00%" in facts[0].reason

    same = begin(make_plan("fast"))
    ev = Evidence(20_000)
    feed(ev, "2", answered=900, server=100, at=T0 + 100)
    feed(ev, "1", answered=9000, server=1000, at=T0 + 100)
    facts = judge(same, ev, T0 + 120)
    assert [f.action for f in facts] == ["promote", "complete"], facts[0].reason


def test_a_canary_refusing_what_the_baseline_accepts_fails() -> None:
    """A changed input signature: the canary answers 4xx to nearly all of the traffic the baseline serves."""
    a = analyze(ArmWindow(requests=5, client_errors=195), ArmWindow(requests=1900, client_errors=100),
                make_plan("fast").thresholds)
    c = next(c for c in a.checks if c.name == "client_errors")
    assert c.status is Status.FAIL and "refuses requests the baseline accepts" in c.detail
    assert a.verdict is Verdict.ROLLBACK


def test_a_starved_rollout_ends_at_max_hold_with_its_evidence() -> None:
    """Too few samples at every analysis: holds until max_hold, then aborted, the baseline restored."""
    r = begin(make_plan("fast", max_hold_s=1800.0))  # analyses every 2 minutes
    ev = Evidence(20_000)
    actions = []
    while r.active:
        assert r.due_at is not None and r.due_at <= T0 + 1800.0
        now = r.due_at
        feed(ev, "2", answered=1, at=now)
        feed(ev, "1", answered=9, at=now)
        actions += [f.action for f in judge(r, ev, now)]
    assert actions == ["hold"] * 14 + ["abort"] and r.phase is Phase.ABORTED
    last = r.history[-1]
    assert last.at == T0 + 1800.0 and last.evidence["outcome"] == "max_hold" and last.evidence["checks"]
    assert last.reason.startswith("no verdict within max_hold 30m at step 1 of 2 (10%, held 30m): error_rate")
    assert policy_for(r, POLICY).routes == POLICY.routes
    report = render_report(summary(r))
    assert "step 1 of 2 at 10%: aborted: no verdict within max_hold after 14 holds" in report
    assert "outcome: aborted" in report


def test_resume_restarts_the_hold_clock() -> None:
    """A pause does not count against max_hold: the step gets its whole hold again after resume."""
    r = begin(make_plan("fast", max_hold_s=600.0))
    for action, at in (("pause", T0 + 60), ("resume", T0 + 3600)):
        for f in on_command(r, RolloutStep(endpoint="iris", rollout_id="r1", action=action, command=True,  # type: ignore[arg-type]
                                           command_id=action), None, at):
            apply(r, f)
    assert r.hold_deadline == T0 + 4200 and r.due_at == T0 + 3720


def test_status_estimates_the_time_to_enough_samples() -> None:
    """After a hold, `rollout status` says when the slowest check will have its samples at the current rate."""
    r = begin(make_plan("fast", interval_s=120.0))
    ev = Evidence(20_000)
    feed(ev, "2", answered=12, at=T0 + 100)  # 0.1 canary request per second
    feed(ev, "1", answered=108, at=T0 + 100)
    [hold] = judge(r, ev, T0 + 120)
    assert hold.action == "hold"
    wait = time_to_verdict(hold.evidence)
    # The slowest check decides: label_overlap needs 100 rows per arm (error_rate 30 requests).
    assert wait is not None and wait["check"] == "label_overlap" and wait["need"] == 100
    assert wait["seconds"] == pytest.approx((100 - 12) / (12 / 120))
    text = render_status(r, now=T0 + 130)
    assert "enough samples in ~15m" in text and "label_overlap has 12 of ~100, 0.1/s" in text
    assert "the rollout is aborted and the baseline gets its traffic back" in text


def test_shadows_present_before_a_rollout_are_kept_through_it_and_after() -> None:
    """The endpoint's shadow relations (also one whose shadow is the canary) survive start, steps and rollback."""
    shadows = [ShadowRelation(primary="iris", shadow="iris:2", start=T0 - 10),
               ShadowRelation(primary="iris:1", shadow="iris:3", start=T0 - 10)]
    policy = TrafficPolicy(endpoint="iris", routes=POLICY.routes, shadows=shadows, revision=3)
    r = begin(make_plan("fast"), policy)
    running = policy_for(r, policy)
    assert running.shadows == shadows and {x.version: x.weight for x in running.routes} == {"1": 90.0, "2": 10.0}
    apply(r, RolloutStep(endpoint="iris", rollout_id="r1", action="rollback", canary="iris:2", baseline="iris:1",
                         at=T0 + 120))
    assert policy_for(r, running).shadows == shadows

    bg = begin(make_plan("blue-green", interval_s=60.0), policy)
    first = policy_for(bg, policy)
    assert first.shadows[:2] == shadows and [(x.primary, x.shadow) for x in first.shadows[2:]] == [("iris:1", "iris:2")]
    apply(bg, RolloutStep(endpoint="iris", rollout_id="r1", action="complete", step=1, weight=100.0, at=T0 + 60))
    assert policy_for(bg, first).shadows == shadows  # blue-green's own relation goes, the endpoint's stay


def test_launch_summary_names_the_step_judged_and_the_deciding_check() -> None:
    """A promote made at 10 % reads "step 1 of 2 at 10%"; a rollback names error_rate with its figures."""
    good = begin(make_plan("fast"))
    ev = Evidence(20_000)
    feed(ev, "2", answered=150, at=T0 + 100)
    feed(ev, "1", answered=1350, at=T0 + 100)
    assert [f.action for f in judge(good, ev, T0 + 120)] == ["promote", "complete"]
    s = summary(good)
    [row] = s["steps"]
    assert (row["action"], row["step"], row["weight"]) == ("promote", 0, 10.0)
    assert s["totals"]["canary"]["requests"] == 150
    report = render_report(s)
    assert "step 1 of 2 at 10%: promote" in report and "at 100%" not in report

    bad = begin(make_plan("fast"))
    ev = Evidence(20_000)
    feed(ev, "2", answered=100, server=50, at=T0 + 100)
    feed(ev, "1", answered=1350, at=T0 + 100)
    for at in (T0 + 120,):
        judge(bad, ev, at)
    [row] = summary(bad)["steps"]
    assert (row["action"], row["weight"]) == ("rollback", 10.0)
    assert [c["name"] for c in row["decided_by"]] == ["error_rate"]
    report = render_report(summary(bad))
    assert "step 1 of 2 at 10%: rollback" in report and "error_rate fail: canary 33.33% vs baseline 0.00%" in report
    assert "label_overlap None" not in report and "at 0%" not in report


def test_holds_are_not_counted_twice_in_the_totals() -> None:
    """A step's window grows until it is decided: its holds and its decision are one row, counted once."""
    r = begin(make_plan("fast"))
    ev = Evidence(20_000)
    feed(ev, "2", answered=10, at=T0 + 100)
    feed(ev, "1", answered=90, at=T0 + 100)
    assert [f.action for f in judge(r, ev, T0 + 120)] == ["hold"]
    feed(ev, "2", answered=140, at=T0 + 200)
    feed(ev, "1", answered=1260, at=T0 + 200)
    assert [f.action for f in judge(r, ev, T0 + 240)] == ["promote", "complete"]
    [row] = summary(r)["steps"]
    assert row["holds"] == 1 and row["canary"]["requests"] == 150
    assert summary(r)["totals"]["canary"]["requests"] == 150
    assert "after 1 hold" in render_report(summary(r))


def test_requests_another_relation_shadowed_still_count_for_their_arm() -> None:
    """With a kept shadow on the baseline, the primary's answers (published as shadow predictions) are its rows."""
    r = begin(make_plan("fast"))
    ev = Evidence(20_000)
    for i in range(150):
        ev.add(ev.shadows, ShadowPrediction(request_id=f"q{i}", primary_model="iris", primary_version="1",
                                            shadow_model="iris", shadow_version="3",
                                            primary_outputs={"label": [i % 3]}, shadow_outputs={"label": [0]},
                                            primary_latency_ms=4.0, at=T0 + 10))
    ev.add(ev.shadows, ShadowPrediction(request_id="q0", primary_model="iris", primary_version="1",
                                        shadow_model="iris", shadow_version="4", primary_outputs={"label": [0]},
                                        at=T0 + 10))  # a second shadow of the same request: one row
    _canary, baseline, _pairs = ev.window(r)
    assert baseline.requests == 150 and len(baseline.outputs) == 150 and baseline.latencies_ms[0] == 4.0


def test_status_estimates_before_the_first_analysis_from_the_request_rate() -> None:
    """Just started, fast plan, 10 req/s (1/s on the canary), logging 10 %: 100 rows per arm take ~17 minutes."""
    r = begin(make_plan("fast"))
    text = render_status(r, now=T0 + 5, rates=(1.0, 9.0))
    assert "enough samples in ~17m" in text and "divergence has 0 of ~100, 0.1/s since the step began" in text
    assert "waiting for samples: error_rate has none yet" in render_status(r, now=T0 + 5, rates=(0.0, 0.0))
    wait = samples_eta(r.plan.thresholds, r.plan.log_rate, 1.0, 9.0)
    assert wait is not None and wait["seconds"] == pytest.approx(1000.0)


def test_samples_needed_are_searched_for_proportions() -> None:
    """0 errors in 50 on both arms: the error check needs ~190 requests per arm for +2 pts, not 1/√n's ~630."""
    t = make_plan("standard").thresholds
    a = analyze(ArmWindow(requests=50), ArmWindow(requests=5000), t)
    c = next(c for c in a.checks if c.name == "error_rate")
    assert c.status is Status.INCONCLUSIVE and c.need is not None and 180 <= c.need <= 200
    grown = analyze(ArmWindow(requests=c.need), ArmWindow(requests=c.need * 100), t)
    assert next(x for x in grown.checks if x.name == "error_rate").status is Status.PASS
