"""The pipeline behind a running ingest service (real broker, local store): each failure class, idempotency,
the ONNX compile path and its fallback, retirement. One broker and one ingest instance serve the module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, DeployRequested, RetireRequested
from modelcd.runtimes.flavors import load_runtime, outputs_match
from modelcd.store.blobs import LocalStore, get_package
from modelcd.store.package import read_package
from modelcd.store.targets import TargetState

from ._ingest import (
    FULL_SEQUENCE,
    Watcher,
    endless_loop_onnx,
    iris_package,
    members_of,
    onnx_package,
    running_ingest,
    settings_for,
    tar_of,
    with_tampered_member,
    without_manifest_item,
)


class Env:
    def __init__(self, broker: EmbeddedBroker, store: LocalStore, watcher: Watcher, url: str) -> None:
        self.broker, self.store, self.watcher, self.url = broker, store, watcher, url
        self.targets = TargetState(store)

    async def upload(self, data: bytes) -> str:
        async with httpx.AsyncClient(base_url=self.url) as client:
            resp = await client.post("/deployments", content=data, headers={"content-type": "application/x-tar"})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["deployment_id"])

    async def snapshot(self) -> list[str]:
        return [k for prefix in ("packages/", "targets/", "uploads/") for k in await self.store.list(prefix)]

    async def fails(self, data: bytes, step: str, *words: str) -> None:
        """Upload `data`, expect DeploymentFailed at `step` naming `words`, and the store left as it was."""
        before = await self.snapshot()
        deployment_id = await self.upload(data)
        outcome = await self.watcher.outcome(deployment_id)
        assert isinstance(outcome, DeploymentFailed), outcome
        assert outcome.step == step and all(w in outcome.reason for w in words), outcome.reason
        assert (step, "failed") in self.watcher.steps(deployment_id)
        # The staged upload goes right after the outcome is published and recorded: wait for it, bounded.
        async with asyncio.timeout(10):
            while await self.snapshot() != before:
                await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    home = tmp_path_factory.mktemp("ingest")
    broker = EmbeddedBroker(port=free_port(), log_file=home / "tansu.log")
    await broker.start()
    port = free_port()
    settings = settings_for(broker.bootstrap, str(home / "store"), port, home, validation_timeout=4.0,
                            max_package_bytes=4 * 1024**2, validation_warm=True)  # the sandbox zygote, as in production
    try:
        async with running_ingest(settings) as watcher:
            yield Env(broker, LocalStore(home / "store"), watcher, f"http://127.0.0.1:{port}")
    finally:
        await broker.stop()


async def test_missing_manifest_item_fails_naming_it(env: Env) -> None:
    """A manifest without its expiry period fails validation naming `expiry_seconds`."""
    await env.fails(without_manifest_item(iris_package("no-expiry"), "expiry_seconds"), "validate", "expiry_seconds")


async def test_checksum_mismatch_fails(env: Env) -> None:
    """A member whose content differs from the manifest's sha256 fails validation naming the member."""
    await env.fails(with_tampered_member(iris_package("tampered"), "samples.json"), "validate",
                    "checksum mismatch", "samples.json")


async def test_wrong_expected_outputs_fail_serving_validation(env: Env) -> None:
    """A model whose predictions differ from the package's expected outputs fails serving validation."""
    pkg = iris_package("liar", expected_outputs={"label": [2] * 8, "probabilities": [[0.0, 0.0, 1.0]] * 8})
    await env.fails(pkg.data, "serving-validation", "differ from the expected outputs")


async def test_model_raising_at_load_fails(env: Env) -> None:
    """An ONNX model file that is garbage fails serving validation with the load error."""
    await env.fails(onnx_package("garbage", b"\x08\x07not a protobuf").data, "serving-validation", "does not load")


async def test_hanging_model_is_killed(env: Env) -> None:
    """A model that never finishes predicting is killed at MODELCD_VALIDATION_TIMEOUT and fails."""
    await env.fails(onnx_package("endless", endless_loop_onnx()).data, "serving-validation", "killed after 4 s")


async def test_oversize_archive_fails(env: Env) -> None:
    """An archive that unpacks beyond MODELCD_MAX_PACKAGE_BYTES (a small gzip bomb) fails validation."""
    pkg = iris_package("bomb")
    await env.fails(tar_of([*members_of(pkg.data), ("zeros.bin", bytes(5 * 1024**2))], compress=True),
                    "validate", "too large")


