"""Shadow decisions without I/O: criteria, sampling, time windows, pressure hysteresis, comparison windows."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from modelcd.events.schemas import Criterion, ModelState, ShadowPrediction, ShadowRelation, TrafficPolicy
from modelcd.shadow.comparison import Window, Windows
from modelcd.shadow.criteria import (
    CriterionError, RequestView, ShadowRules, compile_criterion, log_primary, sample,
)
from modelcd.shadow.pressure import Pressure, PressureLimits, State
from modelcd.shadow.relations import RelationError, add_relation, parse_time, parse_where, remove_relation
from modelcd.store.safety import World

T0 = 1_699_999_980.0  # a multiple of 60: windows start at T0


def rules(*relations: ShadowRelation, endpoint: str = "iris") -> ShadowRules:
    r = ShadowRules()
    assert r.update(TrafficPolicy(endpoint=endpoint, shadows=list(relations))) == []
    return r


def test_sampling_rate_within_tolerance() -> None:
    """A 10 % rate shadows 10 % of 20 000 request ids within ±0.5 percentage points (3.7 sigma)."""
    r = rules(ShadowRelation(primary="iris", shadow="iris:2", sample_rate=0.1))
    n = 20_000
    hits = sum(bool(r.match("iris", "1", f"req-{i}", RequestView(), T0)) for i in range(n))
    assert abs(hits / n - 0.10) <= 0.005


def test_sampling_is_deterministic_and_nested() -> None:
    """The same id gets the same decision every time, and a 5 % sample is inside the 10 % one."""
    ids = [f"r{i}" for i in range(5000)]
    ten = {i for i in ids if sample(i, 0.10, "iris")}
    five = {i for i in ids if sample(i, 0.05, "iris")}
    assert ten == {i for i in ids if sample(i, 0.10, "iris")}
    assert five <= ten and five
    assert {i for i in ids if sample(i, 0.10, "wine")} != ten  # the salt decorrelates primaries


def test_shadowed_request_is_not_logged_twice() -> None:
    """A shadowed request's primary output goes in its ShadowPrediction, not also in the prediction log."""
    assert not log_primary("r1", 1.0, shadowed=True)
    assert log_primary("r1", 1.0, shadowed=False)


def test_criteria_choose_matching_requests_only() -> None:
    """Header, parameter and input criteria all must hold; input lists hold only if every element does."""
    r = rules(ShadowRelation(primary="iris", shadow="iris:2", criteria=[
        Criterion(field="header:X-Country", op="in", value=["DE", "FR"]),
        Criterion(field="param:tier", op="ne", value="free"),
        Criterion(field="input:age", op="ge", value=18),
    ]))

    def m(headers: dict[str, str], params: dict[str, object], inputs: dict[str, object]) -> bool:
        return bool(r.match("iris", "1", "req", RequestView(headers, params, inputs), T0))

    assert m({"x-country": "DE"}, {"tier": "gold"}, {"age": [30]})
    assert m({"X-Country": "FR"}, {"tier": "pro"}, {"age": {"data": [[18, 40]]}})  # original-case header, OIP tensor
    assert not m({"x-country": "DE"}, {}, {"age": [30]})  # a missing field fails every operator but exists
    assert not m({"x-country": "US"}, {"tier": "gold"}, {"age": [30]})
    assert not m({"x-country": "DE"}, {"tier": "free"}, {"age": [30]})
    assert not m({"x-country": "DE"}, {}, {"age": [30, 12]})
    assert not m({"x-country": "DE"}, {}, {"age": []})
    assert not m({"x-country": "DE"}, {}, {"age": ["old"]})  # wrong type fails, never raises
    assert not m({}, {}, {"age": [30]})


