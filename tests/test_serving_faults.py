"""A serving node under stress: memory budget, broken models, broker outage, graceful stop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher, read_topic
from modelcd.store.blobs import open_store
from modelcd.store.package import assemble_package, read_package

from ._models import MAGIC, faulty_loader
from ._serving import MB, deploy, eventually, infer_body, iris_package, node_settings, running_node


async def test_budget_for_three_serves_ten_and_never_exceeds_it(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """With a budget for 3 models and 10 deployed, all 10 answer and resident bytes never exceed the budget.

    Each model is charged its declared size plus MODELCD_MODEL_OVERHEAD (its worker process), and the spare
    worker its overhead."""
    # Loads on demand happen within the request here (load_wait): this test is about the budget, not load time.
    settings = node_settings(tmp_path, broker.bootstrap, memory_budget=50 * MB, model_overhead=5 * MB, load_wait=30.0,
                             worker_spares=1)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for i in range(10):
            await deploy(store, pub, iris_package(f"m{i}", "1", depth=1 + i % 4), memory_bytes=10 * MB)
        async with running_node(settings) as n:
            assert n.registry.budget == 45 * MB  # the spare worker's room is kept
            assert len(n.registry.loaded_keys()) == 3  # the hot set: what fits, the rest on demand
            assert n.registry.resident_bytes == 3 * (10 * MB + 5 * MB)  # the worker is charged, not only the model
            peak = 0
            stop = asyncio.Event()

            async def watch() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, n.registry.resident_bytes)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            try:
                for _round in range(2):
                    results = await asyncio.gather(*(n.infer(f"m{i}") for i in range(10)))
                    assert [r.status_code for r in results] == [200] * 10, [r.text for r in results]
                    assert [r.json()["model_name"] for r in results] == [f"m{i}" for i in range(10)]
            finally:
                stop.set()
                await watcher
            assert 0 < peak <= 45 * MB
            assert len(n.registry.loaded_keys()) <= 3
            assert n.node.registry.cache.hits > 0  # reloads came from the local cache


async def test_a_model_in_use_is_not_the_one_evicted(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Eviction is least recently *used*: a model answering requests outlives one loaded later and left idle."""
    settings = node_settings(tmp_path, broker.bootstrap, memory_budget=30 * MB, model_overhead=5 * MB, load_wait=30.0,
                             worker_spares=0)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for name in ("a", "b", "c"):
            await deploy(store, pub, iris_package(name, "1"), memory_bytes=10 * MB)
        async with running_node(settings) as n:
            assert (await n.infer("a")).status_code == 200  # evicts one of the hot set (b, c): room for two
            kept = next(k.split(":")[0] for k in n.registry.loaded_keys() if k != "a:1")
            evicted = ({"b", "c"} - {kept}).pop()
            for _ in range(5):  # `kept` serves from its loaded worker, after `a` was loaded
                assert (await n.infer(kept)).status_code == 200
            assert (await n.infer(evicted)).status_code == 200  # needs room: `a` is the least recently used
            assert sorted(n.registry.loaded_keys()) == sorted([f"{kept}:1", f"{evicted}:1"])


