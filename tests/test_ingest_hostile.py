"""Hostile packages against a running ingest (real broker, local store, the real sandbox): each finding of the
isolation issue and more, across flavors. Each is refused with a clear reason at the step that should catch it,
or contained in the sandbox, and ingest keeps deploying healthy models (the last test, and one in between)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import resource
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, DeployRequested

from ._hostile import (
    deep_json,
    edit_skops_nodes,
    edited_lightgbm,
    edited_tree,
    edited_xgboost,
    healthy,
    memory_blowup_onnx,
    model_bytes,
    with_model,
)
from ._ingest import Watcher, iris_package, members_of, onnx_package, running_ingest, settings_for, tar_of

pytestmark = pytest.mark.hostile


class Env:
    def __init__(self, broker: EmbeddedBroker, watcher: Watcher, url: str, files: Path) -> None:
        self.broker, self.watcher, self.url, self.files = broker, watcher, url, files

    async def upload(self, data: bytes, client: httpx.AsyncClient | None = None) -> str:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as own:
            resp = await (client or own).post("/deployments", content=data,
                                               headers={"content-type": "application/x-tar"})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["deployment_id"])

    async def request(self, **kw: Any) -> str:
        """A DeployRequested through the Kafka door (what a training pipeline publishes)."""
        req = DeployRequested(owner="mallory", **kw)
        async with Publisher(self.broker.config, "test") as pub:
            await pub.publish(req)
        return req.deployment_id

    async def fails(self, deployment_id: str, step: str, *words: str) -> DeploymentFailed:
        outcome = await self.watcher.outcome(deployment_id)
        assert isinstance(outcome, DeploymentFailed), outcome
        assert outcome.step == step, (outcome.step, outcome.reason)
        assert all(w in outcome.reason for w in words), outcome.reason
        return outcome

    async def deploys(self, name: str, version: str = "1") -> None:
        deployment_id = await self.upload(iris_package(name, version).data)
        outcome = await self.watcher.outcome(deployment_id)
        assert isinstance(outcome, DeploymentCompleted), outcome


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    home = tmp_path_factory.mktemp("hostile")
    files = home / "packages"
    files.mkdir()
    broker = EmbeddedBroker(port=free_port(), log_file=home / "tansu.log")
    await broker.start()
    port = free_port()
    settings = settings_for(broker.bootstrap, str(home / "store"), port, home, compile_timeout=30.0,
                            validation_timeout=30.0, file_uri_dirs=str(files),
                            validation_warm=True)  # the sandbox zygote, as in production
    try:
        async with running_ingest(settings) as watcher:
            yield Env(broker, watcher, f"http://127.0.0.1:{port}", files)
    finally:
        await broker.stop()


# --- the findings ---------------------------------------------------------------------------------------


async def test_skops_tree_with_child_index_10_to_the_9_refused_before_compile(env: Env) -> None:
    """The finding's tree (a child index of 10^9 on a branch the samples do not take) fails at validate,
    by the structural check, before compile or any load."""
    deployment_id = await env.upload(edited_tree("far-child", "far").data)
    await env.fails(deployment_id, "validate", "unsafe model structure", "1000000000")
    assert ("compile", "started") not in env.watcher.steps(deployment_id)


async def test_cyclic_skops_tree_refused_before_compile(env: Env) -> None:
    """The finding's cyclic tree (children_left[0] = 0) fails at validate instead of hanging compile."""
    deployment_id = await env.upload(edited_tree("cyclic", "cycle").data)
    await env.fails(deployment_id, "validate", "unsafe model structure", "left child 0")