@pytest.mark.parametrize("criterion,value,expected", [
    (Criterion(field="header:x-v", op="eq", value=1), "1.0", True),
    (Criterion(field="header:x-v", op="gt", value=2), "10", True),
    (Criterion(field="header:x-v", op="lt", value=2), "abc", False),
    (Criterion(field="header:x-v", op="eq", value=True), "true", True),
    (Criterion(field="header:x-v", op="exists"), "", True),
    (Criterion(field="param:p", op="le", value=2.5), 2.5, True),
    (Criterion(field="param:p", op="in", value=[1, 2]), 3, False),
])
def test_criterion_operators(criterion: Criterion, value: object, expected: bool) -> None:
    """Each operator compares headers as text (numbers when the bound is a number) and parameters natively."""
    pred = compile_criterion(criterion)
    view = RequestView(headers={"x-v": value}, params={"p": value})  # type: ignore[dict-item]
    assert pred(view) is expected


def test_bad_relations_are_rejected_not_raised() -> None:
    """A relation that cannot compile is reported by update() and the others still apply."""
    r = ShadowRules()
    rejected = r.update(TrafficPolicy(endpoint="e", shadows=[
        ShadowRelation(primary="iris", shadow="iris:2", criteria=[Criterion(field="body:x", op="eq", value=1)]),
        ShadowRelation(primary="iris", shadow="iris:3"),
    ]))
    assert len(rejected) == 1 and "header:<name>" in rejected[0][1]
    assert [t.version for t in r.match("iris", "1", "x", RequestView(), T0)] == ["3"]
    with pytest.raises(CriterionError):
        compile_criterion(Criterion(field="param:x", op="in", value=3))


def test_time_window_and_version_scoping() -> None:
    """A relation applies in [start, end) only, to its primary's versions, never to the shadow itself."""
    r = rules(ShadowRelation(primary="iris:1", shadow="iris:2", start=T0, end=T0 + 3600),
              ShadowRelation(primary="iris", shadow="wine:1", start=T0))
    view = RequestView()
    assert r.match("iris", "1", "x", view, T0 - 1) == []
    assert {(t.model, t.version) for t in r.match("iris", "1", "x", view, T0)} == {("iris", "2"), ("wine", "1")}
    assert [t.model for t in r.match("iris", "1", "x", view, T0 + 3600)] == ["wine"]  # the end is exclusive
    assert [t.model for t in r.match("iris", "7", "x", view, T0)] == ["wine"]
    assert r.match("wine", "1", "x", view, T0) == []


def test_policy_update_replaces_and_deletion_removes() -> None:
    """A new policy for the same endpoint replaces its relations; a deleted policy removes them."""
    r = rules(ShadowRelation(primary="iris", shadow="iris:2"))
    r.update(TrafficPolicy(endpoint="iris", shadows=[ShadowRelation(primary="iris", shadow="iris:3")]))
    assert [t.version for t in r.match("iris", "1", "x", RequestView(), T0)] == ["3"]
    r.update(TrafficPolicy(endpoint="iris", deleted=True))
    assert not r and r.match("iris", "1", "x", RequestView(), T0) == []


def test_relation_edits_and_parsing() -> None:
    """add/remove bump the revision and replace same-pair relations; user input is parsed or explained."""
    rel = ShadowRelation(primary="iris", shadow="iris:2", sample_rate=0.5)
    w = World(models={f"iris:{v}": ModelState(name="iris", version=v, target="serving") for v in "12"})
    p1 = add_relation(None, "iris", rel, now=T0, world=w)
    p2 = add_relation(p1, "iris", ShadowRelation(primary="iris", shadow="iris:2", sample_rate=0.2), now=T0, world=w)
    assert p2.revision == 2 and [s.sample_rate for s in p2.shadows] == [0.2]
    p3 = remove_relation(p2, "iris", "iris:2", now=T0)
    assert p3 is not None and p3.shadows == [] and p3.revision == 3
    assert remove_relation(p3, "iris", "iris:2", now=T0) is None
    with pytest.raises(RelationError, match="name:version"):
        add_relation(None, "iris", ShadowRelation(primary="iris", shadow="iris2"), now=T0, world=w)
    with pytest.raises(RelationError, match=r"shadow iris:9 is not deployed \(serving versions of iris: 1, 2\)"):
        add_relation(None, "iris", ShadowRelation(primary="iris", shadow="iris:9"), now=T0, world=w)
    assert parse_time("14d", T0) == T0 + 14 * 86400 and parse_time("never", T0) is None
    assert parse_time("2030-01-01", T0) == 1893456000.0
    assert parse_where("input:age>=18") == Criterion(field="input:age", op="ge", value=18)
    assert parse_where("header:x-tier=42") == Criterion(field="header:x-tier", op="eq", value="42")
    with pytest.raises(RelationError, match="FIELD OP VALUE"):
        parse_where("age>18")


