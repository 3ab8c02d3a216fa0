"""Shadowing on a real serving node (real broker, store, sklearn models): off the request path, never in the way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from structlog.testing import capture_logs

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.events.codec import decode
from modelcd.events.schemas import Criterion, PredictionLog, Route, ShadowPrediction, ShadowRelation, TrafficPolicy
from modelcd.events.topics import PREDICTIONS, SHADOW_PREDICTIONS
from modelcd.serving.registry import default_loader
from modelcd.store.blobs import open_store

from ._serving import deploy, eventually, infer_body, iris_package, iris_rows, node_settings, running_node, set_traffic


def policy(*shadows: ShadowRelation, revision: int) -> TrafficPolicy:
    return TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)],
                         shadows=list(shadows), revision=revision, at=time.time())


async def read_all(broker: EmbeddedBroker, topic: str) -> list[Any]:
    """Every event of `topic`, read until the broker has nothing more for a second.

    Not `bus.read_topic`: the embedded broker answered a latest offset of 27 for a partition holding
    40 records written in batches, so a reader that stops at the reported end misses the last batch.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or range(3))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        idle = 0
        while idle < 2:
            batches = await consumer.getmany(timeout_ms=500)
            idle = 0 if batches else idle + 1
            out += [decode(topic, r.value, r.headers)[0] for records in batches.values() for r in records]
        return out
    finally:
        await consumer.stop()


async def shadow_records(broker: EmbeddedBroker) -> list[ShadowPrediction]:
    return [e for e in await read_all(broker, SHADOW_PREDICTIONS) if isinstance(e, ShadowPrediction)]


async def test_full_shadow_one_record_per_request_and_identical_answers(broker: EmbeddedBroker,
                                                                         tmp_path: Path) -> None:
    """100 % shadow: every request yields one ShadowPrediction with both outputs; answers equal the unshadowed ones."""
    # The client shares the node's loop here, keeping it busy: the busy-share pause is off so every request shadows.
    settings = node_settings(tmp_path, broker.bootstrap, prediction_log_rate=1.0, shadow_pause_busy=0.0)
    rows = iris_rows(40)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1", depth=3))
        await deploy(store, pub, iris_package("iris", "2", depth=1))  # a worse model: outputs differ sometimes
        await set_traffic(store, pub, policy(revision=1))
        async with running_node(settings) as n:
            async def ask(i: int) -> Any:
                r = await n.infer("iris", infer_body([rows[i]], id=f"req-{i}"))
                assert r.status_code == 200, r.text
                return r.json()

            plain = await asyncio.gather(*(ask(i) for i in range(len(rows))))
            await set_traffic(store, pub, policy(ShadowRelation(primary="iris", shadow="iris:2"), revision=2))
            await eventually(lambda: bool(n.node.shadow.rules), what="shadow relation applied")
            shadowed = await asyncio.gather(*(ask(i) for i in range(len(rows))))
            assert list(shadowed) == list(plain)
            await eventually(lambda: n.node.shadow.completed == len(rows), what="shadow predictions")
            metrics = (await n.client.get("/metrics")).text
            assert f"modelcd_shadow_completed_total {float(len(rows))}" in metrics
        records = await shadow_records(broker)
        logs = [e for e in await read_all(broker, PREDICTIONS) if isinstance(e, PredictionLog)]
    assert sorted(r.request_id for r in records) == sorted(f"req-{i}" for i in range(len(rows)))
    by_id = {r.request_id: r for r in records}
    for i, answer in enumerate(shadowed):
        r = by_id[f"req-{i}"]
        assert (r.primary_model, r.primary_version, r.shadow_model, r.shadow_version) == ("iris", "1", "iris", "2")
        assert r.shadow_error is None and r.shadow_outputs
        assert r.primary_outputs["label"]["data"] == next(o["data"] for o in answer["outputs"]
                                                          if o["name"] == "label")
    # logged once, not twice: the shadowed requests are in shadow-predictions, not in the prediction log
    assert sorted(p.request_id for p in logs) == sorted(f"req-{i}" for i in range(len(rows)))


class SlowShadow:
    """iris:2's runtime, slowed down, so shadow work piles up behind the node's shadow workers."""

    def __init__(self, runtime: Any, delay: float) -> None:
        self.runtime = runtime
        self.delay = delay

    def predict(self, inputs: Any) -> Any:
        time.sleep(self.delay)
        return self.runtime.predict(inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)


