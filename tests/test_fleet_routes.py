"""The front door's routing table and DNS answers, pure: which nodes answer each name, the wire format."""

from __future__ import annotations

import struct

from modelcd.events.schemas import LoadedModel, ModelState, NodeStatus
from modelcd.fleet.dns import A, SRV, Srv, build_response, encode_name, parse_query
from modelcd.fleet.routes import DEFAULT, MODELS, NODES, answer, node_label, route_table


def _node(name: str, port: int, held: list[str], *, ready: bool = True, stopping: bool = False) -> NodeStatus:
    models = [LoadedModel(name=k.split(":")[0], version=k.split(":")[1], sha256="x") for k in held]
    return NodeStatus(node=name, url=f"http://127.0.0.1:{port}", ready=ready, stopping=stopping, models=models)


def _state(name: str, version: str = "1") -> ModelState:
    return ModelState(name=name, version=version, target="serving", sha256="x")


def test_routes_prefer_owners_that_hold_then_holders_then_owners() -> None:
    """A model goes to owners holding it; during a move to its old holders; while loading to its owners."""
    alive = [_node("a", 1, ["iris:1", "wine:1"]), _node("b", 2, ["iris:1"]), _node("c", 3, [])]
    states = [_state("iris"), _state("wine"), _state("new")]
    placement = {"iris:1": ["b", "c"], "wine:1": ["b", "c"], "new:1": ["a", "c"]}
    table = route_table(alive, states, placement, {"iris": "iris", "wine": "wine", "new": "new"})
    assert table.upstreams_of("iris") == ("127.0.0.1:2",)  # b holds and owns; a is handing it off
    assert table.upstreams_of("wine") == ("127.0.0.1:1",)  # only a holds it yet
    assert table.upstreams_of("new") == ("127.0.0.1:1", "127.0.0.1:3")  # nobody holds it: its owners
    assert table.upstreams_of("unknown") == table.default == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")


def test_routes_skip_unhealthy_and_stopping_nodes() -> None:
    """A node failing its health check is left out; a stopping node leaves the default route."""
    alive = [_node("a", 1, ["iris:1"]), _node("b", 2, ["iris:1"], stopping=True)]
    table = route_table(alive, [_state("iris")], {"iris:1": ["a", "b"]}, {"iris": "iris"}, healthy={"b"})
    assert table.upstreams_of("iris") == ("127.0.0.1:2",)
    table = route_table(alive, [_state("iris")], {"iris:1": ["a"]}, {"iris": "iris"})
    assert table.default == ("127.0.0.1:1",)


def test_dns_answers_srv_and_a_from_the_table() -> None:
    """SRV for a model name lists its nodes' ports and labels; A for a label gives the node's address."""
    alive = [_node("a", 8082, ["iris:1"]), _node("b", 8083, [])]
    table = route_table(alive, [_state("iris")], {"iris:1": ["a"]}, {"iris": "iris"})
    srv = answer(table, {}, f"_oip._tcp.iris.{MODELS}", SRV)
    assert srv == [Srv(f"{node_label('127.0.0.1:8082')}.{NODES}", 8082)]
    assert len(answer(table, {}, f"_oip._tcp.{DEFAULT}", SRV) or []) == 2
    assert answer(table, {}, f"{node_label('127.0.0.1:8083')}.{NODES}", A) == ["127.0.0.1"]
    assert answer(table, {}, "example.com", A) is None


def test_dns_wire_format_round_trip() -> None:
    """A query parses to its name and type; the response echoes it and carries the SRV record."""
    question = encode_name("_oip._tcp.Iris.models.modelcd") + struct.pack("!HH", SRV, 1)
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + question
    qid, flags, name, qtype, q = parse_query(query)
    assert (qid, name, qtype, q) == (0x1234, "_oip._tcp.iris.models.modelcd", SRV, question)
    reply = build_response(qid, flags, q, qtype, [Srv("n1.nodes.modelcd", 8082)])
    rid, rflags, qd, an = struct.unpack("!HHHH", reply[:8])
    assert (rid, rflags & 0x8000, rflags & 0xF, qd, an) == (0x1234, 0x8000, 0, 1, 1)
    assert reply.endswith(struct.pack("!HHH", 0, 10, 8082) + encode_name("n1.nodes.modelcd"))
    assert build_response(qid, flags, q, qtype, None)[3] & 0xF == 3  # NXDOMAIN


def test_roll_error_rate_rule_and_metrics_parsing() -> None:
    """The new node fails the roll only with enough requests and an error rate clearly above the old nodes'."""
    from modelcd.fleet.roll import counters, error_rate_regressed

    text = ('# HELP x\nmodelcd_requests_total{model="iris",version="1"} 90.0\n'
            'modelcd_requests_total{model="wine",version="1"} 10.0\n'
            'modelcd_request_errors_total{kind="timeout",model="iris"} 3.0\nmodelcd_requests_created 1.7e9\n')
    assert counters(text) == (100.0, 3.0)
    assert error_rate_regressed((10, 10), (100, 0)) is None  # too few requests to judge
    assert error_rate_regressed((100, 1), (100, 0)) is None  # within the slack
    assert error_rate_regressed((100, 3), (100, 2)) is None  # not twice the old rate
    assert "error rate 10.0%" in (error_rate_regressed((100, 10), (100, 1)) or "")