def limits(**kw: object) -> PressureLimits:
    base: dict[str, object] = dict(pause_queue=100, pause_lag_ms=50.0, pause_p99_ms=20.0, resume_ratio=0.5,
                                   window_s=10.0, lag_window_s=1.0, min_samples=10, min_pause_s=2.0)
    base.update(kw)
    return PressureLimits(**base)  # type: ignore[arg-type]


def test_pressure_queue_hysteresis() -> None:
    """Pause at the queue threshold; no resume between the thresholds or before min_pause_s; resume below."""
    p = Pressure(limits())
    assert p.evaluate(0.0, 99) is None
    tr = p.evaluate(0.0, 100)
    assert tr is not None and tr.state is State.PAUSED and tr.reason == "queue" and p.pauses == 1
    assert p.evaluate(0.5, 10) is None  # below resume, but paused for < min_pause_s
    assert p.evaluate(3.0, 60) is None  # between the thresholds: still paused
    tr = p.evaluate(3.0, 50)
    assert tr is not None and tr.state is State.RUNNING and not p.paused
    assert p.evaluate(3.1, 99) is None and p.pauses == 1  # between thresholds while running: no flap


def test_pressure_loop_lag_window() -> None:
    """A lag spike pauses; it stops counting once it leaves the lag window."""
    p = Pressure(limits())
    p.observe_lag(80.0, 1.0)
    assert p.evaluate(1.0, 0) is not None and p.paused
    p.observe_lag(1.0, 2.5)
    assert p.evaluate(2.5, 0) is None  # the spike has left the window, but min_pause_s holds
    p.observe_lag(1.0, 3.5)
    tr = p.evaluate(3.5, 0)
    assert tr is not None and tr.state is State.RUNNING


def test_pressure_loop_busy_resumes_at_its_own_ratio() -> None:
    """A saturated loop pauses at 90 % busy and resumes below 72 % (busy_resume_ratio), not at 45 %."""
    p = Pressure(limits(pause_busy=0.9, busy_resume_ratio=0.8))
    p.observe_busy(0.95)
    assert p.evaluate(0.0, 0) is not None and p.reason == "loop_busy"
    p.observe_busy(0.75)
    assert p.evaluate(5.0, 0) is None
    p.observe_busy(0.7)
    tr = p.evaluate(5.0, 0)
    assert tr is not None and tr.state is State.RUNNING and tr.busy == 0.7


def test_pressure_primary_p99() -> None:
    """Primary p99 over the sliding window pauses only once enough samples are in, and resumes as it falls."""
    p = Pressure(limits(pause_queue=None, pause_lag_ms=None))
    for i in range(9):
        p.observe_latency(100.0, float(i) * 0.1)
    assert p.evaluate(1.0, 0) is None  # 9 < min_samples
    p.observe_latency(100.0, 1.0)
    assert p.evaluate(1.0, 0) is not None and p.paused
    for i in range(50):
        p.observe_latency(5.0, 12.0 + i * 0.01)  # the slow ones have left the 10 s window
    tr = p.evaluate(12.5, 0)
    assert tr is not None and tr.state is State.RUNNING and p.pauses == 1


def pred(primary_out: object, shadow_out: object, *, at: float = T0, pl: float = 1.0, sl: float = 2.0,
         error: str | None = None, shadow: str = "2") -> ShadowPrediction:
    return ShadowPrediction(request_id="r", primary_model="m", primary_version="1", shadow_model="m",
                            shadow_version=shadow, primary_outputs={"y": primary_out},
                            shadow_outputs={} if error else {"y": shadow_out}, primary_latency_ms=pl,
                            shadow_latency_ms=sl, shadow_error=error, at=at)


