"""Crash recovery: `modelcd ingest` killed (SIGKILL) while compiling; after a restart the deployment completes
exactly once, with one ModelState."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import DeploymentCompleted, DeployRequested
from modelcd.runtimes.build import build_package

from ._ingest import Watcher

MODELCD = [str(Path(sys.executable).parent / "modelcd")]


def slow_to_compile_package() -> bytes:
    """A large random forest: skl2onnx takes seconds to convert it, so compile is long enough to be killed in."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 20)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=4000) > 0).astype(np.int64)
    forest = RandomForestClassifier(n_estimators=300, random_state=0, n_jobs=1).fit(x, y)
    return build_package(forest, name="forest", version="1", owner="ann", expiry="7d", sample_inputs=x[:5]).data


async def start_ingest(env: dict[str, str], tg: asyncio.TaskGroup) -> asyncio.subprocess.Process:
    """Start `modelcd ingest` and return once it logged that it is ready (its log drained by a task of `tg`)."""
    proc = await asyncio.create_subprocess_exec(*MODELCD, "ingest", env=env, stderr=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.DEVNULL)
    assert proc.stderr is not None
    async with asyncio.timeout(90):
        while b"ingest ready" not in (line := await proc.stderr.readline()):
            assert line, "modelcd ingest exited before it was ready"
    # Keep draining its log so it never blocks on a full pipe; the task ends at the process's exit.
    tg.create_task(proc.stderr.read())
    return proc


@pytest.mark.slow
async def test_killed_during_compile_completes_exactly_once(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """SIGKILL during compile, restart: the request is processed again and ends in one DeploymentCompleted and
    one ModelState."""
    package = tmp_path / "forest.tar"
    package.write_bytes(await asyncio.to_thread(slow_to_compile_package))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="false",
               MODELCD_STORE_URL=str(tmp_path / "store"), MODELCD_INGEST_PORT=str(free_port()),
               MODELCD_HOME=str(tmp_path), MODELCD_LOG_FORMAT="json")
    watcher = Watcher(broker.config)
    async with asyncio.TaskGroup() as tg:
        watching = tg.create_task(watcher.run())
        first = await start_ingest(env, tg)
        request = DeployRequested(model="forest", package_uri=package.as_uri())
        try:
            async with Publisher(broker.config, "test") as pub:
                await pub.publish(request)
            await watcher.wait_for(lambda: ("compile", "started") in watcher.steps(request.deployment_id))
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        assert not (tmp_path / "store" / "targets").exists() and not (tmp_path / "store" / "packages").exists()

        second = await start_ingest(env, tg)
        try:
            outcome = await watcher.outcome(request.deployment_id, timeout=180)
        finally:
            second.send_signal(signal.SIGTERM)
            await second.wait()
        watching.cancel()
    assert isinstance(outcome, DeploymentCompleted) and outcome.runtime == "onnx"
    ends = [e for e in watcher.by_deployment[request.deployment_id] if isinstance(e, DeploymentCompleted)]
    assert len(ends) == 1 and len(watcher.states_of("forest")) == 1
    assert watcher.steps(request.deployment_id).count(("compile", "started")) == 2
    assert second.returncode == 0