async def test_dotdot_member_fails(env: Env) -> None:
    """An archive with a `..` member fails validation naming it."""
    await env.fails(tar_of([("../evil.py", b"import os"), *members_of(iris_package("dotdot").data)]),
                    "validate", "'..'")


async def test_onnx_compile_path_serves_same_predictions(env: Env) -> None:
    """A scikit-learn model deploys compiled to ONNX, with the full step sequence, and the stored package's
    ONNX model predicts the sample outputs; the staged upload is gone."""
    pkg = iris_package("compiled")
    deployment_id = await env.upload(pkg.data)
    outcome = await env.watcher.outcome(deployment_id)
    assert isinstance(outcome, DeploymentCompleted) and outcome.runtime == "onnx"
    assert env.watcher.steps(deployment_id) == FULL_SEQUENCE
    (state,) = env.watcher.states_of("compiled")
    assert state.runtime == "onnx" and state.flavor == "sklearn" and state.owner == "ann"
    assert state.package_uri == f"store:packages/{state.sha256[:2]}/{state.sha256}.tar"
    assert state.resources.memory_bytes > 0 and state.resources.predict_us > 0
    assert await env.targets.get_model("compiled", "1") == state
    stored = read_package(await get_package(env.store, state.sha256))
    samples = stored.samples()
    onnx = load_runtime(stored.manifest, stored.contents)
    assert outputs_match(samples.outputs, onnx.predict(samples.inputs), stored.manifest.tolerance) is None
    assert await env.store.list("uploads/") == []


async def test_unconvertible_model_falls_back_to_sklearn(env: Env) -> None:
    """A model skl2onnx cannot convert deploys on the original sklearn runtime, saying why."""
    from sklearn.kernel_ridge import KernelRidge

    deployment_id = await env.upload(iris_package("kernel", model=KernelRidge()).data)
    outcome = await env.watcher.outcome(deployment_id)
    assert isinstance(outcome, DeploymentCompleted) and outcome.runtime == "sklearn"
    compile_done = [e for e in env.watcher.by_deployment[deployment_id]
                    if getattr(e, "step", "") == "compile" and getattr(e, "status", "") == "succeeded"]
    assert "skl2onnx cannot convert KernelRidge" in compile_done[0].detail  # type: ignore[attr-defined]


async def test_identical_package_twice_is_one_package_one_state(env: Env) -> None:
    """Deploying the same archive twice: the second is a no-op naming the first; one package, one ModelState."""
    pkg = iris_package("twice")
    first = await env.watcher.outcome(await env.upload(pkg.data))
    packages = await env.store.list("packages/")
    second_id = await env.upload(pkg.data)
    second = await env.watcher.outcome(second_id)
    assert isinstance(first, DeploymentCompleted) and not first.noop
    assert isinstance(second, DeploymentCompleted) and second.noop
    assert second.existing_deployment_id == first.deployment_id and second.sha256 == first.sha256
    assert ("compile", "skipped") in env.watcher.steps(second_id)
    assert await env.store.list("packages/") == packages
    assert len(env.watcher.states_of("twice")) == 1


async def test_redelivered_request_is_harmless(env: Env) -> None:
    """The same DeployRequested delivered twice (another event id) completes once and publishes one state."""
    pkg = iris_package("redelivered")
    path = env.store.root.parent / "redelivered.tar"
    path.write_bytes(pkg.data)
    request = DeployRequested(model="redelivered", package_uri=path.as_uri())
    async with Publisher(env.broker.config, "test") as pub:
        await pub.publish(request)
        await pub.publish(request)
    outcome = await env.watcher.outcome(request.deployment_id)
    assert isinstance(outcome, DeploymentCompleted)
    # The second delivery is handled after the first ended; it is visible as a skip in ingest's counters.
    async with httpx.AsyncClient(base_url=env.url) as client:
        await _until(client, lambda h: h["deployments"]["skipped"] >= 1)
    ends = [e for e in env.watcher.by_deployment[request.deployment_id] if isinstance(e, DeploymentCompleted)]
    assert len(ends) == 1 and len(env.watcher.states_of("redelivered")) == 1


async def _until(client: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]) -> None:
    async with asyncio.timeout(60):
        while not predicate((await client.get("/healthz")).json()):
            await asyncio.sleep(0.1)


