"""The rollout controller against a real broker: steps, rollback, restart, operator commands, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import KafkaConfig, Publisher, read_topic
from modelcd.events.schemas import (
    ModelState,
    PredictionLog,
    RolloutPlan,
    RolloutStep,
    Route,
    ShadowPrediction,
    ShadowRelation,
    TrafficPolicy,
    new_id,
)
from modelcd.events.topics import TRAFFIC
from modelcd.rollout.cli import _send
from modelcd.rollout.machine import Phase, make_plan
from modelcd.rollout.service import RolloutController
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

WAIT = 30.0  # seconds: an upper bound on every wait, never a performance threshold


def fast_plan(interval_s: float = 1.0) -> RolloutPlan:
    return make_plan("standard", steps=[1.0, 10.0, 50.0, 100.0], interval_s=interval_s, min_requests=30,
                     min_latency_samples=30, min_divergence_samples=100, max_error_rate_increase=0.1,
                     max_latency_p99_ms=1000.0)


class Sink:
    """The store's target state, as the controller sees it."""

    def __init__(self) -> None:
        self.policies: list[TrafficPolicy] = []

    async def put_traffic(self, policy: TrafficPolicy) -> None:
        self.policies.append(policy)


async def wait_for(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.05)
    assert pred(), what


@contextlib.asynccontextmanager
async def controller(cfg: KafkaConfig, sink: Sink, *, tick: float = 0.1) -> AsyncIterator[RolloutController]:
    stop, ready = asyncio.Event(), asyncio.Event()
    async with RolloutController(cfg, targets=sink, tick=tick) as c:
        task = asyncio.create_task(c.run(stop=stop, ready=ready))
        try:
            async with asyncio.timeout(WAIT):
                await ready.wait()
            yield c
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await task


@contextlib.asynccontextmanager
async def feeder(cfg: KafkaConfig, *, canary_error: float = 0.0, canary_shift: int = 0) -> AsyncIterator[None]:
    """Publish prediction logs of iris:1 (baseline) and iris:2 (canary) until the block ends.

    Inputs repeat (x in 0..49) so the controller pairs identical inputs; the baseline predicts
    x % 3, the canary (x + canary_shift) % 3, so a shifted canary keeps the same label
    distribution but disagrees on every request.
    """
    async def run(pub: Publisher) -> None:
        i = 0
        while True:
            futures = []
            for _ in range(20):
                x = i % 50
                i += 1
                futures.append(await pub.publish_nowait(PredictionLog(
                    request_id=new_id(), model="iris", version="1", endpoint="iris", inputs={"x": [[x]]},
                    outputs={"label": [x % 3]}, latency_ms=5.0)))
                err = canary_error > 0 and (i % round(1 / canary_error) == 0)
                futures.append(await pub.publish_nowait(PredictionLog(
                    request_id=new_id(), model="iris", version="2", endpoint="iris", inputs={"x": [[x]]},
                    outputs={} if err else {"label": [(x + canary_shift) % 3]}, latency_ms=6.0,
                    error="boom" if err else None)))
            await asyncio.gather(*futures)
            await asyncio.sleep(0.1)

    async with Publisher(cfg, "test-node") as pub:
        task = asyncio.create_task(run(pub))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def setup_endpoint(cfg: KafkaConfig) -> None:
    async with Publisher(cfg, "test") as pub:
        await pub.publish(TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)],
                                        sticky_key="user", revision=1))


async def start_rollout(cfg: KafkaConfig, plan: RolloutPlan) -> str:
    rollout_id = new_id()
    async with Publisher(cfg, "cli") as pub:
        await pub.publish(RolloutStep(endpoint="iris", rollout_id=rollout_id, action="start", canary="iris:2",
                                      plan=plan, command=True, command_id=new_id()))
    return rollout_id


