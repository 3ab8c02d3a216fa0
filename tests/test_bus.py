"""The bus against a real broker: round trips, poison records, commits, state reads."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from modelcd.events import Consumer, Envelope, Publisher, read_state, read_topic
from modelcd.events.broker import EmbeddedBroker
from modelcd.events.schemas import (
    ALL_EVENTS,
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentProgress,
    DeployRequested,
    Event,
    LoadedModel,
    ModelHealth,
    ModelState,
    NodeDrain,
    NodeStatus,
    PredictionLog,
    RetirementDecision,
    RetirementWarning,
    RetireRequested,
    RolloutStep,
    Route,
    ShadowComparison,
    ShadowPrediction,
    ShadowRelation,
    TrafficPolicy,
    UsageReport,
)


def one_of_each() -> list[Event]:
    return [
        DeployRequested(model="iris", package_uri="file:///tmp/p.tar", owner="ann", expiry_seconds=3600),
        RetireRequested(model="iris", version="1", reason="done"),
        DeploymentProgress(deployment_id="d1", step="validate", status="succeeded", duration_ms=1.5),
        DeploymentCompleted(deployment_id="d1", model="iris", version="1", sha256="ab" * 32),
        DeploymentFailed(deployment_id="d2", step="compile", reason="bad"),
        ModelState(name="iris", version="1", target="serving", sha256="ab" * 32, owner="ann", expiry_seconds=60),
        TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)],
                      shadows=[ShadowRelation(primary="iris", shadow="iris:2", sample_rate=0.5)]),
        RolloutStep(endpoint="iris", rollout_id="r1", action="promote", step=1, weight=10.0),
        PredictionLog(request_id="r", model="iris", version="1", inputs={"x": [[1.0]]}, outputs={"y": [0]}),
        ShadowPrediction(request_id="r", primary_model="iris", primary_version="1", shadow_model="iris",
                         shadow_version="2"),
        ShadowComparison(primary="iris:1", shadow="iris:2", window_start=0.0, window_end=60.0, count=3,
                         agreement=1.0),
        UsageReport(model="iris", version="1", node="n1", interval_start=0.0, interval_end=10.0, count=4,
                    last_used=9.0),
        NodeStatus(node="n1", ready=True, models=[LoadedModel(name="iris", version="1", sha256="ab")]),
        ModelHealth(node="n1", model="iris", version="1", ok=True),
        NodeDrain(node="n1", reason="replaced by a new release"),
        RetirementWarning(model="iris", version="1", owner="ann", last_used=1.0, retire_at=2.0),
        RetirementDecision(model="iris", version="1", action="retire", reason="unused"),
    ]


def test_every_event_type_is_covered() -> None:
    """The round-trip test below covers every event type the schemas define."""
    assert {type(e) for e in one_of_each()} == set(ALL_EVENTS)


async def test_round_trip_every_event(broker: EmbeddedBroker) -> None:
    """Each event published comes back equal, with its CloudEvents headers, on its own topic."""
    events = one_of_each()
    async with Publisher(broker.config, "test") as pub:
        for e in events:
            await pub.publish(e)
    got: list[tuple[Event, Envelope, object]] = []
    for topic in sorted({type(e).topic for e in events}):
        got.extend(await read_topic(broker.config, topic))
    assert sorted(map(repr, (g[0] for g in got))) == sorted(map(repr, events))
    for event, env, record in got:
        headers = dict(record.headers)
        assert headers["ce_specversion"] == b"1.0"
        assert headers["ce_type"].decode() == event.ce_type() == env.type
        assert headers["ce_source"] == b"test"
        assert headers["content-type"] == b"application/json"
        assert env.id and env.time
        assert record.key.decode() == event.key()


async def test_consumer_skips_garbage_and_goes_on(broker: EmbeddedBroker) -> None:
    """A garbage record between two good ones is skipped and reported; both good ones are handled."""
    cfg = broker.config
    producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, acks="all")
    await producer.start()
    # Same key: one partition, so the order is fixed.
    async with Publisher(cfg, "test") as pub:
        await pub.publish(UsageReport(model="m", version="1", node="a", interval_start=0, interval_end=1,
                                      count=1, last_used=1))
        await producer.send_and_wait("modelcd.usage", b"\x00not json{", key=b"m")
        await producer.send_and_wait("modelcd.usage", b'{"type":"modelcd.usage.report.v1"}', key=b"m")
        await pub.publish(UsageReport(model="m", version="1", node="b", interval_start=0, interval_end=1,
                                      count=2, last_used=1))
    await producer.stop()
    seen: list[str] = []
    done = asyncio.Event()

    async def handler(event: Event, env: Envelope) -> None:
        assert isinstance(event, UsageReport)
        seen.append(event.node)
        if len(seen) == 2:
            done.set()

    consumer = Consumer(cfg, ["modelcd.usage"], "g-garbage", handler)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    assert seen == ["a", "b"]
    assert consumer.stats.skipped_undecodable == 2
    assert "missing required field" in (consumer.stats.last_error or "") or consumer.stats.last_error


async def test_commit_only_after_handler_success(broker: EmbeddedBroker) -> None:
    """A handler that fails every attempt does not stop the loop; committed offsets resume after restarts."""
    cfg = broker.config
    async with Publisher(cfg, "test") as pub:
        for node in ["ok1", "bad", "ok2"]:
            await pub.publish(UsageReport(model="m", version="1", node=node, interval_start=0, interval_end=1,
                                          count=1, last_used=1))
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(event: Event, env: Envelope) -> None:
        assert isinstance(event, UsageReport)
        if event.node == "bad":
            raise RuntimeError("boom")
        handled.append(event.node)
        if event.node == "ok2":
            done.set()

    consumer = Consumer(cfg, ["modelcd.usage"], "g-commit", handler, max_attempts=2)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(done.wait(), 30)
    consumer.stop()
    await asyncio.wait_for(task, 10)
    assert handled == ["ok1", "ok2"]
    assert consumer.stats.handler_errors == 2

    # The group's committed offsets cover all three records, the failed one included (skipped, not stuck).
    reader = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, group_id="g-commit", enable_auto_commit=False)
    await reader.start()
    try:
        committed = [await reader.committed(TopicPartition("modelcd.usage", p)) for p in range(3)]
    finally:
        await reader.stop()
    assert sum(c or 0 for c in committed) == 3


async def test_read_state_takes_last_write_per_key(broker: EmbeddedBroker) -> None:
    """Reading a state topic from the beginning yields the last write of each key."""
    async with Publisher(broker.config, "test") as pub:
        await pub.publish(ModelState(name="a", version="1", target="serving"))
        await pub.publish(ModelState(name="b", version="1", target="serving"))
        await pub.publish(ModelState(name="a", version="1", target="retired", reason="r"))
    state = await read_state(broker.config, "modelcd.model-state")
    assert set(state) == {"a:1", "b:1"}
    assert isinstance(state["a:1"], ModelState) and state["a:1"].target == "retired"
    assert state["b:1"].target == "serving"  # type: ignore[attr-defined]


async def test_read_empty_topic(broker: EmbeddedBroker) -> None:
    """A state topic nobody has written to reads as empty, without hanging."""
    assert await read_state(broker.config, "modelcd.traffic") == {}


async def test_a_consumer_that_will_not_stop_is_abandoned_with_its_connections_closed() -> None:
    """A drain never waits on the broker for ever: aiokafka's stop() awaits a pending JoinGroup the broker may hold
    for the rebalance timeout (minutes); `stop_consumer` gives up after its timeout and closes the connections."""
    import types

    from modelcd.events.bus import stop_consumer

    closed = asyncio.Event()

    async def close() -> None:
        closed.set()

    class Stuck:
        _client = types.SimpleNamespace(_client_id="stuck", close=close)

        async def stop(self) -> None:
            await asyncio.Event().wait()  # the broker never answers

    async with asyncio.timeout(30):  # the test's own guard, far above the 0.2 s asked for
        await stop_consumer(Stuck(), timeout=0.2)  # type: ignore[arg-type]
    assert closed.is_set()


async def test_wait_for_never_loses_a_cancellation() -> None:
    """Python 3.11's asyncio.wait_for returns the result when a cancellation arrives just as what it waits for
    completes, losing the cancellation: a loop around it never ends (ingest's drain hung 300 s on the console's
    render loop so). modelcd.runner.wait_for, which every part uses, does not."""
    from modelcd.runner import wait_for

    woken = asyncio.Event()

    async def loop() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(woken.wait(), 5)
            woken.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    woken.set()
    task.cancel()  # in the same turn as the wake-up
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done and task.cancelled()
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.Event().wait(), 0.01)
    assert await wait_for(asyncio.sleep(0, "x"), 5) == "x"


def test_no_part_uses_asyncio_wait_for() -> None:
    """The flawed asyncio.wait_for stays out of the project's code (tests may use it)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for part in ("events", "store", "placement", "runtimes", "ingest",
                                                      "serving", "shadow", "rollout", "retirement", "fleet",
                                                      "console", "modelcd")
                 for p in (root / part).rglob("*.py") if "asyncio.wait_for(" in p.read_text()]
    assert offenders == []
