"""Hostile models on a serving node: each one's damage stays inside its own worker process.

The quoted findings of the isolation issue run against a real `modelcd serve` process (a
segfault in the old node killed the process; an input-dependent ONNX Loop froze its event
loop); the rest of the corpus (Python models that abort, exit, blow up memory, spin, spawn
processes, write outside their directory, look for the node's secrets, crash at load) runs
in the test harness's node. In every case a healthy model is hammered meanwhile and must
answer every request, and the node must stop cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher, read_topic
from modelcd.runtimes.build import build_package
from modelcd.store.blobs import open_store

from ._models import MAGIC, SEGV_TREE_CRASH_ROW, alloc_onnx, hostile_loader, loop_onnx, segv_tree
from ._serving import deploy, eventually, infer_body, iris_package, iris_rows, node_settings, running_node

pytestmark = pytest.mark.hostile


class Hammer:
    """Keeps `concurrency` requests to one healthy model in flight; counts statuses and latencies."""

    def __init__(self, client: httpx.AsyncClient, model: str, concurrency: int = 2) -> None:
        self.client, self.model, self.concurrency = client, model, concurrency
        self.codes: list[int] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self) -> None:
        body = infer_body()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                r = await self.client.post(f"/v2/models/{self.model}/infer", json=body, timeout=10.0)
                self.codes.append(r.status_code)
                if r.status_code != 200:
                    self.failures.append(r.text)
            except httpx.HTTPError as exc:
                self.codes.append(0)
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - t0)

    def __enter__(self) -> Hammer:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.concurrency)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def done(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    def assert_all_answered(self) -> None:
        assert self.codes, "the healthy model was never asked"
        ok = sum(c == 200 for c in self.codes)
        assert ok == len(self.codes), f"{len(self.codes) - ok} of {len(self.codes)} failed: {self.failures[:3]}"


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ServeProcess:
    """`modelcd serve` as a real process, the way an operator runs a node."""

    def __init__(self, tmp_path: Path, bootstrap: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MODELCD_KAFKA_BOOTSTRAP": bootstrap, "MODELCD_KAFKA_IDEMPOTENCE": "false",
                    "MODELCD_HOME": str(tmp_path / "home"), "MODELCD_STORE_URL": str(tmp_path / "store"),
                    "MODELCD_LOG_FORMAT": "console", "MODELCD_HEARTBEAT_INTERVAL": "0.5",
                    "MODELCD_WORKER_RESTART_BACKOFF": "0.2", **env}
        self.log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "modelcd.cli", "serve", "--port", str(self.port),
                                      "--node-id", "hostile-node"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    async def ready(self, client: httpx.AsyncClient, models: list[str]) -> None:
        async def check() -> bool:
            assert self.proc.poll() is None, f"the node exited with {self.proc.returncode}"
            try:
                if (await client.get("/v2/health/ready")).status_code != 200:
                    return False
                for m in models:
                    if (await client.get(f"/v2/models/{m}/ready")).status_code != 200:
                        return False
                return True
            except httpx.HTTPError:
                return False

        await eventually(check, timeout=120, interval=0.2, what="the node and its models ready")

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGINT, then wait (bounded); SIGKILL if it does not stop, which fails the caller's assertion."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        code = self.proc.poll()
        if code is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        return -999 if code is None else code


async def test_native_crash_at_predict_costs_one_worker_then_quarantine(broker: EmbeddedBroker,
                                                                        tmp_path: Path) -> None:
    """A skops tree that segfaults on some inputs: 503 with the signal, restart, quarantine; others answer; clean stop."""
    async with open_store(str(tmp_path / "store")) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("good", "1"))
        await deploy(store, pub, segv_tree())
    node = ServeProcess(tmp_path, broker.bootstrap, MODELCD_WORKER_CRASH_LIMIT="3")
    try:
        async with httpx.AsyncClient(base_url=node.url, timeout=30.0) as client:
            await node.ready(client, ["good", "segv-tree"])
            crash = infer_body([SEGV_TREE_CRASH_ROW])
            with Hammer(client, "good") as hammer:
                for attempt in range(3):
                    if attempt:  # restarted after the backoff, and answers its healthy inputs again
                        await eventually(lambda: _ready(client, "segv-tree"), what="segv-tree restarted")
                        assert (await client.post("/v2/models/segv-tree/infer", json=infer_body())).status_code == 200
                    r = await client.post("/v2/models/segv-tree/infer", json=crash)
                    assert r.status_code == 503, r.text
                    assert "SIGSEGV" in r.json()["error"]
                await eventually(lambda: _error_contains(client, "segv-tree", "quarantined"), what="quarantine")
                r = await client.post("/v2/models/segv-tree/infer", json=infer_body())
                assert r.status_code == 503 and "quarantined" in r.json()["error"] and "SIGSEGV" in r.json()["error"]
                await asyncio.sleep(1.0)  # no crash loop: it stays down while the healthy model keeps answering
                assert (await client.get("/v2/health/live")).status_code == 200
                await hammer.done()
            hammer.assert_all_answered()
            metrics = (await client.get("/metrics")).text
            assert 'modelcd_model_quarantined{model="segv-tree",version="1"} 1.0' in metrics
            assert 'modelcd_worker_deaths_total{cause="SIGSEGV",model="segv-tree",version="1"} 3.0' in metrics
            assert node.proc.poll() is None
            zygotes = [p for p in _children(node.proc.pid)
                       if b"modelcd.serving.zygote" in Path(f"/proc/{p}/cmdline").read_bytes()]
            workers = [w for z in zygotes for w in _children(z)]
            # The healthy model's worker and the spare (MODELCD_WORKER_SPARES=1); the quarantined one is gone.
            assert len(zygotes) == 1 and len(workers) == 2
        assert await node.stop() == 0
        for pid in [*zygotes, *workers]:
            await eventually(lambda p=pid: not _alive(p), timeout=10, what=f"process {pid} gone")
    finally:
        await node.stop()
    events = [e for e, _, _ in await read_topic(broker.config, "modelcd.health")]
    health = [e for e in events if type(e).__name__ == "ModelHealth" and e.model == "segv-tree"]
    assert any(e.quarantined and not e.ok and "SIGSEGV" in e.detail for e in health)
    statuses = [e for e in events if type(e).__name__ == "NodeStatus"]
    assert any(m.name == "segv-tree" and m.quarantined and m.state == "failed" for s in statuses for m in s.models)


async def test_input_dependent_onnx_loop_times_out_alone(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """An ONNX Loop of max(input) iterations, fast on its samples: 1e12 gets 504, the rest of the node answers."""
    async with open_store(str(tmp_path / "store")) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("good", "1"))
        await deploy(store, pub, loop_onnx())
    node = ServeProcess(tmp_path, broker.bootstrap, MODELCD_PREDICT_TIMEOUT="2")
    try:
        async with httpx.AsyncClient(base_url=node.url, timeout=30.0) as client:
            await node.ready(client, ["good", "loop"])
            body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1e12, 1.0]}]}
            with Hammer(client, "good") as hammer:
                before = len(hammer.codes)
                r = await client.post("/v2/models/loop/infer", json=body)
                during = len(hammer.codes) - before
                assert r.status_code == 504, r.text
                assert during > 0  # the healthy model answered while the loop ran
                await eventually(lambda: _ready(client, "loop"), what="loop restarted")
                small = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [3.0, 1.0]}]}
                assert (await client.post("/v2/models/loop/infer", json=small)).status_code == 200
                await hammer.done()
            hammer.assert_all_answered()
        assert await node.stop() == 0
    finally:
        await node.stop()


async def _ready(client: httpx.AsyncClient, model: str) -> bool:
    return (await client.get(f"/v2/models/{model}/ready")).status_code == 200


async def _error_contains(client: httpx.AsyncClient, model: str, text: str) -> bool:
    r = await client.post(f"/v2/models/{model}/infer", json=infer_body())
    return r.status_code == 503 and text in r.json()["error"]


async def test_hostile_python_models_stay_in_their_workers(broker: EmbeddedBroker, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Abort, exit, memory blow-up, spin, spawn, fork bomb, writes, secret snooping, crash at load: each stays in its worker."""
    secret = f"s3cr3t-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("MODELCD_API_TOKEN", secret)  # in the front's environment, as a real node has it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    escape = tmp_path / "escaped.txt"
    settings = node_settings(tmp_path, broker.bootstrap, predict_timeout=2.0, worker_memory=1 << 30,
                             worker_restart_backoff=0.2, worker_crash_limit=3, reconcile_interval=0.5)
    corpus = {"h-segv": "", "h-abort": "", "h-exit": "", "h-hog": "", "h-spin": "", "h-spawn": "", "h-forkbomb": "",
              "h-write": str(escape), "h-snoop": secret}
    x = iris_rows(5)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("good", "1"))
        await deploy(store, pub, iris_package("h-loadcrash", "1"))
        for name, arg in corpus.items():
            model = DecisionTreeClassifier(max_depth=2, random_state=0).fit(np.asarray(x), [0, 1, 0, 1, 0])
            await deploy(store, pub, build_package(model, name=name, version="1", owner="tests", expiry="30d",
                                                   sample_inputs={"input": np.asarray(x)}, description=arg))
        async with running_node(settings, loader=hostile_loader) as n:
            magic = infer_body([[MAGIC, 1.0, 1.0, 1.0]])
            expected = {"h-segv": (503, "SIGSEGV"), "h-abort": (503, "SIGABRT"), "h-exit": (503, "exited with status 3"),
                        "h-hog": (500, "MemoryError"), "h-spin": (504, "did not answer within 2s"),
                        "h-spawn": (500, "Operation not permitted"), "h-forkbomb": (500, "Operation not permitted"),
                        "h-write": (500, "Permission denied"), "h-snoop": (500, "no secret found")}
            async with httpx.AsyncClient(base_url=n.node.url, timeout=30.0) as client:
                with Hammer(client, "good") as hammer:
                    r = await n.infer("h-loadcrash")
                    assert r.status_code == 503 and "failed to load" in r.json()["error"], r.text
                    assert "SIGSEGV" in r.json()["error"]
                    # Retried at each reconciliation; crashing at load counts like at predict: quarantined.
                    await eventually(lambda: n.registry.entries["h-loadcrash:1"].status == "quarantined",
                                     timeout=30, what="h-loadcrash quarantined")
                    r = await n.infer("h-loadcrash")
                    assert r.status_code == 503 and "quarantined" in r.json()["error"], r.text
                    answers = await asyncio.gather(*(n.infer(name, magic) for name in expected))
                    for name, r in zip(expected, answers, strict=True):
                        status, text = expected[name]
                        assert (r.status_code, text in r.text) == (status, True), (name, r.status_code, r.text)
                    assert not escape.exists()
                    for name in expected:  # each one is back (restarted, or never down), answering normal inputs
                        await eventually(lambda m=name: _ready(client, m), what=f"{name} back")
                        r = await n.infer(name)
                        assert r.status_code == 200, (name, r.text)
                    await hammer.done()
                hammer.assert_all_answered()
            pids = [e.loaded.worker.pid for e in n.registry.entries.values() if e.loaded is not None]
            zygote = n.registry.zygote._proc
            assert zygote is not None and len(pids) == len(expected) + 1
        assert zygote.returncode is not None
        for pid in pids:
            await eventually(lambda p=pid: not _alive(p), timeout=10, what=f"worker {pid} gone")


async def test_onnx_memory_blow_up_on_some_inputs_stays_in_its_worker(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """An ONNX graph sized by its input: 2 GB past a 1 GiB worker limit fails alone; the rest of the node answers."""
    settings = node_settings(tmp_path, broker.bootstrap, worker_memory=1 << 30, worker_restart_backoff=0.2)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("good", "1"))
        await deploy(store, pub, alloc_onnx())
        async with running_node(settings) as n:
            async with httpx.AsyncClient(base_url=n.node.url, timeout=30.0) as client:
                with Hammer(client, "good") as hammer:
                    # 5e5 x 1000 float32 = 2 GB, past the worker's 1 GiB address-space limit
                    huge = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [5e5, 1.0]}]}
                    r = await n.infer("alloc", huge)
                    # onnxruntime's allocation fails (500 with its reason) or the worker dies (503): never the node.
                    assert r.status_code in (500, 503), r.text
                    await eventually(lambda: _ready(client, "alloc"), what="alloc back")
                    small = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [3.0, 1.0]}]}
                    assert (await n.infer("alloc", small)).status_code == 200
                    await hammer.done()
                hammer.assert_all_answered()