async def facts(cfg: KafkaConfig, *, holds: bool = False) -> list[RolloutStep]:
    """The controller's facts in order; holds (too few samples on a busy machine) left out unless asked."""
    return [e for e, _env, _r in await read_topic(cfg, TRAFFIC)
            if isinstance(e, RolloutStep) and not e.command and (holds or e.action != "hold")]


async def policies(cfg: KafkaConfig) -> list[TrafficPolicy]:
    return [e for e, _env, _r in await read_topic(cfg, TRAFFIC) if isinstance(e, TrafficPolicy)]


def canary_weight(p: TrafficPolicy) -> float:
    return sum(r.weight for r in p.routes if (r.model, r.version) == ("iris", "2"))


async def test_healthy_canary_reaches_100_through_every_step(broker: EmbeddedBroker) -> None:
    """A canary that behaves like the baseline is promoted 1 → 10 → 50 → 100 % and completes with a summary."""
    cfg, sink = broker.config, Sink()
    await setup_endpoint(cfg)
    async with controller(cfg, sink) as c, feeder(cfg):
        await start_rollout(cfg, fast_plan())
        await wait_for(lambda: "iris" in c.rollouts and c.rollouts["iris"].phase is Phase.COMPLETED,
                       "the rollout completes")
    got = await facts(cfg)
    assert [(f.action, f.step, f.weight) for f in got] == [
        ("start", 0, 1.0), ("promote", 1, 10.0), ("promote", 2, 50.0), ("promote", 3, 100.0),
        ("complete", 3, 100.0)]
    assert all(f.evidence["verdict"] == "promote" for f in got if f.action == "promote")
    assert got[1].evidence["divergence_method"] == "paired"
    summary = got[-1].evidence["summary"]
    assert summary["totals"]["canary"]["requests"] > 0 and summary["totals"]["canary"]["error_rate"] == 0
    weights = [canary_weight(p) for p in await policies(cfg)]
    assert weights == [0.0, 1.0, 10.0, 50.0, 100.0]
    assert [canary_weight(p) for p in sink.policies] == [1.0, 10.0, 50.0, 100.0]
    assert all(p.sticky_key == "user" for p in sink.policies)


@pytest.mark.parametrize("kind,check", [("errors", "error_rate"), ("diverges", "agreement")])
async def test_bad_canary_rolls_back_at_the_first_step(broker: EmbeddedBroker, kind: str, check: str) -> None:
    """A canary that errors (50 %) or disagrees with the baseline on the same inputs is rolled back at 1 %."""
    cfg, sink = broker.config, Sink()
    await setup_endpoint(cfg)
    bad = {"canary_error": 0.5} if kind == "errors" else {"canary_shift": 1}
    async with controller(cfg, sink) as c, feeder(cfg, **bad):
        await start_rollout(cfg, fast_plan())
        await wait_for(lambda: "iris" in c.rollouts and not c.rollouts["iris"].active, "the rollout ends")
    got = await facts(cfg)
    assert [(f.action, f.step) for f in got] == [("start", 0), ("rollback", 0)]
    rollback = got[-1]
    assert f"{check} fail" in rollback.reason
    failed = [x for x in rollback.evidence["checks"] if x["status"] == "fail"]
    assert [x["name"] for x in failed] == [check]
    assert sink.policies[-1].routes == [Route(model="iris", version="1", weight=100.0)]


