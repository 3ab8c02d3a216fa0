"""A deployment accepted before a crash finishes after the restart, even when the broker lost its topics too:
`modelcd ingest` SIGKILLed during compile, the broker restarted empty, ingest started again."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import DeploymentCompleted, DeployRequested

from ._ingest import Watcher
from .test_ingest_crash import start_ingest


def slow_to_compile_package() -> bytes:
    """A random forest skl2onnx takes a few seconds to convert (smaller than test_ingest_crash's: this test
    compiles it twice too, and only needs compile to be long enough to be killed in)."""
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    from modelcd.runtimes.build import build_package

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 20)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=2000) > 0).astype(np.int64)
    forest = RandomForestClassifier(n_estimators=120, random_state=0, n_jobs=1).fit(x, y)
    return build_package(forest, name="forest", version="1", owner="ann", expiry="7d", sample_inputs=x[:5]).data


@pytest.mark.faults
async def test_killed_during_compile_with_the_broker_lost_completes(tmp_path: Path) -> None:
    """SIGKILL during compile and a broker that comes back empty: ingest publishes the accepted request again
    on start, and the deployment completes; its id answers in the API before and after."""
    package = tmp_path / "forest.tar"
    package.write_bytes(await asyncio.to_thread(slow_to_compile_package))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_IDEMPOTENCE="false", MODELCD_STORE_URL=str(tmp_path / "store"),
               MODELCD_INGEST_PORT=str(port), MODELCD_HOME=str(tmp_path), MODELCD_LOG_FORMAT="json")
    request = DeployRequested(model="forest", package_uri=package.as_uri())
    async with EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu-1.log") as first, \
            asyncio.TaskGroup() as tg:
        watcher = Watcher(first.config)
        watching = tg.create_task(watcher.run())
        proc = await start_ingest({**env, "MODELCD_KAFKA_BOOTSTRAP": first.bootstrap}, tg)
        try:
            async with Publisher(first.config, "test") as pub:
                await pub.publish(request)
            await watcher.wait_for(lambda: ("compile", "started") in watcher.steps(request.deployment_id))
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            watching.cancel()
    assert (tmp_path / "store" / "requests" / f"{request.deployment_id}.json").exists()
    assert not (tmp_path / "store" / "targets").exists()  # killed before publish: nothing of it serves yet

    async with EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu-2.log") as second, \
            asyncio.TaskGroup() as tg:
        watcher = Watcher(second.config)
        watching = tg.create_task(watcher.run())
        proc = await start_ingest({**env, "MODELCD_KAFKA_BOOTSTRAP": second.bootstrap}, tg)
        try:
            outcome = await watcher.outcome(request.deployment_id, timeout=180)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client, asyncio.timeout(30):
                # The API's tracker folds the outcome in a moment after the watcher saw it.
                while (view := (await client.get(f"/deployments/{request.deployment_id}")).json()).get(
                        "status") not in ("completed", "failed"):
                    await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            watching.cancel()
    assert isinstance(outcome, DeploymentCompleted), outcome
    assert view["status"] == "completed" and view["model"] == "forest"
    assert not (tmp_path / "store" / "requests" / f"{request.deployment_id}.json").exists()
    assert len(watcher.states_of("forest")) == 1
