"""The comparison processor through a real broker: its figures equal the ones computed by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher, read_topic
from modelcd.events.schemas import ShadowComparison, ShadowPrediction
from modelcd.events.topics import SHADOW_COMPARISONS
from modelcd.shadow.cli import latest_comparisons, report_table
from modelcd.shadow.comparison import ComparisonProcessor

T0 = 1_699_999_980.0  # a multiple of 60, long past: every window is closed by the wall clock once caught up


def sp(i: int, primary: str, shadow: str, p_out: object, s_out: object, p_ms: float, s_ms: float, at: float,
       error: str | None = None) -> ShadowPrediction:
    pm, pv = primary.split(":")
    sm, sv = shadow.split(":")
    return ShadowPrediction(request_id=f"r{i}", primary_model=pm, primary_version=pv, shadow_model=sm,
                            shadow_version=sv, primary_outputs={"label": p_out},
                            shadow_outputs={} if error else {"label": s_out}, primary_latency_ms=p_ms,
                            shadow_latency_ms=s_ms, shadow_error=error, at=at)


# A short session, so the restarted member is not kept waiting for the old one's session to expire.
FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 300, "rebalance_timeout_ms": 3000}

EVENTS = [
    # classifier pair, one window: labels agree on 3 of 4 compared requests, one shadow error
    sp(1, "iris:1", "iris:2", [1], [1], 10.0, 1.0, T0 + 1),
    sp(2, "iris:1", "iris:2", [2], [2], 20.0, 2.0, T0 + 2),
    sp(3, "iris:1", "iris:2", [0], [1], 30.0, 3.0, T0 + 3),
    sp(4, "iris:1", "iris:2", [1], [1], 40.0, 4.0, T0 + 4),
    sp(5, "iris:1", "iris:2", [1], None, 50.0, 9.0, T0 + 5, error="TimeoutError"),
    # regressor pair, two windows
    sp(6, "diab:1", "diab:2", [1.0, 2.0], [1.5, 2.0], 5.0, 6.0, T0 + 10),
    sp(7, "diab:1", "diab:2", [3.0], [1.0], 7.0, 8.0, T0 + 20),
    sp(8, "diab:1", "diab:2", [5.0], [5.25], 3.0, 4.0, T0 + 61),
]


@pytest.mark.timeout(120)
async def test_comparisons_match_hand_computation(broker: EmbeddedBroker) -> None:
    """Published ShadowPredictions -> processor -> ShadowComparisons with the hand-computed figures."""
    async with Publisher(broker.config, source="test") as pub:
        for e in EVENTS:
            await pub.publish(e)
        stop = asyncio.Event()
        proc = ComparisonProcessor(broker.config, pub, window_s=60.0, grace_s=5.0, group_id="cmp-test",
                                   consumer_options=FAST_GROUP)
        task = asyncio.create_task(proc.run(stop=stop))

        async def emitted(n: int) -> None:
            while proc.emitted < n:
                await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(emitted(3), 60)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    got = {(c.primary, c.window_start): c for c, _env, _r in await read_topic(broker.config, SHADOW_COMPARISONS)
           if isinstance(c, ShadowComparison)}
    assert set(got) == {("iris:1", T0), ("diab:1", T0), ("diab:1", T0 + 60)}

    iris = got[("iris:1", T0)]
    assert (iris.shadow, iris.count, iris.errors, iris.agreement) == ("iris:2", 5, 1, 0.75)
    assert iris.mean_abs_diff is None and iris.window_end == T0 + 60
    # nearest rank: p50 of 5 values is the 3rd, p90 and p99 the 5th; the shadow's 4 successes: 2nd, 4th, 4th
    assert iris.primary_latency_ms == {"p50": 30.0, "p90": 50.0, "p99": 50.0}
    assert iris.shadow_latency_ms == {"p50": 2.0, "p90": 4.0, "p99": 4.0}

    diab = got[("diab:1", T0)]
    assert diab.count == 2 and diab.agreement is None and diab.errors == 0
    assert diab.mean_abs_diff == pytest.approx((0.5 + 0.0 + 2.0) / 3) and diab.max_abs_diff == 2.0
    later = got[("diab:1", T0 + 60)]
    assert (later.count, later.mean_abs_diff, later.max_abs_diff) == (1, 0.25, 0.25)

    table = report_table(latest_comparisons(list(got.values()), "diab"))
    assert "diab:2" in table and "0.25" in table and table.count("\n") == 1  # header + the newest window



@pytest.mark.timeout(120)
async def test_open_windows_pin_offsets_across_restart(broker: EmbeddedBroker) -> None:
    """Offsets are committed only past closed windows: after a restart, an open window is rebuilt whole, once."""
    now = time.time()
    events = [sp(1, "iris:1", "iris:2", [1], [1], 1.0, 1.0, T0 + 1), sp(2, "iris:1", "iris:2", [1], [0], 1.0, 1.0, T0 + 2),
              sp(3, "iris:1", "iris:2", [2], [2], 1.0, 1.0, now)]

    async def run_until(pub: Publisher, n: int, clock: Callable[[], float]) -> ComparisonProcessor:
        stop = asyncio.Event()
        proc = ComparisonProcessor(broker.config, pub, window_s=3600.0, grace_s=5.0, group_id="cmp-restart",
                                   wall_clock=clock, consumer_options=FAST_GROUP)
        task = asyncio.create_task(proc.run(stop=stop))

        async def emitted() -> None:
            while proc.emitted < n:
                await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(emitted(), 60)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        return proc

    async with Publisher(broker.config, source="test") as pub:
        for e in events:
            await pub.publish(e)
        await run_until(pub, 1, time.time)  # the old window closes; the current one stays open
        second = await run_until(pub, 1, lambda: now + 10 * 3600)  # later: the open window closes too
    assert second.consumed == 1  # it resumed at the open window's first record, not from the beginning
    got = [c for c, _env, _r in await read_topic(broker.config, SHADOW_COMPARISONS) if isinstance(c, ShadowComparison)]
    assert sorted((c.count, c.agreement) for c in got) == [(1, 1.0), (2, 0.5)]


def test_a_chosen_output_is_compared_instead_of_the_label() -> None:
    """`shadow report --output probabilities`: a classifier's probabilities give differences, its label only
    agreement ("-" for |diff|)."""
    from modelcd.events.schemas import ShadowPrediction
    from modelcd.shadow.comparison import compare_windows

    preds = [ShadowPrediction(request_id=str(i), primary_model="iris", primary_version="1", shadow_model="iris",
                              shadow_version="2", primary_outputs={"label": [0], "probabilities": [0.9, 0.1]},
                              shadow_outputs={"label": [0], "probabilities": [0.7, 0.3]}, at=100.0 + i)
             for i in range(4)]
    (by_label,) = compare_windows(preds, 60.0)
    assert by_label.agreement == 1.0 and by_label.mean_abs_diff is None
    (by_proba,) = compare_windows(preds, 60.0, output="probabilities")
    assert by_proba.agreement is None and by_proba.count == 4
    assert by_proba.mean_abs_diff is not None and abs(by_proba.mean_abs_diff - 0.2) < 1e-9
    assert compare_windows(preds, 60.0, output="nope")[0].mean_abs_diff is None