async def test_blue_green_judges_shadow_traffic_then_switches(broker: EmbeddedBroker) -> None:
    """Blue-green: the canary shadows the baseline at 0 %, is judged on the paired outputs, then takes 100 %."""
    cfg, sink = broker.config, Sink()
    await setup_endpoint(cfg)
    plan = make_plan("blue-green", interval_s=1.0, min_requests=30, min_latency_samples=30,
                     min_divergence_samples=100, max_error_rate_increase=0.1)

    async def shadow_traffic(pub: Publisher) -> None:
        i = 0
        while True:
            futures = []
            for _ in range(20):
                i += 1
                futures.append(await pub.publish_nowait(ShadowPrediction(
                    request_id=new_id(), primary_model="iris", primary_version="1", shadow_model="iris",
                    shadow_version="2", primary_outputs={"label": {"data": [i % 3]}},
                    shadow_outputs={"label": {"data": [i % 3]}}, primary_latency_ms=5.0, shadow_latency_ms=6.0)))
            await asyncio.gather(*futures)
            await asyncio.sleep(0.1)

    async with controller(cfg, sink) as c, Publisher(cfg, "test-node") as pub:
        await start_rollout(cfg, plan)
        await wait_for(lambda: bool(sink.policies), "the first policy is written")
        first = sink.policies[-1]
        assert first.routes == [Route(model="iris", version="1", weight=100.0, log_rate=plan.log_rate)]
        assert [(x.primary, x.shadow) for x in first.shadows] == [("iris:1", "iris:2")]
        task = asyncio.create_task(shadow_traffic(pub))
        try:
            await wait_for(lambda: c.rollouts["iris"].phase is Phase.COMPLETED, "the rollout completes")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    got = await facts(cfg)
    assert [(f.action, f.weight) for f in got] == [("start", 0.0), ("promote", 100.0), ("complete", 100.0)]
    assert got[1].evidence["divergence_method"] == "paired"
    assert sink.policies[-1].shadows == [] and sink.policies[-1].routes[0].version == "2"


@pytest.mark.slow
async def test_restarted_controller_continues_from_the_same_step(broker: EmbeddedBroker) -> None:
    """Killed at 10 %, a new controller resumes there: every step happens exactly once."""
    cfg, sink = broker.config, Sink()
    await setup_endpoint(cfg)
    async with feeder(cfg):
        stop, ready = asyncio.Event(), asyncio.Event()
        async with RolloutController(cfg, targets=sink, tick=0.1) as first:
            task = asyncio.create_task(first.run(stop=stop, ready=ready))
            await asyncio.wait_for(ready.wait(), WAIT)
            await start_rollout(cfg, fast_plan(interval_s=2.0))
            await wait_for(lambda: "iris" in first.rollouts and first.rollouts["iris"].step == 1, "step 1 reached")
            task.cancel()  # a kill, not a drain
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with controller(cfg, sink) as second:
            r = second.rollouts["iris"]
            assert (r.step, r.weight, r.phase) == (1, 10.0, Phase.RUNNING)
            await wait_for(lambda: second.rollouts["iris"].phase is Phase.COMPLETED, "the rollout completes")
    got = await facts(cfg)
    assert [(f.action, f.step) for f in got] == [
        ("start", 0), ("promote", 1), ("promote", 2), ("promote", 3), ("complete", 3)]
    assert [canary_weight(p) for p in await policies(cfg)] == [0.0, 1.0, 10.0, 50.0, 100.0]


