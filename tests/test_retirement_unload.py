"""Auto-retirement end to end: retirement processor → ingest → a running serving node unloads the model.

Everything real: the broker, the ingest service (which turns the processor's RetireRequested into
the retired target state and ModelState), a serving node that reports usage, and the faust worker.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher, read_topic
from modelcd.events.schemas import ModelState, RetirementDecision, RetirementWarning
from modelcd.events.topics import RETIREMENT
from modelcd.ingest.store import open_store
from modelcd.ingest.targets import TargetState
from modelcd.retirement.service import RetirementProcessor
from modelcd.settings import Settings

from ._serving import deploy, eventually, iris_package, running_node
from ._ingest import running_ingest

EXPIRY_S = 8  # short, so the test takes seconds; warn at half of it


def e2e_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    return Settings(kafka_bootstrap=broker.bootstrap, kafka_idempotence=False, home=tmp_path / "home",
                    store_url=str(tmp_path / "store"), ingest_port=free_port(), serving_host="127.0.0.1",
                    log_format="console", usage_interval=0.5, heartbeat_interval=0.5, reconcile_interval=30.0,
                    health_interval=60.0, retirement_check_interval=0.5, retirement_warn_share=0.5,
                    compile_onnx=False)


async def deploy_short_lived(settings: Settings, pub: Publisher, name: str, depth: int) -> ModelState:
    """Deployed the way ingest publishes (store, target state, event), with a short expiry."""
    async with open_store(settings.resolved_store_url) as store:
        state = await deploy(store, None, iris_package(name, "1", depth=depth), publish=False)
        state = msgspec.structs.replace(state, expiry_seconds=EXPIRY_S, deployed_at=time.time())
        await TargetState(store).put_model(state)
    await pub.publish(state)
    return state


@pytest.mark.slow
async def test_unused_model_is_warned_once_retired_and_unloaded_used_one_kept(broker: EmbeddedBroker,
                                                                              tmp_path: Path) -> None:
    settings = e2e_settings(broker, tmp_path)
    async with running_ingest(settings) as ingest, Publisher(broker.config, "test") as pub, \
            RetirementProcessor(settings) as proc:
        async with running_node(settings) as node:
            await deploy_short_lived(settings, pub, "idle", depth=2)
            await deploy_short_lived(settings, pub, "busy", depth=3)
            await eventually(lambda: sorted(node.registry.loaded_keys()) == ["busy:1", "idle:1"],
                             what="both models loaded")
            assert (await node.infer("idle")).status_code == 200  # served before: only "busy" stays in use

            served: list[int] = []

            async def keep_busy() -> None:
                while True:
                    served.append((await node.infer("busy")).status_code)
                    await asyncio.sleep(0.2)

            busy = asyncio.create_task(keep_busy())
            try:
                await ingest.wait_for(lambda: any(s.target == "retired" for s in ingest.states_of("idle")))
                await eventually(lambda: "idle:1" not in node.registry.entries, timeout=30,
                                 what="idle:1 unloaded by the node")
                mark = len(served)
                await eventually(lambda: len(served) > mark + 5, what="busy still answering after")
            finally:
                busy.cancel()
                await asyncio.gather(busy, return_exceptions=True)

            r = await node.infer("idle")
            assert r.status_code == 404, r.text
            assert "idle:1" not in node.registry.loaded_keys()
            assert set(served) == {200}
            assert (await node.infer("busy")).status_code == 200
        assert proc.stats.errors == 0

    async with open_store(settings.resolved_store_url) as store:
        targets = TargetState(store)
        idle, busy_state = await targets.get_model("idle", "1"), await targets.get_model("busy", "1")
    assert idle is not None and idle.target == "retired"
    assert busy_state is not None and busy_state.target == "serving"

    events = [e for e, _env, _r in await read_topic(broker.config, RETIREMENT)]
    warnings = [e for e in events if isinstance(e, RetirementWarning)]
    decisions = [e for e in events if isinstance(e, RetirementDecision)]
    assert [(w.model, w.version) for w in warnings] == [("idle", "1")]  # exactly one, none for "busy"
    assert warnings[0].owner == "tests"
    assert [(d.model, d.action) for d in decisions] == [("idle", "retire")]