async def test_broken_models_leave_the_others_answering(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Models that fail to load, raise at predict, or hang answer 503/500/504 with a reason; others keep answering."""
    settings = node_settings(tmp_path, broker.bootstrap, predict_timeout=1.0, worker_restart_backoff=0.2)
    good = iris_package("good", "1")
    bad = iris_package("badload", "1")
    corrupt = assemble_package(bad.manifest, {bad.manifest.model_file: b"not a skops file",
                                              "samples.json": read_package(bad.data).read("samples.json")})
    loader = faulty_loader
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for built in (good, corrupt, iris_package("raiser", "1"), iris_package("hanger", "1")):
            await deploy(store, pub, built)
        async with running_node(settings, loader=loader) as n:
            magic = infer_body([[MAGIC, 1.0, 1.0, 1.0]])
            r = await n.infer("badload")
            assert r.status_code == 503 and "failed to load" in r.json()["error"]
            r = await n.infer("raiser", magic)
            assert r.status_code == 500 and "boom on purpose" in r.json()["error"]
            assert (await n.infer("raiser")).status_code == 200  # its other requests still work
            hung = [asyncio.create_task(n.infer("hanger", magic)) for _ in range(3)]
            for _ in range(20):  # the loop is never blocked by the hung model
                assert (await n.infer("good")).status_code == 200
            answers = await asyncio.gather(*hung)
            # The hung call timed out and its worker was killed; calls queued behind it timed out too, or
            # failed with the worker (503): never a 500.
            assert answers[0].status_code == 504, answers[0].text
            assert all(r.status_code in (503, 504) for r in answers), [r.text for r in answers]
            r = await n.infer("hanger")
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert "no answer within 1s" in r.json()["error"]
            await eventually(lambda: n.registry.entries["hanger:1"].status == "ready", what="hanger restarted")
            assert (await n.infer("hanger")).status_code == 200
            assert (await n.infer("good")).status_code == 200
            metrics = (await n.client.get("/metrics")).text
            assert 'modelcd_request_errors_total{kind="timeout",model="hanger",version="1"}' in metrics
            assert 'modelcd_model_loads_total{outcome="failed"} 1.0' in metrics
            assert 'modelcd_worker_deaths_total{cause="killed",model="hanger",version="1"} 1.0' in metrics


async def test_broker_down_predictions_keep_succeeding_and_telemetry_resumes(tmp_path: Path,
                                                                             broker: EmbeddedBroker) -> None:
    """With the broker stopped, predictions succeed and the telemetry buffer stays bounded; it resumes after."""
    settings = node_settings(tmp_path, broker.bootstrap, telemetry_buffer=50, prediction_log_rate=1.0,
                             heartbeat_interval=0.2, usage_interval=0.2)
    async with open_store(settings.resolved_store_url) as store:
        async with Publisher(broker.config, "test") as pub:
            await deploy(store, pub, iris_package("steady", "1"))
        async with running_node(settings) as n:
            t = n.node.telemetry
            assert (await n.infer("steady")).status_code == 200
            await broker.stop()
            for _ in range(200):
                assert (await n.infer("steady")).status_code == 200
            assert t.buffered <= 50 and t.stats.dropped > 0
            await broker.start()  # same port, a new (empty, in-memory) broker
            before = t.stats.published
            await eventually(lambda: t.stats.published > before + 5, timeout=60, what="telemetry resumed")
            assert (await n.infer("steady")).status_code == 200
        events = await read_topic(broker.config, "modelcd.health")
        assert any(type(e).__name__ == "NodeStatus" for e, _, _ in events)


async def test_stop_drains_in_flight_requests_then_flushes_telemetry(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Stopping a node reports not ready, finishes the request in flight, and publishes final usage and status."""
    settings = node_settings(tmp_path, broker.bootstrap, usage_interval=3600, heartbeat_interval=3600)
    loader = faulty_loader
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("slow", "1"))
        async with running_node(settings, loader=loader) as n:
            in_flight = asyncio.create_task(n.infer("slow", infer_body([[MAGIC, 1.0, 1.0, 1.0]])))
            await eventually(lambda: n.registry.entries["slow:1"].threads == 1, what="request in flight")
            n.stop.set()
            await eventually(lambda: n.node.state.stopping, what="stopping")
            r = await in_flight
            assert r.status_code == 200
            await asyncio.wait_for(n.task, 30)
        events = [e for e, _, _ in await read_topic(broker.config, "modelcd.usage")]
        assert [(e.model, e.count) for e in events] == [("slow", 1)]
        statuses = [e for e, _, _ in await read_topic(broker.config, "modelcd.health")
                    if type(e).__name__ == "NodeStatus"]
        assert statuses[-1].stopping and not statuses[-1].ready


async def test_a_restart_loads_what_requests_used_before_ready_and_the_rest_after(broker: EmbeddedBroker,
                                                                                  tmp_path: Path) -> None:
    """A node with many models used to load its whole hot set before it answered; with a request history it loads
    the recently requested (and pinned) models first, reports ready, and loads the rest of the hot set after."""
    settings = node_settings(tmp_path, broker.bootstrap, memory_budget=200 * MB, model_overhead=5 * MB,
                             worker_spares=0)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for name in ("a", "b", "c", "d"):
            await deploy(store, pub, iris_package(name, "1"), memory_bytes=10 * MB)
        async with running_node(settings) as n:
            assert n.node.loaded_before_ready == ["a:1", "b:1", "c:1", "d:1"]  # no history: the whole hot set
            assert (await n.infer("c")).status_code == 200
        history = settings.home / "history" / "test-node.json"
        assert set(json.loads(history.read_text())["last_used"]) == {"c:1"}  # saved at stop
        async with running_node(settings) as n:
            assert n.node.loaded_before_ready == ["c:1"]
            await eventually(lambda: len(n.registry.loaded_keys()) == 4, what="the rest of the hot set, after ready")
            assert (await n.infer("a")).status_code == 200