def _bomb(compressed_mib: int) -> bytes:
    """A gzip tar of about `compressed_mib` MiB declaring one member of ~1000x that, built in milliseconds: one
    deflate chunk of 16 MiB of zeros repeated (each ends on a full flush, so chunks concatenate); no valid trailer
    is needed, a reader must give up long before it."""
    header = tarfile.TarInfo("zeros.bin")
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = c.compress(bytes(16 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    reps = (compressed_mib << 20) // len(zeros)
    header.size = reps * (16 << 20)
    h = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = h.compress(header.tobuf(format=tarfile.GNU_FORMAT)) + h.flush(zlib.Z_FULL_FLUSH)
    gz_header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x02\xff"
    return gz_header + head + zeros * reps + b"\x03\x00" + bytes(8)


async def _answers_while(env: Env, work: Awaitable[Any]) -> tuple[int, float, int, float]:
    """(answers, seconds) of /healthz polled back to back while `work` runs, and the same for a quiet spell
    of equal length after it: a loop that blocks answers (nearly) nothing during the work."""
    async with httpx.AsyncClient(base_url=env.url, timeout=120) as client:
        async def poll(stop: asyncio.Event) -> int:
            n = 0
            while not stop.is_set():
                resp = await client.get("/healthz")
                assert resp.status_code == 200
                n += 1
            return n

        stop = asyncio.Event()
        poller = asyncio.ensure_future(poll(stop))
        t0 = time.perf_counter()
        await work
        busy_s = time.perf_counter() - t0
        stop.set()
        busy = await poller
        stop = asyncio.Event()
        poller = asyncio.ensure_future(poll(stop))
        t1 = time.perf_counter()
        await asyncio.sleep(max(busy_s, 0.5))
        stop.set()
        quiet = await poller
        quiet_s = time.perf_counter() - t1
    return busy, busy_s, quiet, quiet_s


@pytest.mark.parametrize("mib", [3, 20])
async def test_gzip_bomb_upload_keeps_the_loop_answering_and_memory_bounded(env: Env, mib: int) -> None:
    """A 3 MiB bomb (~3 GiB unpacked) and a 20 MiB gzip (~20 GiB) uploaded and processed: /healthz keeps
    answering at a rate comparable to a quiet spell, the peak RSS grows by far less than the bomb, and the
    deployment fails naming the size."""
    bomb = _bomb(mib)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids: list[str] = []

    async def work() -> None:
        ids.append(await env.upload(bomb))
        await env.watcher.outcome(ids[0])

    busy, busy_s, quiet, quiet_s = await _answers_while(env, work())
    await env.fails(ids[0], "validate", "too large")
    assert busy >= 3, (busy, busy_s)
    assert busy / busy_s >= 0.1 * quiet / quiet_s, (busy, busy_s, quiet, quiet_s)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert grown < (mib << 20) * 100, grown  # the old reader went to 4.5 GB for the 3 MiB one


async def test_fifo_and_proc_fd_package_uris_refused_promptly(env: Env) -> None:
    """package_uri at a FIFO with no writer, at /proc/self/fd/N, at /dev/zero or at a directory: refused with the
    reason (not the read timeout) through the Kafka door; through the HTTP door with one opaque message."""
    fifo = env.files / "pipe.tar"
    os.mkfifo(fifo)
    read_end, write_end = os.pipe()
    try:
        cases = {f"file://{fifo}": "FIFO", f"file:///proc/self/fd/{read_end}": "virtual filesystem",
                 "file:///dev/zero": "virtual filesystem", f"file://{env.files}": "directory"}
        ids = {uri: await env.request(package_uri=uri) for uri in cases}
        for uri, word in cases.items():
            await env.fails(ids[uri], "validate", word)
        async with httpx.AsyncClient(base_url=env.url) as client:
            resp = await client.post("/deployments", json={"package_uri": f"file://{fifo}"})
            assert resp.status_code == 202  # under MODELCD_FILE_URI_DIRS: the pipeline decides
            outside = await client.post("/deployments", json={"package_uri": f"file:///proc/self/fd/{read_end}"})
            assert outside.status_code == 400 and "MODELCD_FILE_URI_DIRS" in outside.json()["error"]
        failed = await env.fails(resp.json()["deployment_id"], "validate", "MODELCD_FILE_URI_DIRS")
        assert "FIFO" not in failed.reason
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_nan_expected_outputs_refused(env: Env) -> None:
    """Expected outputs holding NaN (JSON's NaN literal) are refused at validate, naming allow_nonfinite."""
    members = dict(members_of(iris_package("nan-out").data))
    samples = json.loads(members["samples.json"])
    samples["outputs"]["probabilities"][0][0] = float("nan")
    members["samples.json"] = json.dumps(samples).encode()
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["samples.json"] = hashlib.sha256(members["samples.json"]).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    deployment_id = await env.upload(tar_of(list(members.items())))
    await env.fails(deployment_id, "validate", "NaN or infinity", "allow_nonfinite")


async def test_expiry_of_10_to_the_30_seconds_refused(env: Env) -> None:
    """An expiry of 10^30 s in the manifest, or in a Kafka-door request, is refused at validate."""
    members = dict(members_of(iris_package("forever").data))
    manifest = json.loads(members["manifest.json"])
    manifest["expiry_seconds"] = 10**30
    members["manifest.json"] = json.dumps(manifest).encode()
    deployment_id = await env.upload(tar_of(list(members.items())))
    await env.fails(deployment_id, "validate", "expiry_seconds", "100 years")
    path = env.files / "forever.tar"
    path.write_bytes(iris_package("forever").data)
    deployment_id = await env.request(package_uri=f"file://{path}", expiry_seconds=10**30)
    await env.fails(deployment_id, "validate", "expiry_seconds", "100 years")


async def test_healthy_model_deploys_between_hostile_ones(env: Env) -> None:
    """After the findings above, a healthy model deploys all the way."""
    await env.deploys("healthy-between")


# --- more hostile cases, across flavors -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["far", "cycle", "feature"])
async def test_xgboost_and_lightgbm_with_bad_indices_refused(env: Env, how: str) -> None:
    """XGBoost JSON and LightGBM text with an out-of-range child, a cycle, or a split feature out of range."""
    for pkg in (edited_xgboost(f"xgb-{how}", how), edited_lightgbm(f"lgb-{how}", how)):
        deployment_id = await env.upload(pkg.data)
        await env.fails(deployment_id, "validate", "unsafe model structure", "tree")


async def test_forest_feature_and_hist_predictor_cycle_refused(env: Env) -> None:
    """A random forest whose third tree splits on feature 4 of 4, and a HistGradientBoosting predictor cycle."""
    def feature(arr: Any) -> None:
        arr["feature"][0] = 4

    def loop(arr: Any) -> None:
        arr["left"][0] = 0

    forest = healthy("forest")
    hgb = healthy("hgb")
    for pkg, words in (
        (with_model(forest, edit_skops_nodes(model_bytes(forest), feature, which=2), name="forest-feature"),
         ["feature 4"]),
        (with_model(hgb, edit_skops_nodes(model_bytes(hgb), loop, predictor=True), name="hgb-cycle"),
         ["TreePredictor"]),
    ):
        await env.fails(await env.upload(pkg.data), "validate", "unsafe model structure", *words)


async def test_archive_shapes_refused(env: Env) -> None:
    """A huge manifest, too many members, manifest JSON nested 100,000 deep, samples nested 100,000 deep,
    a symlink member and a truncated gzip: each refused at validate with its reason."""
    base = members_of(iris_package("shapes").data)
    manifest = json.loads(base[0][1])
    huge = json.dumps({**manifest, "description": "x" * (2 << 20)}).encode()
    deep_samples = b'{"inputs": ' + deep_json(100_000) + b', "outputs": {}}'
    link = tarfile.TarInfo("model.skops")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in base:
            if name == "model.skops":
                tf.addfile(link)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    cases = [
        (tar_of([("manifest.json", huge), *base[1:]]), "oversized"),
        (tar_of([*base, *((f"extra/{i}.bin", b"x") for i in range(70))]), "too many members"),
        (tar_of([("manifest.json", b'{"labels": ' + deep_json(100_000) + b"}"), *base[1:]]), "nested too deeply"),
        (tar_of([*base[:-1], ("samples.json", deep_samples)]), "samples.json"),
        (buf.getvalue(), "symlink"),
        (tar_of(base, compress=True)[:-40], "gzip"),
    ]
    for data, word in cases:
        await env.fails(await env.upload(data), "validate", word)


async def test_skops_shared_id_decoy_refused(env: Env) -> None:
    """A skops file hiding an edited node array under the tree array's __id__ (skops would load the decoy)."""
    pkg = healthy("tree")
    src = zipfile.ZipFile(io.BytesIO(model_bytes(pkg)))
    schema = json.loads(src.read("schema.json"))
    ref = schema["content"]["content"]["tree_"]["content"]["content"]["nodes"]
    arr = np.load(io.BytesIO(src.read(ref["file"])), allow_pickle=False)
    arr["right_child"][0] = 10**9
    npy = io.BytesIO()
    np.save(npy, arr, allow_pickle=False)
    schema["content"]["content"]["decoy"] = {**ref, "file": "decoy.npy"}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, json.dumps(schema) if info.filename == "schema.json" else src.read(info))
        dst.writestr("decoy.npy", npy.getvalue())
    deployment_id = await env.upload(with_model(pkg, out.getvalue(), name="decoy").data)
    await env.fails(deployment_id, "validate", "unsafe model structure")


async def test_onnx_memory_blow_up_contained_in_the_sandbox(env: Env) -> None:
    """An ONNX model asking for 256 GiB when it predicts fails inside the sandbox (its address-space limit) at
    serving-validation; ingest carries on (the next test deploys)."""
    deployment_id = await env.upload(onnx_package("blowup", memory_blowup_onnx()).data)
    await env.fails(deployment_id, "serving-validation", "onnx")


async def test_ingest_keeps_deploying_after_all_of_them(env: Env) -> None:
    """The last word: after every hostile case above, healthy models of each flavor deploy."""
    await env.deploys("healthy-after")
    for kind in ("xgboost", "lightgbm", "hgb"):
        outcome = await env.watcher.outcome(await env.upload(healthy(kind, name=f"after-{kind}").data))
        assert isinstance(outcome, DeploymentCompleted), outcome