async def test_operator_pause_resume_promote_and_abort(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Commands from the CLI: pause holds the step, resume and promote complete it; abort restores the baseline."""
    cfg, sink = broker.config, Sink()
    env = {**os.environ, "MODELCD_KAFKA_BOOTSTRAP": broker.bootstrap, "MODELCD_KAFKA_IDEMPOTENCE": "false",
           "MODELCD_STORE_URL": str(tmp_path / "store"), "MODELCD_LOG_LEVEL": "warning"}
    async with open_store(str(tmp_path / "store")) as store:  # deployed: policies name serving versions only
        for version in "123":
            await TargetState(store).put_model(ModelState(name="iris", version=version, target="serving"))
    out = await cli(env, "traffic", "set", "iris", "iris:1=100", "--sticky-key", "user")
    assert "iris:1" in out and "100%" in out
    assert (tmp_path / "store" / "targets" / "traffic" / "iris.json").exists()
    async with controller(cfg, sink) as c:
        rid = await start_rollout(cfg, fast_plan(interval_s=3600.0))  # no automatic step in this test
        await wait_for(lambda: "iris" in c.rollouts, "the rollout starts")
        before = await cli(env, "rollout", "status", "iris")  # no traffic: the outlook says so, and the deadline
        assert "waiting for samples: error_rate has none yet" in before and "max_hold" in before
        for action in ("pause", "resume", "promote"):
            assert await _send(cfg, RolloutStep(endpoint="iris", rollout_id=rid, action=action, command=True,  # type: ignore[arg-type]
                                                command_id=new_id()), WAIT) == 0
            if action == "pause":  # the CLI saw the answer; the controller applies it right after publishing
                await wait_for(lambda: c.rollouts["iris"].phase is Phase.PAUSED, "paused")
        await wait_for(lambda: sink.policies[-1].routes[0].version == "2", "the canary takes 100 %")
        assert c.rollouts["iris"].phase is Phase.COMPLETED
        status = await cli(env, "rollout", "status", "iris")
        assert "completed" in status and "launch summary" in status
        await cli(env, "traffic", "set", "iris", "iris:2=100")
        await start_rollout_cli(env, "iris:3")
        await wait_for(lambda: canary3(sink.policies[-1]) > 0, "the second rollout starts")
        assert canary3(sink.policies[-1]) == 1.0
        await cli(env, "rollout", "abort", "iris")
        await wait_for(lambda: sink.policies[-1].routes == [Route(model="iris", version="2", weight=100.0)],
                       "the baseline is restored")
        assert c.rollouts["iris"].phase is Phase.ABORTED
    actions = [f.action for f in await facts(cfg)]
    assert actions == ["start", "pause", "resume", "promote", "complete", "start", "abort"]


def canary3(p: TrafficPolicy) -> float:
    return sum(r.weight for r in p.routes if r.version == "3")


async def start_rollout_cli(env: dict[str, str], to: str) -> None:
    out = await cli(env, "rollout", "start", "iris", "--to", to, "--steps", "1,100", "--interval", "1h")
    assert "start" in out


async def cli(env: dict[str, str], *args: str) -> str:
    """Run `modelcd ARGS` in a subprocess; its stdout, after checking it exited 0."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "modelcd", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, (args, err.decode())
    return out.decode()




async def test_restart_on_an_empty_broker_keeps_the_stored_policy(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A broker that lost its topics, a rollout ended before: the controller keeps the store's revision and shadows."""
    cfg = broker.config
    plan = fast_plan(interval_s=3600.0)
    async with open_store(str(tmp_path / "store")) as store:
        targets = TargetState(store)
        shadow = ShadowRelation(primary="iris", shadow="iris:2", start=1.0, sample_rate=1.0)
        kept = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="2", weight=100.0)],
                             shadows=[shadow], revision=6, reason="rollout r9 abort: iris:1 at 0%", at=30.0)
        await targets.put_traffic(kept)
        await targets.put_rollout("iris", [
            RolloutStep(endpoint="iris", rollout_id="r9", action="start", canary="iris:1", baseline="iris:2",
                        weight=10.0, plan=plan, at=10.0),
            RolloutStep(endpoint="iris", rollout_id="r9", action="abort", canary="iris:1", baseline="iris:2",
                        weight=0.0, at=20.0)])
        stop, ready = asyncio.Event(), asyncio.Event()
        async with RolloutController(cfg, targets=targets, tick=0.1) as c:
            task = asyncio.create_task(c.run(stop=stop, ready=ready))
            await asyncio.wait_for(ready.wait(), WAIT)
            assert c.rollouts["iris"].phase is Phase.ABORTED
            stop.set()
            await asyncio.wait_for(task, WAIT)
        after = await targets.get_traffic("iris")
    assert after is not None and (after.revision, after.shadows) == (6, [shadow])
    assert all(p.revision >= 6 and p.shadows == [shadow] for p in await policies(cfg))
