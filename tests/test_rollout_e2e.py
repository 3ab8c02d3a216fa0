"""A rollout judged on real traffic: a serving node, the rollout controller and the CLI on a real broker.

The finding: ~10 valid requests/s and ~2/s with a wrong input shape, both arms got the same 4xx share,
and the healthy canary was rolled back on `error_rate 0.1786 > 0.05`; `rollout start` also dropped the
endpoint's shadow relations. Here the node counts the 4xx apart, the analysis compares the arms, the
canary (the same tree as the baseline) completes, and the shadow added before the rollout is still
there after it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.rollout.machine import Phase
from modelcd.store.blobs import open_store

from ._serving import deploy, infer_body, iris_package, iris_rows, node_settings, running_node
from .test_rollout_controller import Sink, controller, wait_for

WAIT = 240.0  # an upper bound on every wait, never a performance threshold
ENTRY = "import sys; from modelcd.cli import main; sys.exit(main())"


async def modelcd(env: dict[str, str], *args: str) -> str:
    """`modelcd ARGS` as the console script runs it; its stdout, after checking it exited 0."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", ENTRY, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, (args, err.decode())
    return out.decode()


async def test_clients_mistakes_on_both_arms_do_not_roll_back_a_healthy_canary(broker: EmbeddedBroker,
                                                                             tmp_path: Path) -> None:
    """1 request in 6 has a wrong shape (400 on either arm): the canary completes; the shadow is kept."""
    settings = node_settings(tmp_path, broker.bootstrap)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="off",
               MODELCD_STORE_URL=settings.resolved_store_url, MODELCD_LOG_LEVEL="warning")
    rows = iris_rows(20)  # repeated inputs: both arms answer the same rows, paired evidence
    wrong = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP64", "data": [5.1, 3.5, 1.4]}]}
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for version in "123":
            await deploy(store, pub, iris_package("iris", version, depth=3))  # the same tree: a healthy canary
        async with running_node(settings) as node, controller(broker.config, Sink(), tick=0.2) as c:
            await modelcd(env, "traffic", "set", "iris", "iris:1=100")
            await modelcd(env, "shadow", "add", "iris:1", "iris:3", "--endpoint", "iris", "--rate", "0.2")
            statuses: dict[int, int] = {}

            async def traffic() -> None:
                i = 0
                while True:
                    batch = []
                    for _ in range(5):
                        batch.append(node.infer("iris", infer_body([rows[i % len(rows)]])))
                        i += 1
                    batch.append(node.client.post("/v2/models/iris/infer", json=wrong))
                    for r in await asyncio.gather(*batch, return_exceptions=True):
                        if isinstance(r, httpx.Response):
                            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    await asyncio.sleep(0.02)

            sender = asyncio.create_task(traffic())
            try:
                await modelcd(env, "rollout", "start", "iris", "--to", "iris:2", "--plan", "fast", "--steps", "50,100",
                              "--interval", "3s", "--max-hold", "10m", "--log-rate", "1")
                await wait_for(lambda: "iris" in c.rollouts and not c.rollouts["iris"].active, "the rollout ends",
                               timeout=WAIT)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            r = c.rollouts["iris"]
            assert r.phase is Phase.COMPLETED, [(f.action, f.reason) for f in r.history]
            assert set(statuses) == {200, 400} and statuses[400] * 4 < statuses[200]
            decided = next(f for f in r.history if f.action == "promote")
            canary = decided.evidence["canary"]
            assert canary["client_errors"] > 0 and canary["errors"] == 0, canary
            assert decided.evidence["analyzed_weight"] == 50.0
            status = await modelcd(env, "rollout", "status", "iris")
            assert "step 1 of 2 at 50%: promote" in status and "client errors" in status, status
            shown = await modelcd(env, "traffic", "show", "iris")
            assert "shadow iris:3 of iris:1" in shown and "iris:2" in shown, shown
