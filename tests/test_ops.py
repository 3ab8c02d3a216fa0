"""Ops commands against a real broker: replay (filters, undecodable records, lossless dump, --to), tail,
topics list, logs export and state check, with exact counts and values."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import ensure_topics
from modelcd.events.records import RawRecord, scan
from modelcd.events.schemas import (
    DeploymentCompleted, DeploymentFailed, DeploymentProgress, ModelState, PredictionLog, Route, ShadowPrediction,
    TrafficPolicy,
)
from modelcd.ops import compare_states, log_rows
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

MODELCD = [sys.executable, "-m", "modelcd"]


def env_for(broker: EmbeddedBroker, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="false", **extra)
    return env


async def modelcd(broker: EmbeddedBroker, *argv: str, timeout: float = 90, **extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*MODELCD, *argv, env=env_for(broker, **extra),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def raw_send(broker: EmbeddedBroker, topic: str, records: list[tuple[bytes | None, bytes | None, list]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def deployments_with_poison(broker: EmbeddedBroker) -> None:
    """Five deployment events for two deployments, and two records that are not events."""
    await ensure_topics(broker.config)
    async with Publisher(broker.config, "test") as pub:
        await pub.publish(DeploymentProgress(deployment_id="d1", step="validate", status="started"))
        await pub.publish(DeploymentProgress(deployment_id="d1", step="validate", status="succeeded"))
        await pub.publish(DeploymentCompleted(deployment_id="d1", model="iris", version="1"))
        await pub.publish(DeploymentProgress(deployment_id="d2", step="validate", status="started"))
        await pub.publish(DeploymentFailed(deployment_id="d2", step="validate", reason="no manifest"))
    await raw_send(broker, "modelcd.deployments", [
        (b"d3", b"not json", [("ce_type", b"modelcd.deployment.progress.v1")]),
        (b"d3", b"\xff\xfe binary", []),
    ])


async def test_replay_reports_undecodable_records(broker: EmbeddedBroker) -> None:
    """`modelcd replay` prints every event and names each record it cannot decode on stderr (it dropped them)."""
    await deployments_with_poison(broker)
    code, out, err = await modelcd(broker, "replay", "modelcd.deployments")
    assert code == 0, err
    assert len(out.splitlines()) == 5
    assert err.count("undecodable record modelcd.deployments[") == 2
    assert "5 events printed, 2 undecodable" in err


async def test_replay_filters_by_type_key_offset_and_since(broker: EmbeddedBroker) -> None:
    """--type (class name or ce_type), --key, --since 5m and --offset each keep exactly the matching events."""
    await deployments_with_poison(broker)
    code, out, _ = await modelcd(broker, "replay", "modelcd.deployments", "--type", "DeploymentFailed",
                                 "--type", "modelcd.deployment.completed.v1")
    assert code == 0 and sorted(json.loads(line)["deployment_id"] for line in out.splitlines()) == ["d1", "d2"]
    code, out, _ = await modelcd(broker, "replay", "modelcd.deployments", "--key", "d2", "--since", "5m")
    assert code == 0 and [json.loads(line)["type"] for line in out.splitlines()] == [
        "modelcd.deployment.progress.v1", "modelcd.deployment.failed.v1"]
    code, out, _ = await modelcd(broker, "replay", "modelcd.deployments", "--since", "0s")
    assert code == 0 and out == ""  # nothing was written in the future
    by_partition: dict[int, int] = {}
    async for rec in scan(broker.config, "modelcd.deployments"):
        by_partition[rec.partition] = by_partition.get(rec.partition, 0) + 1
    code, out, err = await modelcd(broker, "replay", "modelcd.deployments", "--offset", "1")
    # every partition skips its first record
    assert code == 0 and len(out.splitlines()) + err.count("undecodable record modelcd") == 7 - len(by_partition)
    code, _, err = await modelcd(broker, "replay", "modelcd.deployments", "--type", "NoSuchEvent")
    assert code == 2 and "DeploymentFailed" in err


async def test_replay_dump_round_trip_is_lossless(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """--out FILE then --from-file FILE --to TOPIC reproduces keys, values and headers byte for byte."""
    await deployments_with_poison(broker)
    dump = tmp_path / "deployments.jsonl"
    code, _, err = await modelcd(broker, "replay", "modelcd.deployments", "--out", str(dump))
    assert code == 0 and "wrote 7 records" in err
    code, out, _ = await modelcd(broker, "replay", "modelcd.deployments", "--out", "-")
    assert code == 0 and sorted(out.splitlines()) == sorted(dump.read_text().splitlines())
    code, _, err = await modelcd(broker, "replay", "--from-file", str(dump), "--to", "backup.deployments")
    assert code == 0 and "published 7 records" in err

    def content(records: list[RawRecord]) -> list[tuple]:
        return sorted((r.key, r.value, r.headers) for r in records)

    original = [r async for r in scan(broker.config, "modelcd.deployments")]
    copied = [r async for r in scan(broker.config, "backup.deployments")]
    assert len(original) == 7 and content(copied) == content(original)


async def test_replay_into_a_live_topic_needs_force(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Publishing a replay into modelcd.model-state is refused (exit 1) unless --force."""
    await ensure_topics(broker.config)
    async with Publisher(broker.config, "test") as pub:
        await pub.publish(ModelState(name="a", version="1", target="serving"))
    dump = tmp_path / "state.jsonl"
    assert (await modelcd(broker, "replay", "modelcd.model-state", "--out", str(dump)))[0] == 0
    code, _, err = await modelcd(broker, "replay", "--from-file", str(dump), "--to", "modelcd.model-state")
    assert code == 1 and "--force" in err
    code, _, err = await modelcd(broker, "replay", "--from-file", str(dump), "--to", "modelcd.model-state", "--force")
    assert code == 0 and "published 1 records" in err
    assert len([r async for r in scan(broker.config, "modelcd.model-state")]) == 2


