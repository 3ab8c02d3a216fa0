"""Helpers for serving tests: build small sklearn packages, deploy them the way ingest does, run a node in-process.

Deploying here is exactly what ingest does after validation: the package into the store,
the ModelState into the target state, then the ModelState event on the bus.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from modelcd.events.bus import Publisher
from modelcd.events.schemas import ModelState, Resources, TrafficPolicy
from modelcd.runtimes.build import build_package
from modelcd.serving.node import ServingNode
from modelcd.serving.registry import RuntimeLoader, default_loader
from modelcd.settings import Settings
from modelcd.store.blobs import Store, put_package
from modelcd.store.package import BuiltPackage
from modelcd.store.targets import TargetState
from modelcd.wiring import node_shadow

MB = 1 << 20


@functools.cache
def _iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x.astype(np.float64), y


@functools.cache
def iris_package(name: str, version: str, depth: int = 3) -> BuiltPackage:
    """A decision tree on iris (depth changes the model, so versions differ in content)."""
    from sklearn.tree import DecisionTreeClassifier

    x, y = _iris()
    model = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(x, y)
    return build_package(model, name=name, version=version, owner="tests", expiry="30d",
                         sample_inputs={"input": x[:5]})


def iris_rows(n: int = 2) -> list[list[float]]:
    return _iris()[0][:n].tolist()


def infer_body(rows: list[list[float]] | None = None, **extra: Any) -> dict[str, Any]:
    rows = rows or iris_rows()
    return {"inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}], **extra}


def node_settings(tmp_path: Path, bootstrap: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        kafka_bootstrap=bootstrap, kafka_idempotence=False, home=tmp_path / "home",
        store_url=str(tmp_path / "store"), serving_host="127.0.0.1", reconcile_interval=30.0,
        usage_interval=0.5, heartbeat_interval=0.5, health_interval=60.0, predict_timeout=5.0,
        drain_timeout=5.0, load_timeout=30.0, log_format="console",
    )
    base.update(overrides)
    return Settings(**base)


async def deploy(store: Store, publisher: Publisher | None, built: BuiltPackage, *, memory_bytes: int = 0,
                 publish: bool = True) -> ModelState:
    sha = await put_package(store, built.data)
    m = built.manifest
    state = ModelState(name=m.name, version=m.version, target="serving", package_uri=f"packages/{sha}",
                       sha256=sha, runtime=m.runtime, flavor=m.flavor, owner=m.owner,
                       expiry_seconds=m.expiry_seconds, deployed_at=time.time(),
                       resources=Resources(memory_bytes=memory_bytes))
    await TargetState(store).put_model(state)
    if publish and publisher is not None:
        await publisher.publish(state)
    return state


async def retire(store: Store, publisher: Publisher, state: ModelState) -> ModelState:
    import msgspec

    retired = msgspec.structs.replace(state, target="retired", reason="test", at=time.time())
    await TargetState(store).put_model(retired)
    await publisher.publish(retired)
    return retired


async def set_traffic(store: Store, publisher: Publisher, policy: TrafficPolicy) -> None:
    await TargetState(store).put_traffic(policy)
    await publisher.publish(policy)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0,
                     interval: float = 0.05, what: str = "condition") -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class RunningNode:
    def __init__(self, node: ServingNode, client: httpx.AsyncClient, stop: asyncio.Event,
                 task: asyncio.Task[None]) -> None:
        self.node = node
        self.client = client
        self.stop = stop
        self.task = task

    @property
    def registry(self) -> Any:
        return self.node.registry

    async def infer(self, model: str, body: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return await self.client.post(f"/v2/models/{model}/infer", json=body or infer_body(), **kw)


@asynccontextmanager
async def running_node(settings: Settings, *, loader: RuntimeLoader = default_loader, node_id: str = "test-node",
                       ready_timeout: float = 60.0) -> AsyncIterator[RunningNode]:
    """A node on a free port, ready; stopped (drained) on exit. Its failure fails the test."""
    node = ServingNode(settings, port=0, node_id=node_id, loader=loader, shadow=node_shadow())  # as `modelcd up` wires it
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(node.run(stop=stop, ready=ready))
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        task.result()  # raises the node's error
    if not ready.is_set():
        stop.set()
        await asyncio.wait_for(task, 30)
        raise AssertionError(f"node not ready within {ready_timeout}s")
    async with httpx.AsyncClient(base_url=node.url, timeout=30.0) as client:
        try:
            yield RunningNode(node, client, stop, task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
