"""`modelcd release roll ENV`: nodes replaced one at a time under a steady load, rolled back when the candidate fails."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from modelcd.events.broker import EmbeddedBroker
from modelcd.fleet.roll import roll

from ._fleet import Load, eventually, fleet_settings, front_door, settled, start_node, stop_node
from ._release import built_wheel, release_env  # noqa: F401 - fixtures
from .test_fleet import MODELS, _deploy_all

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(300)]


async def test_roll_replaces_every_node_with_no_failed_request(broker: EmbeddedBroker, tmp_path: Path,
                                                               release_env: Path) -> None:  # noqa: F811
    """Two nodes rolled to the built wheel's env behind the front door: all replaced, zero failed requests."""
    settings = fleet_settings(tmp_path, broker.bootstrap)
    await _deploy_all(settings, broker, MODELS[:4])
    old = [await start_node(settings, f"node-{i}", tmp_path) for i in range(2)]
    result = None
    try:
        async with front_door(settings) as fd:
            await eventually(lambda: settled(fd, {"node-0", "node-1"}), 60, "placement on 2 nodes")
            load = Load(fd.url, MODELS[:4])
            load.start()
            await eventually(lambda: load.ok > 50, 30, "traffic through the front door")
            lines: list[str] = []
            result = await roll(settings, release_env, workdir=tmp_path / "roll", tag="v2", observe=2.0,
                                say=lines.append)
            assert result.ok, "\n".join(lines)
            new = {n.node_id for n in result.started}
            assert new == {"node-0-v2", "node-1-v2"} and [o for o, _ in result.replaced] == ["node-0", "node-1"]
            for n in old:  # they left by themselves (NodeDrain), exiting cleanly
                assert await asyncio.wait_for(n.proc.wait(), 60) == 0
            await eventually(lambda: settled(fd, new), 60, "placement on the new nodes")
            served = load.ok
            await eventually(lambda: load.ok > served + 50, 30, "traffic on the new nodes")
            await load.stop()
            assert load.failures == [], load.failures[:5]
            assert all(str(release_env) in n.python for n in result.started)
    finally:
        for n in old:
            await stop_node(n, signal.SIGKILL)
        for launched in (result.started if result else []):
            launched.proc.kill()
            launched.proc.wait()


async def test_roll_of_a_candidate_that_cannot_start_rolls_back_and_leaves_old_nodes(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A candidate whose node exits at start: the roll fails with its reason, the old nodes serve on untouched."""
    settings = fleet_settings(tmp_path, broker.bootstrap)
    await _deploy_all(settings, broker, MODELS[:2])
    bad = tmp_path / "bad-env"
    (bad / "bin").mkdir(parents=True)
    (bad / "bin" / "python").write_text("#!/bin/sh\necho 'ImportError: this release is broken' >&2\nexit 3\n")
    (bad / "bin" / "python").chmod(0o755)
    old = [await start_node(settings, f"node-{i}", tmp_path) for i in range(2)]
    try:
        async with front_door(settings) as fd:
            await eventually(lambda: settled(fd, {"node-0", "node-1"}), 60, "placement on 2 nodes")
            load = Load(fd.url, MODELS[:2])
            load.start()
            await eventually(lambda: load.ok > 30, 30, "traffic")
            lines: list[str] = []
            result = await roll(settings, bad, workdir=tmp_path / "roll", tag="v2", say=lines.append)
            assert not result.ok and "exited with code 3" in result.reason and "this release is broken" in result.reason
            assert result.replaced == [] and "rolling back" in lines
            served = load.ok
            await eventually(lambda: load.ok > served + 30, 30, "traffic after the failed roll")
            await load.stop()
            assert load.failures == []
            assert all(n.proc.returncode is None for n in old)  # untouched: still running
            assert settled(fd, {"node-0", "node-1"})
    finally:
        for n in old:
            await stop_node(n, signal.SIGKILL)