async def test_topics_list_names_every_topic(broker: EmbeddedBroker) -> None:
    """`modelcd topics list` exists (its --help promised "create or list") and shows partitions and events."""
    await ensure_topics(broker.config)
    code, out, err = await modelcd(broker, "topics", "list", "--json")
    assert code == 0, err
    rows = {r["topic"]: r for r in json.loads(out)}
    assert rows["modelcd.model-state"]["cleanup"] == "compact" and rows["modelcd.model-state"]["exists"]
    assert rows["modelcd.deployments"]["partitions"] == 3
    assert "modelcd.deploy.requested.v1" in rows["modelcd.deploy-requests"]["events"]


async def test_tail_prints_new_events(broker: EmbeddedBroker) -> None:
    """`modelcd tail TOPIC --count 2` prints the next two events, decoded, and exits."""
    await ensure_topics(broker.config)
    proc = await asyncio.create_subprocess_exec(*MODELCD, "tail", "modelcd.model-state", "--from-beginning",
                                                "--count", "2", env=env_for(broker),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with Publisher(broker.config, "test") as pub:
        # one key, so one partition, in this order
        await pub.publish(ModelState(name="a", version="1", target="serving"))
        await raw_send(broker, "modelcd.model-state", [(b"a:1", b"{", [])])
        await pub.publish(ModelState(name="a", version="1", target="retired"))
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err
    assert [json.loads(line)["target"] for line in out.decode().splitlines()] == ["serving", "retired"]
    assert b"undecodable record" in err


def test_log_rows_flatten_tensors() -> None:
    """One row per log; one column per tensor; single values as scalars, rows as lists."""
    rows = log_rows([PredictionLog(request_id="r", model="m", version="1", node="n", at=5.0,
                                   inputs={"x": {"datatype": "FP64", "shape": [1, 2], "data": [1.0, 2.0]}},
                                   outputs={"y": {"datatype": "INT64", "shape": [1], "data": [3]}})])
    assert rows == [{"request_id": "r", "model": "m", "version": "1", "endpoint": "", "node": "n", "at": 5.0,
                     "latency_ms": 0.0, "status": 200, "error": None, "source": "log", "input.x": [1.0, 2.0],
                     "output.y": 3}]


def test_shadowed_requests_count_once_per_request() -> None:
    """A request with two shadows is one row (its primary's answer), with the primary's latency."""
    from modelcd.events.schemas import ShadowPrediction
    from modelcd.ops import shadowed_primaries

    preds = [ShadowPrediction(request_id="q", primary_model="iris", primary_version="1", shadow_model="iris",
                              shadow_version=v, primary_outputs={"label": {"datatype": "INT64", "shape": [1],
                                                                           "data": [2]}},
                              primary_latency_ms=1.5, node="n", at=7.0) for v in ("2", "3")]
    (row,) = log_rows(shadowed_primaries(preds), source="shadow")
    assert (row["request_id"], row["model"], row["version"], row["output.label"], row["latency_ms"],
            row["source"]) == ("q", "iris", "1", 2, 1.5, "shadow")


async def test_logs_export_parquet_per_model_across_nodes(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`modelcd logs export --since 1h --model iris --out logs.parquet`: every node's logs of that model, exactly."""
    import pandas as pd

    await ensure_topics(broker.config)
    async with Publisher(broker.config, "test") as pub:
        for i in range(6):
            await pub.publish(PredictionLog(
                request_id=f"r{i}", model="iris" if i < 4 else "wine", version=str(1 + i % 2), node=f"node-{i % 3}",
                inputs={"input": {"datatype": "FP64", "shape": [1, 2], "data": [float(i), 0.5]}},
                outputs={"label": {"datatype": "INT64", "shape": [1], "data": [i % 3]}}, latency_ms=float(i)))
    out = tmp_path / "logs.parquet"
    code, _, err = await modelcd(broker, "logs", "export", "--since", "1h", "--model", "iris", "--out", str(out))
    assert code == 0, err
    frame = pd.read_parquet(out)
    assert sorted(frame.request_id) == ["r0", "r1", "r2", "r3"]
    assert sorted(frame.node.unique()) == ["node-0", "node-1", "node-2"]
    assert frame.groupby("version").size().to_dict() == {"1": 2, "2": 2}
    r2 = frame.set_index("request_id").loc["r2"]
    assert list(r2["input.input"]) == [2.0, 0.5] and r2["output.label"] == 2 and r2["latency_ms"] == 2.0
    assert str(frame["at"].dtype).startswith("datetime64") and "UTC" in str(frame["at"].dtype)
    code, _, err = await modelcd(broker, "logs", "export", "--model", "iris", "--version", "2", "--out", "-")
    assert code == 0 and "2 prediction logs" in err

    # A shadowed request is not in modelcd.predictions: its primary answer comes from the shadow's record.
    async with Publisher(broker.config, "test") as pub:
        for shadow_version in ("3", "4"):
            await pub.publish(ShadowPrediction(
                request_id="s1", primary_model="iris", primary_version="2", shadow_model="iris",
                shadow_version=shadow_version, node="node-1", primary_latency_ms=9.0,
                primary_outputs={"label": {"datatype": "INT64", "shape": [1], "data": [1]}}))
    code, _, err = await modelcd(broker, "logs", "export", "--model", "iris", "--out", str(out))
    assert code == 0 and "4 prediction logs and 1 shadowed requests" in err, err
    frame = pd.read_parquet(out)
    assert len(frame) == 5 and frame.set_index("request_id").loc["s1", "source"] == "shadow"
    code, _, err = await modelcd(broker, "logs", "export", "--model", "iris", "--no-shadowed", "--out", str(out))
    assert code == 0 and len(pd.read_parquet(out)) == 4


def test_compare_states_names_the_fields_that_differ() -> None:
    """State check's comparison: missing on either side, or the fields that differ."""
    a = ModelState(name="m", version="1", target="serving", sha256="a", at=1.0)
    diffs = compare_states("model", {"m:1": a, "m:2": a},
                           {"m:1": ModelState(name="m", version="1", target="retired", sha256="a", at=1.0),
                            "m:3": a})
    assert [(d.key, d.fields, d.events is None, d.store is None) for d in diffs] == [
        ("m:1", ("target",), False, False), ("m:2", (), False, True), ("m:3", (), True, False)]
    assert "target: events 'serving' / store 'retired'" in diffs[0].describe()


async def test_state_check_and_repair_both_ways(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`modelcd state check` prints each difference (exit 1); --repair store / events make them agree (exit 0)."""
    await ensure_topics(broker.config)
    store_url = str(tmp_path / "store")
    serving = ModelState(name="iris", version="1", target="serving", sha256="aa", at=1.0)
    async with Publisher(broker.config, "test") as pub:
        await pub.publish(serving)
        await pub.publish(ModelState(name="iris", version="2", target="serving", sha256="bb", at=1.0))
        await pub.publish(TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100)]))
    async with open_store(store_url) as store:
        targets = TargetState(store)
        await targets.put_model(ModelState(name="iris", version="1", target="retired", sha256="aa", at=1.0))
        await targets.put_model(ModelState(name="wine", version="1", target="serving", sha256="cc", at=1.0))
    code, out, err = await modelcd(broker, "state", "check", MODELCD_STORE_URL=store_url)
    assert code == 1, err
    lines = sorted(out.splitlines())
    assert len(lines) == 4
    assert any(line.startswith("model iris:1: differs: target") for line in lines)
    assert any(line.startswith("model iris:2: in the events") for line in lines)
    assert any(line.startswith("model wine:1: in the store") for line in lines)
    assert any(line.startswith("endpoint iris: in the events") for line in lines)
    code, _, err = await modelcd(broker, "state", "check", "--repair", "store", MODELCD_STORE_URL=store_url)
    assert code == 0 and "repaired 3 of 4" in err
    code, _, err = await modelcd(broker, "state", "check", "--repair", "events", MODELCD_STORE_URL=store_url)
    assert code == 0 and "repaired 1 of 1" in err
    code, out, err = await modelcd(broker, "state", "check", MODELCD_STORE_URL=store_url)
    assert code == 0 and out == "", err
    async with open_store(store_url) as store:
        assert (await TargetState(store).get_model("iris", "1")) == serving


@pytest.mark.parametrize("argv", [["replay"], ["replay", "nope"], ["tail", "nope"]])
def test_ops_usage_errors_exit_2(argv: list[str]) -> None:
    """A missing or unknown topic is a usage error: exit 2 and the list of topics."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    proc = subprocess.run([*MODELCD, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "modelcd.model-state" in proc.stderr

