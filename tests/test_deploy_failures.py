"""Failures end deployments: whatever fails (package source, store, timeout), every deployment reaches
DeploymentFailed with a reason, after retries with backoff within a total time, or completes once the outage ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aioboto3
import httpx
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, DeployRequested
from modelcd.store.blobs import LocalStore
from modelcd.store.targets import TargetState

from ._ingest import iris_package, running_ingest, settings_for

_AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN",
                    "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


async def _request(broker: EmbeddedBroker, package_uri: str) -> DeployRequested:
    request = DeployRequested(model="iris", package_uri=package_uri)
    async with Publisher(broker.config, "test") as pub:
        await pub.publish(request)
    return request


async def _record(home: Path, deployment_id: str) -> dict[str, object]:
    import json

    return dict(json.loads(await LocalStore(home / "store").get(f"deployments/{deployment_id}.json")))


async def test_s3_without_credentials_fails_with_the_reason(broker: EmbeddedBroker, s3_endpoint: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`{"package_uri": "s3://bucket/key.tar"}` with no AWS credentials ends DeploymentFailed naming them, instead
    of being dropped after three quick attempts."""
    for name in _AWS_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path,
                            s3_endpoint_url=s3_endpoint, deploy_retry_time=30.0)
    async with running_ingest(settings) as watcher:
        request = await _request(broker, "s3://bucket/key.tar")
        outcome = await watcher.outcome(request.deployment_id, timeout=30)
    assert isinstance(outcome, DeploymentFailed), outcome
    assert outcome.step == "validate" and "credentials" in outcome.reason and "AWS_ACCESS_KEY_ID" in outcome.reason
    assert (await _record(tmp_path, request.deployment_id))["status"] == "failed"


async def test_unreachable_s3_fails_after_the_retry_time(broker: EmbeddedBroker, s3_endpoint: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 endpoint that refuses connections is retried with backoff for MODELCD_DEPLOY_RETRY_TIME, then the
    deployment fails saying how often it tried and what failed (and its record says so)."""
    del s3_endpoint  # for its fake credentials: the endpoint used is one nobody listens on
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one connection per attempt: ours are the retries under test
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path,
                            s3_endpoint_url=f"http://127.0.0.1:{free_port()}", deploy_retry_time=2.0)
    async with running_ingest(settings) as watcher:
        request = await _request(broker, "s3://bucket/key.tar")
        outcome = await watcher.outcome(request.deployment_id, timeout=60)
    assert isinstance(outcome, DeploymentFailed), outcome
    assert outcome.step == "validate" and "gave up after" in outcome.reason and "S3 unreachable" in outcome.reason
    assert ("validate", "failed") in watcher.steps(request.deployment_id)
    record = await _record(tmp_path, request.deployment_id)
    assert record["status"] == "failed" and record["reason"] == outcome.reason


@contextlib.asynccontextmanager
async def _late_proxy(port: int, target: tuple[str, int], opens: asyncio.Event) -> AsyncIterator[None]:
    """A TCP forwarder to `target` that listens on `port` only once `opens` is set: an S3 outage that ends."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    async def serve() -> None:
        await opens.wait()
        server = await asyncio.start_server(forward, "127.0.0.1", port)
        async with server:
            await asyncio.Event().wait()

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_short_s3_outage_does_not_lose_the_deployment(broker: EmbeddedBroker, s3_endpoint: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 unreachable for the first attempts, then back: the deployment retries with backoff and completes."""
    # botocore's own retries would hide the outage inside one attempt: every attempt here is one connection.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = f"training-{uuid.uuid4().hex[:8]}"
    async with aioboto3.Session().client("s3", endpoint_url=s3_endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key="m.tar", Body=iris_package("iris").data)
    host, _, moto_port = s3_endpoint.removeprefix("http://").partition(":")
    port, opens = free_port(), asyncio.Event()
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), port=free_port(), home=tmp_path,
                            s3_endpoint_url=f"http://127.0.0.1:{port}", deploy_retry_time=60.0)
    async with _late_proxy(port, (host, int(moto_port)), opens), running_ingest(settings) as watcher:
        request = await _request(broker, f"s3://{bucket}/m.tar")
        # The outage lasts past the old consumer's three quick attempts.
        await asyncio.sleep(2.5)
        opens.set()
        outcome = await watcher.outcome(request.deployment_id, timeout=30)
    assert isinstance(outcome, DeploymentCompleted), outcome
    assert watcher.steps(request.deployment_id).count(("validate", "started")) >= 2
    assert await TargetState(LocalStore(tmp_path / "store")).get_model("iris", "1") is not None


async def test_a_request_that_keeps_killing_ingest_fails(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A request picked up MAX_PICKUPS times without ending (each pickup killed ingest) fails saying so, instead
    of being handled again after every restart."""
    from modelcd.ingest.policy import MAX_PICKUPS, AcceptedRequest, accepted_encoder

    request = DeployRequested(model="iris", package_uri="store:uploads/crashes.tar")
    store = LocalStore(tmp_path / "store")
    await store.put(f"requests/{request.deployment_id}.json", accepted_encoder.encode(
        AcceptedRequest(request=request, accepted_at=request.requested_at, pickups=MAX_PICKUPS)))
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path)
    async with running_ingest(settings) as watcher:  # it publishes the request again on start
        outcome = await watcher.outcome(request.deployment_id, timeout=30)
    assert isinstance(outcome, DeploymentFailed), outcome
    assert f"ingest stopped {MAX_PICKUPS} times" in outcome.reason
    assert await store.list("requests/") == []
    assert (await _record(tmp_path, request.deployment_id))["status"] == "failed"


async def test_a_deployment_past_its_time_limit_fails(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """An attempt longer than MODELCD_DEPLOY_TIMEOUT ends DeploymentFailed naming the limit and the step it was
    in, and the staged upload goes."""
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), port := free_port(), tmp_path,
                            deploy_timeout=0.02)  # a whole deployment can take ~0.1 s
    async with running_ingest(settings) as watcher, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        resp = await client.post("/deployments", content=iris_package("iris").data,
                                 headers={"content-type": "application/x-tar"})
        deployment_id = resp.json()["deployment_id"]
        outcome = await watcher.outcome(deployment_id, timeout=30)
        async with asyncio.timeout(30):  # the API's tracker folds the outcome in too
            while (view := (await client.get(f"/deployments/{deployment_id}")).json())["status"] == "running":
                await asyncio.sleep(0.1)
    assert isinstance(outcome, DeploymentFailed), outcome
    assert "MODELCD_DEPLOY_TIMEOUT" in outcome.reason and outcome.step in outcome.reason
    assert view["status"] == "failed" and view["failed_step"] == outcome.step
    store = LocalStore(tmp_path / "store")
    assert await store.list("uploads/") == [] and await store.list("requests/") == []