def test_window_figures_by_hand() -> None:
    """Agreement, differences and nearest-rank percentiles equal the hand-computed values."""
    w = Window("m:1", "m:2", T0, T0 + 60)
    for a, b in [(1, 1), (2, 2), (0, 1), ("x", "x")]:
        w.add(pred([a], [b]))
    w.add(pred([1], None, error="boom"))
    c = w.result()
    assert (c.count, c.errors, c.agreement, c.mean_abs_diff) == (5, 1, 0.75, None)
    r = Window("m:1", "m:2", T0, T0 + 60)
    for i, (a, b) in enumerate([([1.0, 2.0], [1.5, 2.0]), ([3.0], [1.0])]):
        r.add(pred(a, b, pl=float(10 * (i + 1)), sl=float(i + 1)))
    c = r.result()
    assert c.mean_abs_diff == pytest.approx((0.5 + 0.0 + 2.0) / 3) and c.max_abs_diff == 2.0
    assert c.primary_latency_ms == {"p50": 10.0, "p90": 20.0, "p99": 20.0} and c.agreement is None


def test_windows_close_on_watermark_and_pin_offsets() -> None:
    """A window closes once its partition's event time passes end + grace; open windows pin their first offset."""
    tp = TopicPartition("t", 0)
    ws = Windows(60.0, 5.0)
    ws.add(tp, 10, pred([1], [1], at=T0 + 1))
    ws.add(tp, 11, pred([1], [1], at=T0 + 62))
    assert ws.close() == [] and ws.pinned(tp) == 10
    ws.add(tp, 12, pred([1], [1], at=T0 + 65 + 0.5))
    closed = ws.close()
    assert [w.start for w in closed] == [T0] and ws.pinned(tp) == 11
    ws.add(tp, 13, pred([1], [1], at=T0 + 2))  # its window is closed: late, dropped
    assert ws.late == 1 and [w.start for w in ws.close(wall_now=T0 + 1000)] == [T0 + 60]


def test_criteria_read_asgi_headers_and_numpy_inputs() -> None:
    """The node can pass ASGI header pairs and decoded numpy arrays as they are."""
    import numpy as np

    r = rules(ShadowRelation(primary="iris", shadow="iris:2", criteria=[
        Criterion(field="header:x-tier", op="eq", value="gold"),
        Criterion(field="input:x", op="lt", value=10)]))
    ok = RequestView(headers=[(b"x-tier", b"gold")], inputs={"x": np.array([[1.0, 2.0]])})
    bad = RequestView(headers=[(b"x-tier", b"gold")], inputs={"x": np.array([[1.0, 20.0]])})
    assert r.match("iris", "1", "q", ok, T0) and not r.match("iris", "1", "q", bad, T0)


def test_stale_policies_and_reconcile() -> None:
    """An older policy never replaces a newer one; a snapshot drops endpoints it lacks unless they are newer."""
    r = ShadowRules()
    new = TrafficPolicy(endpoint="a", revision=2, at=T0 + 10, shadows=[ShadowRelation(primary="m", shadow="m:3")])
    old = TrafficPolicy(endpoint="a", revision=1, at=T0, shadows=[ShadowRelation(primary="m", shadow="m:2")])
    r.update(new, received=1.0)
    r.update(old, received=2.0)
    assert [t.version for t in r.match("m", "1", "x", RequestView(), T0)] == ["3"]
    r.update(TrafficPolicy(endpoint="b", at=T0, shadows=[ShadowRelation(primary="n", shadow="n:2")]), received=9.0)
    r.reconcile([], started=5.0)  # `a` was known before the snapshot started: gone; `b` arrived after: kept
    assert r.match("m", "1", "x", RequestView(), T0) == [] and r.match("n", "1", "x", RequestView(), T0)
