"""The shadow executor with fake models: one record per shadowed request, failures contained, bounded, pausable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from structlog.testing import capture_logs

from modelcd.events.schemas import ShadowPrediction, ShadowRelation, TrafficPolicy
from modelcd.shadow.executor import ExecutorConfig, PrimaryResult, ShadowExecutor
from modelcd.shadow.pressure import PressureLimits

NO_PRESSURE = PressureLimits(pause_queue=None, pause_lag_ms=None, pause_p99_ms=None, pause_busy=None)


class Models:
    """Fake shadow models: 'ok' doubles x, 'boom' raises, 'hang' never answers, 'gated' waits for `gate`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, str, Mapping[str, Any]]] = []

    async def predict(self, model: str, version: str, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        self.calls.append((model, version, inputs))
        if model == "boom":
            raise ValueError("shadow exploded")
        if model == "hang":
            await asyncio.Event().wait()
        if model == "gated":
            await self.gate.wait()
        return {"y": [2 * v for v in inputs["x"]]}, 0.5


def policy(*shadows: str, rate: float = 1.0) -> TrafficPolicy:
    return TrafficPolicy(endpoint="m", shadows=[ShadowRelation(primary="m", shadow=s, sample_rate=rate)
                                                for s in shadows])


def primary(i: int) -> PrimaryResult:
    return PrimaryResult(request_id=f"req-{i}", model="m", version="1", inputs={"x": [i]},
                         outputs={"y": [2 * i]}, latency_ms=1.0)


@contextlib.asynccontextmanager
async def running(ex: ShadowExecutor) -> AsyncIterator[ShadowExecutor]:
    ready = asyncio.Event()
    task = asyncio.create_task(ex.run(ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield ex
    finally:
        ex.stop()
        await asyncio.wait_for(task, 10)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


async def test_every_shadowed_request_yields_one_record() -> None:
    """With a 100 % shadow, each request produces exactly one ShadowPrediction with its id and both outputs."""
    models, out = Models(), []
    ex = ShadowExecutor(predict=models.predict, emit=out.append, node="n1",
                        config=ExecutorConfig(limits=NO_PRESSURE))
    ex.update_policy(policy("ok:2"))
    async with running(ex):
        assert all(ex.offer(primary(i)) == 1 for i in range(200))
        await until(lambda: len(out) == 200)
    assert sorted(p.request_id for p in out) == sorted(f"req-{i}" for i in range(200))
    for p in out:
        i = int(p.request_id.split("-")[1])
        assert p.primary_outputs == {"y": [2 * i]} and p.shadow_outputs == {"y": [2 * i]}
        assert (p.shadow_model, p.shadow_version, p.node, p.shadow_error) == ("ok", "2", "n1", None)
    assert (ex.submitted, ex.completed, ex.errors, ex.dropped_full) == (200, 200, 0, 0)


async def test_failing_and_hanging_shadows_become_error_records() -> None:
    """A shadow that raises or hangs yields records with shadow_error; offer() returns at once and never raises."""
    models, out = Models(), []
    ex = ShadowExecutor(predict=models.predict, emit=out.append,
                        config=ExecutorConfig(timeout_s=0.05, workers=4, limits=NO_PRESSURE))
    ex.update_policy(policy("boom:1", "hang:1", "ok:2"))
    async with running(ex):
        for i in range(10):
            assert ex.offer(primary(i)) == 3
        await until(lambda: len(out) == 30)
    errors = {p.shadow_model: p.shadow_error for p in out if p.shadow_error}
    assert errors["boom"] == "ValueError: shadow exploded" and errors["hang"].startswith("timeout")
    assert sum(1 for p in out if p.shadow_model == "ok" and p.shadow_error is None) == 10
    assert (ex.errors, ex.timeouts, ex.completed) == (20, 10, 30)


async def test_emit_failure_is_counted_not_raised() -> None:
    """A publisher that fails loses that record (counted) and the worker carries on."""
    models = Models()

    async def emit(event: ShadowPrediction) -> None:
        raise RuntimeError("telemetry buffer full")

    ex = ShadowExecutor(predict=models.predict, emit=emit, config=ExecutorConfig(limits=NO_PRESSURE))
    ex.update_policy(policy("ok:2"))
    async with running(ex):
        for i in range(5):
            ex.offer(primary(i))
        await until(lambda: ex.emit_errors == 5)
    assert ex.completed == 5


async def test_queue_is_bounded_and_drops_are_counted() -> None:
    """Beyond queue_size, shadow jobs are dropped and counted; the caller is never blocked."""
    models, out = Models(), []
    ex = ShadowExecutor(predict=models.predict, emit=out.append,
                        config=ExecutorConfig(queue_size=5, limits=NO_PRESSURE))
    ex.update_policy(policy("ok:2"))
    for i in range(12):  # workers not started yet: nothing drains the queue
        ex.offer(primary(i))
    assert (ex.submitted, ex.dropped_full, ex.queue_depth) == (5, 7, 5)
    async with running(ex):
        await until(lambda: len(out) == 5)
    assert ex.metrics()["modelcd_shadow_dropped_full_total"] == 7


async def test_unmatched_and_sampled_out_requests_are_not_shadowed() -> None:
    """Requests to other models, and those sampled out, produce nothing (and report 0 shadows)."""
    models, out = Models(), []
    ex = ShadowExecutor(predict=models.predict, emit=out.append, config=ExecutorConfig(limits=NO_PRESSURE))
    ex.update_policy(policy("ok:2", rate=0.1))
    other = PrimaryResult(request_id="x", model="other", version="1", inputs={}, outputs={}, latency_ms=1.0)
    async with running(ex):
        assert ex.offer(other) == 0
        shadowed = sum(ex.offer(primary(i)) for i in range(1000))
        await until(lambda: len(out) == shadowed)
    assert 0 < shadowed < 1000 and ex.matched == shadowed


async def test_pressure_pauses_sheds_and_resumes() -> None:
    """A full queue pauses shadowing (logged, counted, queued work shed); it resumes once the queue drains."""
    models, out = Models(), []
    limits = PressureLimits(pause_queue=5, pause_lag_ms=None, pause_p99_ms=None, pause_busy=None, min_pause_s=0.0)
    ex = ShadowExecutor(predict=models.predict, emit=out.append,
                        config=ExecutorConfig(queue_size=50, workers=1, probe_interval_s=0.01, limits=limits))
    ex.update_policy(policy("gated:1"))
    with capture_logs() as logs:
        async with running(ex):
            for i in range(20):  # the one worker is stuck on the gate: the queue fills
                ex.offer(primary(i))
            await until(lambda: ex.paused)
            assert ex.offer(primary(99)) == 1 and ex.dropped_paused >= 1
            models.gate.set()
            await until(lambda: not ex.paused)
            before = len(out)
            ex.offer(primary(100))
            await until(lambda: len(out) == before + 1)
    assert ex.pauses == 1 and ex.metrics()["modelcd_shadow_pauses_total"] == 1
    assert ex.submitted == 21 and ex.dropped_paused + len(out) == 22  # every offer accounted for
    events = [e["event"] for e in logs]
    assert "shadowing paused" in events and "shadowing resumed" in events


async def test_a_failing_shadow_is_logged_once_not_per_request() -> None:
    """A shadow that fails on every request (e.g. a version that does not serve) logs one line, not 50;
    every failure is still published and counted."""
    models, out = Models(), []
    ex = ShadowExecutor(predict=models.predict, emit=out.append, config=ExecutorConfig(limits=NO_PRESSURE))
    ex.update_policy(policy("boom:1"))
    with capture_logs() as logs:
        async with running(ex):
            for i in range(50):
                ex.offer(primary(i))
            await until(lambda: len(out) == 50)
    failed = [e for e in logs if e["event"] == "shadow failed"]
    assert len(failed) == 1 and failed[0]["shadow"] == "boom:1"
    assert ex.errors == 50 and all(p.shadow_error for p in out)
