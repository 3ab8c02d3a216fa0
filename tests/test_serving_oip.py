"""Open Inference Protocol completeness, as a client library sees it: the repository index the node
advertises, 405 with Allow, compressed request bodies (bounded), the request id returned and logged,
an OpenAPI document no looser than the node."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import jsonschema
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import read_topic
from modelcd.events.schemas import PredictionLog
from modelcd.serving.openapi import OPENAPI
from modelcd.store.blobs import open_store

from ._serving import deploy, eventually, infer_body, iris_package, node_settings, running_node


def test_openapi_refuses_an_empty_inputs_list() -> None:
    """The OpenAPI InferenceRequest needs at least one input (the node never accepts none)."""
    schema = OPENAPI["components"]["schemas"]["InferenceRequest"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"inputs": []}, schema)
    assert "/v2/repository/index" in OPENAPI["paths"]


async def test_repository_index_allow_and_request_ids(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """/v2/repository/index answers (GET /v2 advertises it); 405s carry Allow (GET on /infer too); the
    request id comes back in `id` and x-request-id and is the prediction log's request_id."""
    settings = node_settings(tmp_path, broker.bootstrap, prediction_log_rate=1.0)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
        async with running_node(settings) as n:
            await eventually(lambda: n.registry.loaded_keys() == ["iris:1"], what="iris:1 loaded")
            meta = (await n.client.get("/v2")).json()
            assert "model_repository_endpoints" in meta["extensions"]
            index = await n.client.post("/v2/repository/index")
            assert index.status_code == 200, index.text
            assert index.json() == [{"name": "iris", "version": "1", "state": "READY", "reason": ""}]
            assert (await n.client.post("/v2/repository/index", json={"ready": True})).json()[0]["name"] == "iris"
            assert (await n.client.post("/v2/repository/index", content=b"[1")).status_code == 400

            get_infer = await n.client.get("/v2/models/iris/infer")
            assert get_infer.status_code == 405 and get_infer.headers["allow"] == "POST"
            post_live = await n.client.post("/v2/health/live")
            assert post_live.status_code == 405 and post_live.headers["allow"] == "GET, HEAD"

            empty = await n.infer("iris", {"inputs": []})
            assert empty.status_code == 400, empty.text

            made = await n.infer("iris")
            assert made.status_code == 200
            made_id = made.json()["id"]
            assert made_id and made.headers["x-request-id"] == made_id
            given = await n.infer("iris", headers={"x-request-id": "caller-7"})
            assert given.json()["id"] == "caller-7" and given.headers["x-request-id"] == "caller-7"
            in_body = await n.infer("iris", infer_body(id="body-9"))
            assert in_body.json()["id"] == "body-9" and in_body.headers["x-request-id"] == "body-9"

            refused = await n.infer("iris", {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP64",
                                                          "data": [1.0, 2.0, 3.0]}]},
                                    headers={"x-request-id": "bad-3"})
            assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-3"

            async def logged() -> bool:
                logs = {e.request_id: e for e, _env, _r in await read_topic(broker.config, "modelcd.predictions")
                        if isinstance(e, PredictionLog)}
                return {made_id, "caller-7", "body-9", "bad-3"} <= set(logs) and logs["bad-3"].status == 400

            await eventually(logged, timeout=30, what="the four requests in the prediction log, the 4xx with its status")


async def test_compressed_request_bodies(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """gzip and deflate bodies (zlib-wrapped or raw) are inflated; a bomb past the limit is a 413, an
    unknown encoding a 415, a corrupt one a 400."""
    settings = node_settings(tmp_path, broker.bootstrap, max_request_bytes=64 * 1024)
    body = json.dumps(infer_body()).encode()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(body) + raw.flush()
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
        async with running_node(settings) as n:
            await eventually(lambda: n.registry.loaded_keys() == ["iris:1"], what="iris:1 loaded")

            async def post(data: bytes, encoding: str) -> int:
                r = await n.client.post("/v2/models/iris/infer", content=data,
                                        headers={"content-encoding": encoding, "content-type": "application/json"})
                return r.status_code

            assert await post(gzip.compress(body), "gzip") == 200
            assert await post(zlib.compress(body), "deflate") == 200
            assert await post(raw_deflate, "deflate") == 200
            bomb = gzip.compress(b" " * (10 * 1024 * 1024))  # 10 MiB of spaces: ~10 KiB compressed
            assert len(bomb) < 64 * 1024
            assert await post(bomb, "gzip") == 413
            assert await post(body, "br") == 415
            assert await post(b"not gzip at all", "gzip") == 400
            assert await post(gzip.compress(body)[:-12], "gzip") == 400
