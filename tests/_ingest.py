"""Helpers for the ingest tests: packages good and bad, and a running ingest service with an event watcher."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from modelcd.events.bus import KafkaConfig
from modelcd.events.codec import decode
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, Event, ModelState
from modelcd.events.topics import DEPLOYMENTS, MODEL_STATE
from modelcd.ingest.service import run_ingest
from modelcd.runtimes.build import build_package
from modelcd.settings import Settings
from modelcd.store.package import BuiltPackage, Manifest, TensorSpec, assemble_package, encode_samples
from modelcd.wiring import api_routes

FULL_SEQUENCE = [
    ("accepted", "succeeded"),
    ("validate", "started"), ("validate", "succeeded"),
    ("compile", "started"), ("compile", "succeeded"),
    ("serving-validation", "started"), ("serving-validation", "succeeded"),
    ("publish", "started"), ("publish", "succeeded"),
]


# --- packages ------------------------------------------------------------------------------------


@cache
def iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x.astype(np.float32), y


def iris_package(name: str, version: str = "1", *, c: float = 1.0, model: Any = None,
                 expected_outputs: Any = None) -> BuiltPackage:
    """A small logistic regression on iris (skl2onnx converts it), or `model` fitted on iris."""
    from sklearn.linear_model import LogisticRegression

    x, y = iris()
    est = (model if model is not None else LogisticRegression(C=c, max_iter=500)).fit(x, y)
    return build_package(est, name=name, version=version, owner="ann", expiry="30d", sample_inputs=x[:8],
                         expected_outputs=expected_outputs, verify=expected_outputs is None)


def tar_of(members: list[tuple[str, bytes]], *, compress: bool = False) -> bytes:
    """A tar archive with exactly these members (no checks: for building bad packages)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = buf.getvalue()
    return gzip.compress(out, mtime=0) if compress else out


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def without_manifest_item(pkg: BuiltPackage, item: str) -> bytes:
    members = members_of(pkg.data)
    manifest = json.loads(members[0][1])
    del manifest[item]
    return tar_of([("manifest.json", json.dumps(manifest).encode()), *members[1:]])


def with_tampered_member(pkg: BuiltPackage, name: str) -> bytes:
    return tar_of([(n, d + b" " if n == name else d) for n, d in members_of(pkg.data)])


def onnx_package(name: str, model_bytes: bytes, *, version: str = "1") -> BuiltPackage:
    """An ONNX-flavor package around arbitrary model bytes, assembled without running the model."""
    x = iris()[0][:4]
    contents = {"model.onnx": model_bytes,
                "samples.json": encode_samples({"input": x}, {"prediction": x + 1.0})}
    manifest = Manifest(name=name, version=version, flavor="onnx", runtime="onnx", model_file="model.onnx",
                        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
                        outputs=[TensorSpec(name="prediction", datatype="FP32", shape=[-1, 4])],
                        owner="mallory", expiry_seconds=3600, files={p: "0" * 64 for p in contents})
    return assemble_package(manifest, contents)


def endless_loop_onnx() -> bytes:
    """A valid ONNX graph whose Loop runs for 2**62 iterations: loads fine, never finishes predicting."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "input"], ["variable"], body=body)],
        "endless",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a running service and what it publishes ------------------------------------------------------


@dataclass
class Watcher:
    """Collects every event of modelcd.deployments and modelcd.model-state, from the beginning."""

    cfg: KafkaConfig
    by_deployment: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    states: list[ModelState] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.cfg.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in (DEPLOYMENTS, MODEL_STATE) for p in range(self.cfg.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                batches = await consumer.getmany(timeout_ms=100)
                if not batches:
                    continue
                for tp, records in batches.items():
                    for r in records:
                        event, _ = decode(tp.topic, r.value, r.headers)
                        if isinstance(event, ModelState):
                            self.states.append(event)
                        else:
                            self.by_deployment[event.deployment_id].append(event)  # type: ignore[attr-defined]
                async with self.changed:
                    self.changed.notify_all()
        finally:
            await consumer.stop()

    async def wait_for(self, predicate: Any, timeout: float = 90) -> None:
        async with asyncio.timeout(timeout):
            async with self.changed:
                await self.changed.wait_for(predicate)

    async def outcome(self, deployment_id: str, timeout: float = 90) -> Event:
        """The DeploymentCompleted or DeploymentFailed of one deployment."""
        def ended() -> bool:
            return any(isinstance(e, DeploymentCompleted | DeploymentFailed)
                       for e in self.by_deployment.get(deployment_id, []))
        await self.wait_for(ended, timeout)
        return next(e for e in self.by_deployment[deployment_id]
                    if isinstance(e, DeploymentCompleted | DeploymentFailed))

    def steps(self, deployment_id: str) -> list[tuple[str, str]]:
        return [(e.step, e.status) for e in self.by_deployment[deployment_id]  # type: ignore[attr-defined]
                if type(e).__name__ == "DeploymentProgress"]

    def states_of(self, name: str, version: str = "1") -> list[ModelState]:
        return [s for s in self.states if s.name == name and s.version == version]


@asynccontextmanager
async def running_ingest(settings: Settings) -> AsyncIterator[Watcher]:
    """Run `run_ingest` and a Watcher until the block exits; yields once the service is ready."""
    stop, ready = asyncio.Event(), asyncio.Event()
    watcher = Watcher(KafkaConfig(bootstrap=settings.bootstrap, partitions=settings.topic_partitions))
    async with asyncio.TaskGroup() as tg:
        service = tg.create_task(run_ingest(settings, stop=stop, ready=ready, routes=api_routes(settings)))
        async with asyncio.timeout(60):
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({service, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if service.done():
                waiter.cancel()
                service.result()
        watching = tg.create_task(watcher.run())
        try:
            yield watcher
        finally:
            stop.set()
            watching.cancel()


def settings_for(bootstrap: str, store_url: str, port: int, home: Path, **kw: Any) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, kafka_idempotence=False, store_url=store_url, ingest_port=port,
                    home=home, log_format="console", **kw)
