"""The console's feed against a real broker, and its streams when the ingest service drains."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from modelcd.console.feed import Feed
from modelcd.console.state import ConsoleState
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher, ensure_topics
from modelcd.events.schemas import DeploymentProgress, ModelState, NodeStatus, Route, TrafficPolicy
from modelcd.events.topics import HEALTH

from ._ingest import running_ingest, settings_for

WAIT = 30.0  # an upper bound on every wait, never a performance threshold


async def until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_feed_folds_history_then_live_events_once_and_skips_poison(broker: EmbeddedBroker) -> None:
    """Events already on the topics are folded on start, new ones as they come, each once; an undecodable record
    is counted and skipped without stopping the feed."""
    cfg = broker.config
    await ensure_topics(cfg)
    async with Publisher(cfg, "test") as pub:
        await pub.publish(ModelState(name="iris", version="1", target="serving"))
        await pub.publish(TrafficPolicy(endpoint="web", routes=[Route(model="iris", version="1", weight=100.0)]))
    producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(HEALTH, b"{not json", key=b"n1")
    finally:
        await producer.stop()
    state = ConsoleState()
    changes: list[frozenset[str]] = []
    feed = Feed(cfg, state, changes.append)
    task = asyncio.create_task(feed.run())
    try:
        async with asyncio.timeout(WAIT):
            await feed.caught_up.wait()
        await until(lambda: "iris:1" in state.models and "web" in state.policies, "history folded")
        assert feed.status == "live" and state.counters.undecodable == 1
        async with Publisher(cfg, "test") as pub:
            await pub.publish(DeploymentProgress(deployment_id="d1", model="iris", version="2", step="validate",
                                                 status="started"))
            await pub.publish(NodeStatus(node="n1", ready=True))
        await until(lambda: "n1" in state.nodes and state.deployments.deployment("d1") is not None, "live events")
        assert state.counters.events == 4  # each event folded once
        assert any("fleet" in c for c in changes) and any("deployments" in c for c in changes)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_open_console_stream_ends_cleanly_when_ingest_drains(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Stopping the service closes the console's live streams first, so they end with a complete response (not
    cut by the HTTP server's drain deadline)."""
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path / "home")
    url = f"http://127.0.0.1:{settings.ingest_port}"
    received = bytearray()
    async with running_ingest(settings) as watcher:
        client = httpx.AsyncClient(timeout=WAIT)
        stream = client.stream("GET", f"{url}/console/events")
        response = await stream.__aenter__()
        assert response.status_code == 200
        chunks = response.aiter_bytes()
        while b'"id":"status"' not in received:
            received += await asyncio.wait_for(chunks.__anext__(), WAIT)
        reading = asyncio.create_task(_drain(chunks, received))
        assert watcher is not None  # leaving the block stops the service: the stream must end by itself
    try:
        await asyncio.wait_for(reading, WAIT)  # raises httpx.RemoteProtocolError if the stream was cut
    finally:
        await stream.__aexit__(None, None, None)
        await client.aclose()
    assert b'"id":"fleet"' in received


async def _drain(chunks, into: bytearray) -> None:  # type: ignore[no-untyped-def]
    async for chunk in chunks:
        into += chunk