async def test_other_package_under_same_version_is_refused(env: Env) -> None:
    """A different package under an already-deployed name:version fails: versions are immutable."""
    first = await env.watcher.outcome(await env.upload(iris_package("immutable", c=1.0).data))
    assert isinstance(first, DeploymentCompleted)
    await env.fails(iris_package("immutable", c=0.01).data, "validate", "immutable")


async def test_retire_through_api_and_unknown_through_kafka(env: Env) -> None:
    """DELETE retires a model (ModelState target=retired); a RetireRequested for an unknown model fails."""
    first = await env.watcher.outcome(await env.upload(iris_package("old").data))
    assert isinstance(first, DeploymentCompleted)
    async with httpx.AsyncClient(base_url=env.url) as client:
        resp = await client.delete("/models/old/versions/1", params={"reason": "replaced"})
        assert resp.status_code == 202
        retired = await env.watcher.outcome(resp.json()["deployment_id"])
        assert isinstance(retired, DeploymentCompleted)
        assert (await client.delete("/models/old/versions/9")).status_code == 404
        models = (await client.get("/models/old")).json()["versions"]
    assert [(s.target, s.reason) for s in env.watcher.states_of("old")] == [("serving", ""), ("retired", "replaced")]
    assert [m["state"] for m in models] == ["retired"]
    unknown = RetireRequested(model="ghost", version="1")
    async with Publisher(env.broker.config, "test") as pub:
        await pub.publish(unknown)
    failed = await env.watcher.outcome(unknown.deployment_id)
    assert isinstance(failed, DeploymentFailed) and "ghost:1" in failed.reason


async def test_tracking_answers_steps_with_durations(env: Env) -> None:
    """GET /deployments/{id} shows every step with its status and duration once the deployment completed."""
    deployment_id = await env.upload(iris_package("tracked").data)
    await env.watcher.outcome(deployment_id)
    async with httpx.AsyncClient(base_url=env.url) as client:
        view: dict[str, Any] = {}
        async with asyncio.timeout(30):
            while view.get("status") != "completed":
                view = (await client.get(f"/deployments/{deployment_id}",
                                         params={"after": view.get("revision", -1), "wait": 5})).json()
    assert [s["step"] for s in view["steps"]] == ["accepted", "validate", "compile", "serving-validation", "publish"]
    assert all(s["status"] == "succeeded" for s in view["steps"])
    assert all(s["duration_ms"] is not None for s in view["steps"][1:])
    assert view["nodes_serving"] == 0 and view["runtime"] == "onnx"


async def test_progress_is_not_waited_for_but_nothing_overtakes_it() -> None:
    """Each step's progress is queued without waiting for the broker's ack (a dozen acks cost ~100 ms of every
    deployment); a ModelState or an ending waits for the progress before it, and a progress the broker refused
    fails that publish (the request is retried) instead of vanishing."""
    from modelcd.events.schemas import DeploymentProgress, ModelState
    from modelcd.ingest.pipeline import _Progress

    class Sink:
        def __init__(self) -> None:
            self.acks: list[asyncio.Future[None]] = []
            self.published: list[str] = []

        async def publish_nowait(self, event: Any) -> asyncio.Future[None]:
            self.acks.append(asyncio.get_running_loop().create_future())
            return self.acks[-1]

        async def publish(self, event: Any, *, event_id: str | None = None) -> None:
            self.published.append(type(event).__name__)

    sink = Sink()
    progress = _Progress(sink)  # type: ignore[arg-type]
    for status in ("started", "succeeded"):
        await progress.progress(DeploymentProgress(deployment_id="d", model="m", step="validate", status=status))
    assert len(sink.acks) == 2 and sink.published == []  # returned before any ack
    state = ModelState(name="m", version="1", target="serving", sha256="0" * 64, package_uri="store:x", runtime="onnx",
                       deployment_id="d")
    publishing = asyncio.create_task(progress.publish(state))
    await asyncio.sleep(0.05)
    assert not publishing.done() and sink.published == []  # held behind the unacknowledged progress
    sink.acks[0].set_result(None)
    sink.acks[1].set_exception(ConnectionError("broker went away"))
    with pytest.raises(ConnectionError):
        await publishing
    assert sink.published == []
    await progress.publish(state)  # nothing pending any more
    assert sink.published == ["ModelState"]
