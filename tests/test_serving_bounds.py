"""Bad or oversized requests stay 4xx (or a 503 with Retry-After) on a real node; nothing becomes a 500.

Findings covered: JSON nested 100,000 deep got a 500 (RecursionError); non-finite model outputs
were served as `null` in an FP64 tensor (also overflow inputs to a float32 model); right after a
start the node answered 404 "no version on this node" for deployed models; there was no bound on
in-flight request bytes or on response size (four 24 MB requests took RSS to 2.2 GB with 94 MB
responses).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher
from modelcd.runtimes.build import build_package
from modelcd.serving.errors import InvalidRequest, ResponseTooLarge
from modelcd.serving.node import ServingNode
from modelcd.serving.protocol import InferenceRequest, TensorCodec, TensorSpec, decode_request, encode_response
from modelcd.serving.registry import default_loader
from modelcd.store.blobs import open_store

from ._serving import MB, deploy, infer_body, iris_package, iris_rows, node_settings, running_node

DEEP = 100_000


def _deep(n: int) -> bytes:
    return b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP64","data":' + b"[" * n + b"]" * n + b"}]}"


# --- the protocol, without a node ---------------------------------------------------------------------


def test_deep_json_is_an_invalid_request_not_a_recursion_error() -> None:
    """A body nested 100,000 (or 5,000) deep, in `data` or in `parameters`, is an InvalidRequest."""
    for body in (_deep(DEEP), _deep(5_000),
                 b'{"parameters":{"a":' + b"[" * DEEP + b"]" * DEEP + b'},"inputs":[]}'):
        with pytest.raises(InvalidRequest, match="nested too deeply"):
            decode_request(body)


def test_non_finite_outputs_are_strings_never_null() -> None:
    """NaN/inf in an FP output are "NaN"/"Infinity"/"-Infinity" in JSON; binary outputs keep the IEEE values."""
    req = InferenceRequest(inputs=[])
    out = {"y": np.array([1.5, np.nan, np.inf, -np.inf]), "z": np.array([1.0], dtype=np.float32)}
    body, hlen = encode_response(out, req, "m", "1")
    assert hlen is None and b"null" not in body
    doc = json.loads(body)
    assert doc["outputs"][0]["data"] == [1.5, "NaN", "Infinity", "-Infinity"]
    assert doc["outputs"][0]["datatype"] == "FP64"
    assert [float(x) for x in doc["outputs"][0]["data"]][1:] != [None] * 3
    assert np.isnan(np.asarray(doc["outputs"][0]["data"], dtype=np.float64)[1])  # numpy reads them back
    binary = msgspec.json.decode(b'{"inputs":[],"parameters":{"binary_data_output":true}}', type=InferenceRequest)
    body, hlen = encode_response(out, binary, "m", "1")
    assert hlen is not None
    y = np.frombuffer(body[hlen:hlen + 32], dtype="<f8")
    assert np.isnan(y[1]) and y[2] == np.inf and y[3] == -np.inf


def test_finite_inputs_overflowing_a_float32_are_refused_and_spelled_non_finite_ones_accepted() -> None:
    """1e300 for an FP32 input is a 400 naming the range; "NaN"/"Infinity" strings are accepted as such."""
    codec = TensorCodec([TensorSpec("x", "FP32", (-1, 2))], [TensorSpec("y", "FP32", (-1,))])
    over = msgspec.json.decode(b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1e300,1]}]}',
                               type=InferenceRequest)
    with pytest.raises(InvalidRequest, match="out of range for FP32"):
        codec.decode_inputs(over)
    spelled = msgspec.json.decode(
        b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":["NaN","-Infinity"]}]}', type=InferenceRequest)
    x = codec.decode_inputs(spelled)["x"]
    assert np.isnan(x[0, 0]) and x[0, 1] == -np.inf


def test_a_response_over_the_bound_is_refused_before_it_is_built() -> None:
    """A response whose smallest JSON form is over the bound raises ResponseTooLarge without building it."""
    req = InferenceRequest(inputs=[])
    big = {"y": np.zeros(1_000_000)}
    with pytest.raises(ResponseTooLarge, match="at least 2000000 bytes.*MODELCD_MAX_RESPONSE_BYTES"):
        encode_response(big, req, "m", "1", max_bytes=1 * MB)
    small = {"y": np.zeros(10)}
    assert encode_response(small, req, "m", "1", max_bytes=1 * MB)[0]


# --- a real node --------------------------------------------------------------------------------------


@pytest.fixture
async def iris_node(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Any]:
    settings = node_settings(tmp_path, broker.bootstrap, max_request_bytes=1 * MB, max_inflight_bytes=1 * MB,
                             max_response_bytes=64 * 1024)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
        async with running_node(settings) as n:
            yield n


async def test_deep_json_is_a_400_on_the_node(iris_node: Any) -> None:
    """JSON nested 100,000 deep gets a 400 with a reason; the node keeps answering."""
    r = await iris_node.client.post("/v2/models/iris/infer", content=_deep(DEEP),
                                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    assert (await iris_node.infer("iris")).status_code == 200


async def test_a_body_over_the_limit_is_413_declared_or_streamed(iris_node: Any) -> None:
    """A body over MODELCD_MAX_REQUEST_BYTES is a 413, by Content-Length or chunked."""
    r = await iris_node.client.post("/v2/models/iris/infer", content=b"x" * (2 * MB))
    assert r.status_code == 413 and "MODELCD_MAX_REQUEST_BYTES" in r.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * (MB // 2)

    r = await iris_node.client.post("/v2/models/iris/infer", content=chunks())
    assert r.status_code == 413


async def test_in_flight_bytes_are_bounded_with_a_503_and_retry_after(iris_node: Any) -> None:
    """While one request holds most of MODELCD_MAX_INFLIGHT_BYTES, another gets 503 + Retry-After; then both pass."""
    body = json.dumps(infer_body(iris_rows(2))).encode()
    first_half = body[:-1] + b" " * (700 * 1024)  # valid JSON once the closing brace follows
    release = asyncio.Event()
    sent = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield first_half
        sent.set()
        await release.wait()
        yield body[-1:]

    holder = asyncio.create_task(iris_node.client.post("/v2/models/iris/infer", content=slow()))
    await asyncio.wait_for(sent.wait(), 10)
    other = json.dumps(infer_body(iris_rows(2))).encode() + b" " * (500 * 1024)
    deadline = time.monotonic() + 10
    while True:  # the first chunk may still be on its way to the node
        r = await iris_node.client.post("/v2/models/iris/infer", content=other)
        if r.status_code != 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert r.status_code == 503, r.text
    assert "MODELCD_MAX_INFLIGHT_BYTES" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
    release.set()
    assert (await asyncio.wait_for(holder, 30)).status_code == 200
    assert (await iris_node.client.post("/v2/models/iris/infer", content=other)).status_code == 200


async def test_a_response_over_the_bound_is_a_400_saying_what_to_do(iris_node: Any) -> None:
    """Many rows whose answer is over MODELCD_MAX_RESPONSE_BYTES get a 400 naming the limit; fewer rows pass."""
    rows = (iris_rows(150) * 20)[:3000]
    r = await iris_node.infer("iris", infer_body(rows))
    assert r.status_code == 400 and "MODELCD_MAX_RESPONSE_BYTES" in r.json()["error"]
    assert len(r.content) < 1024
    assert (await iris_node.infer("iris", infer_body(rows[:10]))).status_code == 200


async def test_non_finite_model_outputs_are_never_null(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A regression whose output overflows answers "Infinity"/"NaN" strings in its FP64 tensor, never null."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LinearRegression

    x, y = load_iris(return_X_y=True)
    model = LinearRegression().fit(x, y.astype(np.float64) * 1e6)  # coefficients far above 1: 1e308 overflows
    assert model.coef_.max() > 10 and model.coef_.min() < -10
    built = build_package(model, name="lin", version="1", owner="tests", expiry="30d", sample_inputs={"input": x[:5]})
    settings = node_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, built)
        async with running_node(settings) as n:
            pos, neg = int(np.argmax(model.coef_)), int(np.argmin(model.coef_))
            row_inf, row_nan = [0.0] * 4, [0.0] * 4
            row_inf[pos] = row_nan[pos] = row_nan[neg] = 1e308  # inf, and inf + -inf = NaN
            rows = [row_inf, row_nan, x[0].tolist()]
            r = await n.infer("lin", {"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP64",
                                                  "data": rows}]})
            assert r.status_code == 200, r.text
            assert b"null" not in r.content
            out = r.json()["outputs"][0]
            assert out["datatype"] == "FP64"
            values = [float(v) for v in out["data"]]
            assert out["data"][:2] == ["Infinity", "NaN"]
            assert values[0] == math.inf and math.isnan(values[1]) and math.isfinite(values[2])


async def _statuses_until_ready(node: ServingNode, url: str, ready: asyncio.Event,
                                stop: asyncio.Event) -> list[tuple[int, str, str | None]]:
    seen: list[tuple[int, str, str | None]] = []
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + 120
        while not ready.is_set() and time.monotonic() < deadline:
            try:
                r = await client.post(url, json=infer_body())
            except httpx.TransportError:  # not bound yet
                await asyncio.sleep(0.01)
                continue
            seen.append((r.status_code, r.text[:200], r.headers.get("retry-after")))
            await asyncio.sleep(0.01)
    return seen


def slow_loader(pkg: Any) -> Any:
    """A model that takes a while to load (module-level: model workers import their loader by name)."""
    time.sleep(2.0)  # the window the finding saw, made wide
    return default_loader(pkg)


@pytest.mark.faults
async def test_a_deployed_model_is_503_with_retry_after_until_loaded_never_404(broker: EmbeddedBroker,
                                                                               tmp_path: Path) -> None:
    """From the node's first byte to its readiness, a deployed model answers 503 + Retry-After or 200, never 404."""
    port = free_port()
    settings = node_settings(tmp_path, broker.bootstrap, load_wait=0.2)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        await deploy(store, pub, iris_package("iris", "1"))
    node = ServingNode(settings, port=port, node_id="starting-node", loader=slow_loader)
    stop, ready = asyncio.Event(), asyncio.Event()
    url = f"http://127.0.0.1:{port}/v2/models/iris/versions/1/infer"
    poller = asyncio.create_task(_statuses_until_ready(node, url, ready, stop))
    task = asyncio.create_task(node.run(stop=stop, ready=ready))
    try:
        seen = await asyncio.wait_for(poller, 150)
        assert ready.is_set(), "the node did not become ready"
        assert seen, "no request reached the node before it was ready"
        assert all(code in (200, 503) for code, _, _ in seen), seen
        unavailable = [(text, ra) for code, text, ra in seen if code == 503]
        assert unavailable, seen
        assert all(ra is not None and int(ra) >= 1 for _, ra in unavailable)
        assert any("loading" in text for text, _ in unavailable)
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.post(url, json=infer_body())).status_code == 200
            r = await client.post(f"http://127.0.0.1:{port}/v2/models/nope/infer", json=infer_body())
            assert r.status_code == 404  # ready: unknown is unknown
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def test_binary_bytes_elements_that_claim_more_than_they_hold_are_refused() -> None:
    """A BYTES element whose 4-byte length runs past its tensor's binary_data_size is a 400, not a cut-short string."""
    codec = TensorCodec([TensorSpec("s", "BYTES", (-1,))], [TensorSpec("y", "INT64", (-1,))])
    good = (3).to_bytes(4, "little") + b"abc"
    lying = (1_000_000).to_bytes(4, "little") + b"abc"
    for payload, ok in ((good, True), (lying, False)):
        header = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(payload)}}]}).encode()
        req, binary = decode_request(header + payload, len(header))
        if ok:
            assert codec.decode_inputs(req, binary)["s"].tolist() == [b"abc"]
        else:
            with pytest.raises(InvalidRequest, match="declares 1000000 bytes"):
                codec.decode_inputs(req, binary)


async def test_an_empty_batch_is_a_400_not_a_model_failure(iris_node: Any) -> None:
    """Shape [0, 4] (no rows): a 400 saying so; before, the model library raised and the node answered 500."""
    r = await iris_node.client.post("/v2/models/iris/infer", json={
        "inputs": [{"name": "input", "shape": [0, 4], "datatype": "FP64", "data": []}]})
    assert r.status_code == 400 and "no elements" in r.json()["error"], r.text
    assert (await iris_node.infer("iris")).status_code == 200


def test_binary_data_size_must_be_a_byte_count() -> None:
    """`binary_data_size: true` (a JSON boolean, an int to Python) is a 400, not a one-byte tensor."""
    codec = TensorCodec([TensorSpec("s", "BYTES", (-1,))], [TensorSpec("y", "INT64", (-1,))])
    payload = (0).to_bytes(4, "little")
    for size, ok in ((4, True), (True, False)):
        header = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": size}}]}).encode()
        req, binary = decode_request(header + payload, len(header))
        if ok:
            assert codec.decode_inputs(req, binary)["s"].tolist() == [b""]
        else:
            with pytest.raises(InvalidRequest, match="binary_data_size True"):
                codec.decode_inputs(req, binary)
