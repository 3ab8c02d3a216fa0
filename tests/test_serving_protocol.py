"""The Open Inference Protocol surface of a node: a real client library, malformed bodies, endpoints, telemetry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher, read_topic
from modelcd.events.schemas import Route, TrafficPolicy
from modelcd.store.blobs import open_store

from ._serving import (
    deploy,
    eventually,
    infer_body,
    iris_package,
    iris_rows,
    node_settings,
    running_node,
    set_traffic,
)


async def test_triton_client_works_unchanged(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Triton's OIP client (JSON and binary tensors) talks to the node: health, metadata, readiness, infer."""
    import tritonclient.http.aio as triton

    settings = node_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
        async with running_node(settings) as n:
            client = triton.InferenceServerClient(n.node.url.removeprefix("http://"))
            try:
                assert await client.is_server_live() and await client.is_server_ready()
                assert await client.is_model_ready("iris") and await client.is_model_ready("iris", "1")
                meta = await client.get_model_metadata("iris", "1")
                assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
                x = np.asarray(iris_rows(3), dtype=np.float64)
                for binary in (False, True):
                    inp = triton.InferInput("input", list(x.shape), "FP64")
                    inp.set_data_from_numpy(x, binary_data=binary)
                    out = triton.InferRequestedOutput("label", binary_data=binary)
                    result = await client.infer("iris", [inp], outputs=[out], request_id="r-1")
                    assert result.get_response()["model_version"] == "1"
                    assert result.get_response()["id"] == "r-1"
                    assert result.as_numpy("label").tolist() == [0, 0, 0]
                    assert result.as_numpy("probabilities") is None  # only what was asked for
            finally:
                await client.close()


MALFORMED = [
    (json.dumps(infer_body([[1.0, 2.0, 3.0]])), "shape"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}),
     "datatype INT64"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FLOAT", "data": [1, 2, 3, 4]}]}),
     "not an Open Inference Protocol datatype"),
    (json.dumps({"inputs": [{"name": "other", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}),
     "unknown input 'other'"),
    (json.dumps({"inputs": []}), "missing input 'input'"),
    (json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}),
     "has 4 elements"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": ["a", 2, 3, 4]}]}),
     "does not fit its datatype"),
    ('{"inputs": [', "not valid JSON"),
    ('{"outputs": []}', "not an inference request"),
    ('{"inputs": [{"name": "input", "shape": "1x4", "datatype": "FP64", "data": []}]}', "$.inputs[0].shape"),
    (json.dumps(infer_body(outputs=[{"name": "nope"}])), "unknown output 'nope'"),
]


async def test_malformed_bodies_get_400_with_a_reason(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Wrong shape, datatype or input, or invalid JSON each get a 400 whose reason says what is wrong."""
    settings = node_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
        async with running_node(settings) as n:
            for body, reason in MALFORMED:
                r = await n.client.post("/v2/models/iris/infer", content=body,
                                        headers={"content-type": "application/json"})
                assert r.status_code == 400, (reason, r.text)
                assert reason in r.json()["error"], (reason, r.text)
            assert (await n.infer("iris")).status_code == 200  # the node is unharmed


async def test_endpoint_routes_by_policy_and_names_the_answering_version(broker: EmbeddedBroker,
                                                                        tmp_path: Path) -> None:
    """An endpoint splits by weight, sticky per key; the response names the model and version that answered."""
    settings = node_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("fraud", "1", depth=2))
        await deploy(store, pub, iris_package("fraud", "2", depth=3))
        await set_traffic(store, pub, TrafficPolicy(endpoint="fraud-ep", routes=[
            Route(model="fraud", version="1", weight=50), Route(model="fraud", version="2", weight=50)]))
        async with running_node(settings) as n:
            seen = set()
            for i in range(40):
                r = await n.infer("fraud-ep")
                assert r.status_code == 200
                seen.add((r.json()["model_name"], r.json()["model_version"]))
            assert seen == {("fraud", "1"), ("fraud", "2")}
            sticky = {(await n.infer("fraud-ep", headers={"x-modelcd-key": "user-7"})).json()["model_version"]
                      for _ in range(10)}
            assert len(sticky) == 1
            r = await n.client.get("/openapi.json")
            assert "/v2/models/{name}/infer" in r.json()["paths"]


async def test_telemetry_usage_aggregated_logs_sampled_heartbeats(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Usage is one report per model per interval, prediction logs follow the rate, heartbeats list loaded models."""
    settings = node_settings(tmp_path, broker.bootstrap, usage_interval=3600, prediction_log_rate=1.0)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
        async with running_node(settings) as n:
            for _ in range(25):
                assert (await n.infer("iris", infer_body(id="req-1"))).status_code == 200
            n.node.telemetry.flush_usage()
            await eventually(lambda: n.node.telemetry.buffered == 0 and n.node.telemetry.stats.published >= 27,
                             what="telemetry published")
        usage = [e for e, _, _ in await read_topic(broker.config, "modelcd.usage")]
        assert [(u.model, u.version, u.count) for u in usage] == [("iris", "1", 25)]
        logs = [e for e, _, _ in await read_topic(broker.config, "modelcd.predictions")]
        assert len(logs) == 25 and logs[0].request_id == "req-1" and logs[0].outputs["label"]["shape"] == [2]
        health = [e for e, _, _ in await read_topic(broker.config, "modelcd.health")]
        statuses = [e for e in health if type(e).__name__ == "NodeStatus"]
        assert any(s.ready and [m.name for m in s.models] == ["iris"] for s in statuses)
        assert any(type(e).__name__ == "ModelHealth" and e.check == "load" and e.ok for e in health)
