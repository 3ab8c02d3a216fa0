"""The fleet: serving nodes (real processes) behind the front door (Caddy), placement under a steady load."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.fleet.routes import dial
from modelcd.store.blobs import open_store

from ._fleet import Load, eventually, fleet_settings, front_door, owners_now, settled, start_node, stop_node
from ._serving import deploy, infer_body, iris_package

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(240)]

MODELS = [f"m{i}" for i in range(8)]


async def _deploy_all(settings, broker: EmbeddedBroker, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for i, name in enumerate(names):
            await deploy(store, pub, iris_package(name, "1", depth=2 + i % 3))


async def test_add_and_remove_a_node_under_load_fails_no_request(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """3 nodes behind the front door: adding a 4th and removing one move placement, and no request fails."""
    settings = fleet_settings(tmp_path, broker.bootstrap)
    await _deploy_all(settings, broker, MODELS)
    nodes = [await start_node(settings, f"node-{i}", tmp_path) for i in range(3)]
    try:
        async with front_door(settings) as fd:
            await eventually(lambda: settled(fd, {"node-0", "node-1", "node-2"}), 60, "placement on 3 nodes")
            before = owners_now(fd)
            assert all(len(o) == 2 for o in before.values())  # R=2 of 3: each node holds a share, not everything
            load = Load(fd.url, MODELS)
            load.start()
            await eventually(lambda: load.ok > 50, 30, "traffic through the front door")

            nodes.append(await start_node(settings, "node-3", tmp_path))
            await eventually(lambda: settled(fd, {"node-0", "node-1", "node-2", "node-3"}), 60, "placement on 4")
            after_add = owners_now(fd)
            moved = {k for k in before if before[k] != after_add[k]}
            assert moved and all("node-3" in after_add[k] for k in moved)
            served = load.ok
            await eventually(lambda: load.ok > served + 50, 30, "traffic after the move")

            gone = nodes.pop(0)
            assert await stop_node(gone) == 0  # SIGTERM: hands off, then drains
            await eventually(lambda: settled(fd, {"node-1", "node-2", "node-3"}), 60, "placement without node-0")
            served = load.ok
            await eventually(lambda: load.ok > served + 50, 30, "traffic after the removal")
            await load.stop()
            assert load.failures == [], load.failures[:5]
            after_rm = owners_now(fd)
            assert {k for k in after_add if after_add[k] != after_rm[k]} == {
                k for k in after_add if "node-0" in after_add[k]}
    finally:
        for n in nodes:
            await stop_node(n, signal.SIGKILL)


async def test_kill_9_a_node_the_front_door_routes_around_it(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A node killed with SIGKILL: after one health-check period no request goes to it, every model still answers."""
    settings = fleet_settings(tmp_path, broker.bootstrap)
    await _deploy_all(settings, broker, MODELS[:4])
    nodes = [await start_node(settings, f"node-{i}", tmp_path) for i in range(3)]
    try:
        async with front_door(settings) as fd:
            await eventually(lambda: settled(fd, {"node-0", "node-1", "node-2"}), 60, "placement on 3 nodes")
            load = Load(fd.url, MODELS[:4])
            load.start()
            await eventually(lambda: load.ok > 50, 30, "traffic through the front door")
            victim = nodes.pop(1)
            victim.proc.kill()
            killed_at = time.monotonic()
            await victim.proc.wait()
            # Within the health-check period Caddy marks it down; retries cover requests caught on it meanwhile.
            await asyncio.sleep(2 * settings.frontdoor_health_interval)
            # Out of every answer the front door gives Caddy, though its last heartbeat is still fresh.
            assert victim.node_id not in fd.healthy
            assert all(dial(victim.url) not in ups for ups in (fd.table.default, *fd.table.by_upstreams))
            served = load.ok
            await eventually(lambda: load.ok > served + 100, 30, "traffic after the kill")
            late = [f for f in load.failures if f[0] > killed_at + settings.frontdoor_health_interval]
            assert late == [], late[:5]
            # Then the fleet re-places its models on the survivors (R=2 of 2: both hold everything).
            await eventually(lambda: settled(fd, {"node-0", "node-2"}), 60, "placement on the 2 survivors")
            assert dial(victim.url) not in fd.table.default
            await load.stop()
            assert [f for f in load.failures if f[0] > killed_at + settings.frontdoor_health_interval] == []
            async with httpx.AsyncClient(base_url=fd.url) as client:
                for m in MODELS[:4]:
                    assert (await client.post(f"/v2/models/{m}/infer", json=infer_body())).status_code == 200
    finally:
        for n in nodes:
            await stop_node(n, signal.SIGKILL)