def slow_loader(pkg: Any) -> Any:
    runtime = default_loader(pkg)
    return SlowShadow(runtime, 0.05) if pkg.manifest.version == "2" else runtime


async def test_overload_pauses_shadowing_then_resumes(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Under overload shadowing pauses (metric and log), every primary request still succeeds, then it resumes."""
    settings = node_settings(tmp_path, broker.bootstrap, shadow_workers=1, shadow_pause_queue=5,
                             shadow_pause_lag_ms=0.0, shadow_pause_busy=0.0, prediction_log_rate=0.0)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1", depth=3))
        await deploy(store, pub, iris_package("iris", "2", depth=1))
        await set_traffic(store, pub, policy(ShadowRelation(primary="iris", shadow="iris:2"), revision=1))
        with capture_logs() as logs:
            async with running_node(settings, loader=slow_loader) as n:
                ex = n.node.shadow
                statuses = await asyncio.gather(*(n.infer("iris") for _ in range(60)))
                assert [r.status_code for r in statuses] == [200] * 60
                await eventually(lambda: ex.pauses >= 1, what="a pause")
                metrics = (await n.client.get("/metrics")).text
                assert "modelcd_shadow_pauses_total 1.0" in metrics or ex.pauses > 1
                await eventually(lambda: not ex.paused, timeout=30, what="resume")
                done = ex.completed
                assert (await n.infer("iris")).status_code == 200
                await eventually(lambda: ex.completed == done + 1, what="shadowing again after the pause")
                assert ex.dropped_paused + ex.dropped_full > 0
    events = [e["event"] for e in logs]
    assert "shadowing paused" in events and "shadowing resumed" in events


async def test_criteria_sampling_and_end_time_on_the_node(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Only matching requests are shadowed, 10 % of them (the deterministic set, ±3 points), and none after the end."""
    from modelcd.shadow.criteria import sample

    settings = node_settings(tmp_path, broker.bootstrap, prediction_log_rate=0.0, shadow_pause_busy=0.0)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1", depth=3))
        await deploy(store, pub, iris_package("iris", "2", depth=1))
        await deploy(store, pub, iris_package("iris", "3", depth=2))
        async with running_node(settings) as n:
            # The end is set once the node is up: its start (model workers) must not eat the window.
            end = time.time() + 3.0
            await set_traffic(store, pub, policy(
                ShadowRelation(primary="iris", shadow="iris:2", sample_rate=0.1,
                               criteria=[Criterion(field="header:x-country", op="eq", value="DE")]),
                ShadowRelation(primary="iris:1", shadow="iris:3", end=end), revision=1))
            await eventually(lambda: bool(n.node.shadow.rules), what="relations applied")
            before_end = [f"early-{i}" for i in range(5)]
            answers = await asyncio.gather(*(n.infer("iris", infer_body(id=rid)) for rid in before_end))
            assert [r.status_code for r in answers] == [200] * len(before_end)
            assert time.time() < end  # five in-process requests take milliseconds, well inside the window
            ids = [f"req-{i}" for i in range(600)]
            await asyncio.sleep(max(0.0, end - time.time()))
            for start in range(0, len(ids), 50):  # 50 at a time: the decisions depend on ids, not on order
                answers = await asyncio.gather(*(
                    n.infer("iris", infer_body(id=rid), headers={"x-country": "DE" if i % 2 == 0 else "FR"})
                    for i, rid in enumerate(ids[start:start + 50], start)))
                assert [r.status_code for r in answers] == [200] * len(answers)
            de = [rid for i, rid in enumerate(ids) if i % 2 == 0]
            expected = {rid for rid in de if sample(rid, 0.1, "iris")}
            await eventually(lambda: n.node.shadow.completed == len(before_end) + len(expected),
                             what="shadow predictions")
        records = await shadow_records(broker)
    to3 = {r.request_id for r in records if r.shadow_version == "3"}
    to2 = {r.request_id for r in records if r.shadow_version == "2"}
    assert to3 == set(before_end)  # the time-limited relation stopped by itself
    assert to2 == expected  # only DE requests, and exactly the deterministic 10 % of them
    # The ids are fixed, so this share is fixed too; the bound documents how far from 10 % it may be (±3 points on
    # 300 requests is 1.7 binomial sigma; the ids here give it exactly, the assertion guards the hash's uniformity).
    assert abs(len(to2) / len(de) - 0.10) <= 0.03
