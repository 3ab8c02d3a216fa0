"""End to end against a real broker and a real S3 endpoint: both doors (the CLI over the HTTP API, and a
plain Kafka producer) reach ModelState with the full progress sequence, and the store lives in S3."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import aioboto3
import msgspec
from aiokafka import AIOKafkaProducer

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import DeploymentCompleted, DeployRequested
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

from ._ingest import FULL_SEQUENCE, iris_package, running_ingest, settings_for, with_tampered_member

# The console script, not `python -m modelcd.cli`: run as __main__, modelcd.cli is imported a second time and
# its CliError is another class than the one the component CLIs raise.
MODELCD = [str(Path(sys.executable).parent / "modelcd")]


def cli_env(url: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_INGEST_URL=url, MODELCD_API_TOKEN=token)
    return env


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*MODELCD, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_both_doors_reach_model_state_in_s3(broker: EmbeddedBroker, s3_endpoint: str, s3_store_url: str,
                                                  tmp_path: Path) -> None:
    """`modelcd deploy FILE` (HTTP, with a token) and a raw Kafka DeployRequested pointing at s3:// both end in a
    ModelState, the target state and package in the S3 store, each with the full sequence of progress events;
    a bad package makes `modelcd deploy` exit 1 with the reason."""
    port = free_port()
    settings = settings_for(broker.bootstrap, s3_store_url, port, tmp_path, s3_endpoint_url=s3_endpoint,
                            api_token="tok")
    env = cli_env(f"http://127.0.0.1:{port}", "tok")
    http_pkg, kafka_pkg = iris_package("via-http"), iris_package("via-kafka")
    (tmp_path / "m.tar").write_bytes(http_pkg.data)
    (tmp_path / "bad.tar").write_bytes(with_tampered_member(iris_package("bad"), "samples.json"))

    # A training pipeline's bucket, apart from the store's.
    bucket = f"training-{uuid.uuid4().hex[:8]}"
    async with aioboto3.Session().client("s3", endpoint_url=s3_endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key="runs/42/model.tar", Body=kafka_pkg.data)

    async with running_ingest(settings) as watcher:
        code, out, err = await run_cli(env, "deploy", str(tmp_path / "m.tar"))
        assert code == 0, err
        assert "publish succeeded" in out and "via-http:1 done" in out

        # The Kafka door, with nothing of modelcd's: a plain producer and hand-written CloudEvents headers.
        request = DeployRequested(model="via-kafka", package_uri=f"s3://{bucket}/runs/42/model.tar",
                                  owner="pipeline-42", expiry_seconds=7200)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                "modelcd.deploy-requests", msgspec.json.encode(request), key=b"via-kafka",
                headers=[("ce_specversion", b"1.0"), ("ce_id", uuid.uuid4().hex.encode()),
                         ("ce_source", b"training-pipeline"), ("ce_type", DeployRequested.ce_type().encode()),
                         ("content-type", b"application/json")])
        finally:
            await producer.stop()
        outcome = await watcher.outcome(request.deployment_id)
        assert isinstance(outcome, DeploymentCompleted), outcome
        assert watcher.steps(request.deployment_id) == FULL_SEQUENCE

        http_ids = [d for d, events in watcher.by_deployment.items()
                    if any(getattr(e, "model", "") == "via-http" for e in events)]
        assert len(http_ids) == 1 and watcher.steps(http_ids[0]) == FULL_SEQUENCE

        code, out, err = await run_cli(env, "deploy", str(tmp_path / "bad.tar"))
        assert code == 1 and "checksum mismatch" in err and "Traceback" not in err

        code, out, _ = await run_cli(env, "models")
        assert code == 0 and "via-http" in out and "via-kafka" in out and "pipeline-42" in out

        code, _, err = await run_cli({**env, "MODELCD_API_TOKEN": "wrong"}, "models")
        assert code == 2 and "401" in err, err

    (kafka_state,) = watcher.states_of("via-kafka")
    assert kafka_state.owner == "pipeline-42" and kafka_state.expiry_seconds == 7200
    async with open_store(s3_store_url, endpoint_url=s3_endpoint) as store:
        targets = {(m.name, m.target) for m in await TargetState(store).models()}
        assert targets == {("via-http", "serving"), ("via-kafka", "serving")}
        assert await store.exists(kafka_state.package_uri.removeprefix("store:"))
        assert await store.list("uploads/") == []
