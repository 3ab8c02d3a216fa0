"""The serving node's pure parts: router, budget, desired-state merge, tensor codec, telemetry buffer."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelcd.events.schemas import Event, ModelState, Route, TrafficPolicy
from modelcd.serving.budget import Candidate, Resident, estimate_size, hot_set, plan_eviction
from modelcd.serving.desired import Known, plan_reconcile
from modelcd.serving.errors import InvalidRequest
from modelcd.serving.protocol import TensorCodec, TensorSpec, decode_request, encode_response
from modelcd.serving.router import compile_policy
from modelcd.serving.telemetry import Telemetry


def _policy(*routes: tuple[str, float]) -> Any:
    p = compile_policy(TrafficPolicy(endpoint="ep", routes=[Route(model="m", version=v, weight=w)
                                                            for v, w in routes]))
    assert p is not None
    return p


def test_router_weights_split_random_traffic() -> None:
    """Without a key, routes answer in proportion to their weights."""
    p = _policy(("1", 90), ("2", 10))
    rng = random.Random(1)
    picks = [p.pick(None, rng.random()).version for _ in range(20_000)]
    assert 0.08 < picks.count("2") / len(picks) < 0.12


def test_router_raising_canary_weight_only_moves_keys_onto_it() -> None:
    """Sticky keys keep their route, and a canary step from 10 % to 50 % moves keys only onto the canary."""
    keys = [f"user-{i}" for i in range(5000)]
    before = {k: _policy(("1", 90), ("2", 10)).pick(k, 0.0).version for k in keys}
    after = {k: _policy(("2", 50), ("1", 50)).pick(k, 0.0).version for k in keys}  # order does not matter
    assert all(after[k] == "2" for k in keys if before[k] == "2")
    assert 0.45 < sum(v == "2" for v in after.values()) / len(keys) < 0.55
    assert 0.08 < sum(v == "2" for v in before.values()) / len(keys) < 0.12


def test_router_ignores_zero_weights_and_deleted_policies() -> None:
    """Routes of weight 0 never answer; a deleted or empty policy compiles to nothing."""
    p = _policy(("1", 100), ("2", 0))
    assert {p.pick(f"k{i}", i / 100).version for i in range(100)} == {"1"}
    assert compile_policy(TrafficPolicy(endpoint="ep", routes=[], deleted=False)) is None
    assert compile_policy(TrafficPolicy(endpoint="ep", routes=[Route(model="m", version="1", weight=100)],
                                        deleted=True)) is None


def test_eviction_is_lru_and_never_evicts_loads_in_progress() -> None:
    """The least recently used ready models go first; loads in progress are never evicted."""
    res = [Resident("a", 10, 3.0), Resident("b", 10, 1.0), Resident("c", 10, 2.0), Resident("d", 10, 0.0, False)]
    assert plan_eviction(res, 10, 50) == []
    assert plan_eviction(res, 10, 40) == ["b"]
    assert plan_eviction(res, 20, 40) == ["b", "c"]
    assert plan_eviction(res, 35, 40) is None  # d's reservation leaves too little: wait
    assert plan_eviction([], 41, 40) is None  # larger than the whole budget


def test_hot_set_prefers_pinned_then_newest_within_budget() -> None:
    """At start-up the node loads pinned models first, then the newest deployments, while they fit."""
    cands = [Candidate("old", 10, deployed_at=1), Candidate("new", 10, deployed_at=3),
             Candidate("pin", 10, pinned=True, deployed_at=0), Candidate("big", 25, deployed_at=2)]
    assert hot_set(cands, 30) == ["pin", "new", "old"]
    assert estimate_size(0, 10) == 1 << 20 and estimate_size(0, 1 << 20) == 4 << 20 and estimate_size(5, 99) == 5


def _ms(version: str, at: float, target: str = "serving") -> ModelState:
    return ModelState(name="m", version=version, target=target, at=at)  # type: ignore[arg-type]


def test_reconcile_keeps_newer_events_and_young_keys() -> None:
    """A snapshot repairs missed events but neither undoes a newer event nor drops one younger than the read."""
    known = {"m:1": Known(_ms("1", at=5), received=1.0), "m:2": Known(_ms("2", at=9), received=1.0),
             "m:3": Known(_ms("3", at=1), received=10.0)}
    snapshot = [_ms("1", at=6, target="retired"), _ms("4", at=2)]
    plan = plan_reconcile(known, snapshot, started=5.0)
    assert [s.key() for s in plan.apply] == ["m:1", "m:4"]
    assert plan.drop == ["m:2"]  # m:3 arrived after the snapshot started: the next one decides
    assert plan_reconcile(known, [_ms("2", at=8)], 0.0).apply == []  # the event is newer than the store


CODEC = TensorCodec([TensorSpec("x", "FP32", (-1, 2)), TensorSpec("s", "BYTES", (-1,))],
                    [TensorSpec("y", "INT64", (-1,))])


def test_codec_decodes_nested_and_binary_tensors() -> None:
    """JSON (flat or nested) and Triton binary tensors decode to the same arrays."""
    flat, _ = decode_request(b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]},'
                             b'{"name":"s","shape":[2],"datatype":"BYTES","data":["a","b"]}]}')
    nested, _ = decode_request(b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]},'
                               b'{"name":"s","shape":[2],"datatype":"BYTES","data":["a","b"]}]}')
    x = np.array([[1, 2], [3, 4]], dtype=np.float32)
    blob = x.tobytes() + b"".join(len(v).to_bytes(4, "little") + v for v in (b"a", b"b"))
    head = (b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","parameters":{"binary_data_size":16}},'
            b'{"name":"s","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":10}}]}')
    binary, rest = decode_request(head + blob, len(head))
    for req, extra in ((flat, None), (nested, None), (binary, rest)):
        arrays = CODEC.decode_inputs(req, extra)
        assert arrays["x"].dtype == np.float32 and arrays["x"].tolist() == x.tolist()
        assert [v if isinstance(v, str) else v.decode() for v in arrays["s"].tolist()] == ["a", "b"]


def test_codec_rejects_with_reasons() -> None:
    """Misfits raise InvalidRequest naming the input and what the model takes."""
    req, _ = decode_request(b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}')
    with pytest.raises(InvalidRequest, match=r"input 'x' has shape \[1, 3\]; the model takes x FP32 \[-1, 2\]"):
        CODEC.decode_inputs(req)
    req, _ = decode_request(b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}')
    with pytest.raises(InvalidRequest, match="missing input 's'"):
        CODEC.decode_inputs(req)


def test_response_json_and_binary_outputs() -> None:
    """Responses carry the answering model and version, JSON tensors, or binary ones when asked."""
    req, _ = decode_request(b'{"id":"7","inputs":[]}')
    body, hlen = encode_response({"y": np.array([1, 2])}, req, "m", "3")
    assert hlen is None and body == (b'{"model_name":"m","model_version":"3","id":"7","outputs":'
                                     b'[{"name":"y","shape":[2],"datatype":"INT64","data":[1,2]}]}')
    req, _ = decode_request(b'{"inputs":[],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}')
    body, hlen = encode_response({"y": np.array([1, 2]), "z": np.array([0.5])}, req, "m", "3")
    assert hlen is not None and b'"binary_data_size":16' in body[:hlen] and b'"z"' not in body
    assert np.frombuffer(body[hlen:], dtype="<i8").tolist() == [1, 2]


class _Sink:
    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def publish_nowait(self, event: Event) -> asyncio.Future[Any]:
        self.sent.append(event)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def stop(self) -> None:
        pass


async def test_telemetry_buffer_is_bounded_and_usage_aggregates() -> None:
    """A full buffer drops (and counts) new events; usage becomes one report per model version per interval."""
    sink = _Sink()
    t = Telemetry("n", sink, buffer=3)
    for i in range(5):
        t.offer(_ms(str(i), at=i))
    assert t.buffered == 3 and t.stats.dropped == 2
    c = t.usage("m", "1")
    c.count += 7
    c.last_used = 42.0
    t.usage("m", "2")  # unused: no report
    reports = t.take_usage(100.0)
    assert [(r.model, r.version, r.count, r.last_used) for r in reports] == [("m", "1", 7, 42.0)]
    assert t.take_usage(200.0) == []
    await t.drain(5.0)
    await asyncio.sleep(0)  # acknowledgements arrive as callbacks
    assert len(sink.sent) == 3 and t.stats.published == 3


async def test_accepted_connections_have_nodelay(tmp_path: Path) -> None:
    """Keep-alive responses must not wait on Nagle + delayed ACK (~40 ms each) on the plain asyncio loop."""
    import socket

    from modelcd.serving.node import ServingNode
    from tests._serving import node_settings

    node = ServingNode(node_settings(tmp_path, "127.0.0.1:1"), port=0, node_id="n")
    sock = node._bind()
    accepted: list[int] = []  # TCP_NODELAY of each connection the server accepted

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", node.port)
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert accepted and accepted[0] != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_request_ids_the_node_makes_are_unique_and_uuid_shaped() -> None:
    """Ids made for requests without one never repeat on a node and keep uuid4().hex's shape (32 hex digits)."""
    from modelcd.serving.api import new_request_id

    ids = [new_request_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids[:10] + ids[-10:])
    assert int(ids[-1], 16) > int(ids[0], 16)
