"""Defence in depth: with the structural checks off, the finding's trees still cannot take ingest down. A real
`modelcd ingest` process: the 10^9-index tree crashes only the sandbox child (SIGSEGV) at compile, the cyclic
tree is killed at MODELCD_COMPILE_TIMEOUT, the next deployment completes, and SIGINT during a hanging compile
stops ingest with no sandbox child left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import KafkaConfig
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed

from ._hostile import edited_tree
from ._ingest import Watcher, iris_package

pytestmark = pytest.mark.hostile

COMPILE_TIMEOUT_S = 4


def sandbox_children(parent: int) -> list[int]:
    """Live sandbox processes started by `parent` (they run in their own session, so found by command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"modelcd.ingest.sandbox" in cmd and str(parent).encode() in cmd and state != "Z":
            found.append(int(entry))
    return found


class Ingest:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, watcher: Watcher) -> None:
        self.proc, self.url, self.watcher = proc, url, watcher

    async def upload(self, data: bytes) -> str:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            resp = await client.post("/deployments", content=data, headers={"content-type": "application/x-tar"})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["deployment_id"])


@pytest.fixture(scope="module")
async def ingest(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ingest]:
    home = tmp_path_factory.mktemp("unchecked")
    broker = EmbeddedBroker(port=free_port(), log_file=home / "tansu.log")
    await broker.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="false",
               MODELCD_HOME=str(home), MODELCD_STORE_URL=str(home / "store"), MODELCD_INGEST_PORT=str(port),
               MODELCD_STRUCTURAL_CHECKS="false", MODELCD_COMPILE_TIMEOUT=str(COMPILE_TIMEOUT_S),
               MODELCD_VALIDATION_TIMEOUT="30", MODELCD_LOG_FORMAT="json")
    log = (home / "ingest.log").open("wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "modelcd", "ingest", env=env,
                                                stdout=log, stderr=log)
    watcher = Watcher(KafkaConfig(bootstrap=broker.bootstrap, partitions=3))
    watching = asyncio.ensure_future(watcher.run())
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(90), httpx.AsyncClient(base_url=url) as client:
            while True:
                assert proc.returncode is None, (home / "ingest.log").read_text()[-2000:]
                try:
                    health = (await client.get("/healthz")).json()
                    if health.get("consumer_joined") and health.get("tracker_caught_up"):
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        yield Ingest(proc, url, watcher)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        watching.cancel()
        log.close()
        await broker.stop()


async def test_child_index_10_to_the_9_crashes_only_the_sandbox(ingest: Ingest) -> None:
    """Checks off: the finding's tree segfaults skl2onnx in the sandbox child; the deployment fails at compile
    naming the signal, and ingest lives on."""
    deployment_id = await ingest.upload(edited_tree("far-child", "far").data)
    outcome = await ingest.watcher.outcome(deployment_id)
    assert isinstance(outcome, DeploymentFailed) and outcome.step == "compile", outcome
    assert "crashed the sandbox" in outcome.reason and "SIG" in outcome.reason, outcome.reason
    assert ingest.proc.returncode is None


async def test_cyclic_tree_is_killed_at_the_compile_time_limit(ingest: Ingest) -> None:
    """Checks off: the cyclic tree hangs predicting in compile; the child is killed at MODELCD_COMPILE_TIMEOUT."""
    deployment_id = await ingest.upload(edited_tree("cyclic", "cycle").data)
    outcome = await ingest.watcher.outcome(deployment_id)
    assert isinstance(outcome, DeploymentFailed) and outcome.step == "compile", outcome
    assert f"killed after {COMPILE_TIMEOUT_S} s" in outcome.reason and "MODELCD_COMPILE_TIMEOUT" in outcome.reason
    assert len(sandbox_children(ingest.proc.pid)) <= 1  # at most the zygote: the hung child is gone


async def test_next_deployment_proceeds(ingest: Ingest) -> None:
    """After the crash and the hang, a healthy model deploys."""
    outcome = await ingest.watcher.outcome(await ingest.upload(iris_package("healthy-next").data))
    assert isinstance(outcome, DeploymentCompleted), outcome


def test_ingest_process_never_loaded_a_model_library(ingest: Ingest) -> None:
    """After compiling and validating deployments, no model library is mapped into ingest's own process."""
    maps = Path(f"/proc/{ingest.proc.pid}/maps").read_text()
    for lib in ("sklearn", "onnxruntime", "xgboost", "lightgbm", "skl2onnx"):
        assert f"/{lib}" not in maps, lib


async def test_sigint_during_a_hanging_compile_stops_ingest_and_its_children(ingest: Ingest) -> None:
    """SIGINT while a cyclic tree hangs compile: ingest exits 0 (bounded wait) and no sandbox child outlives it."""
    deployment_id = await ingest.upload(edited_tree("cyclic-again", "cycle").data)
    await ingest.watcher.wait_for(lambda: ("compile", "started") in ingest.watcher.steps(deployment_id), 60)
    pid = ingest.proc.pid
    ingest.proc.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(ingest.proc.wait(), 90)
    assert code == 0
    async with asyncio.timeout(30):
        while sandbox_children(pid):
            await asyncio.sleep(0.1)
