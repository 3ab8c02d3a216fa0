"""Placement, pure: weighted rendezvous hashing, groups, a node's plan (load before unload). No broker."""

from __future__ import annotations

import random
from collections import Counter

from modelcd.events.schemas import LoadedModel, ModelState, NodeStatus, Route, ShadowRelation, TrafficPolicy
from modelcd.placement.groups import groups
from modelcd.placement.hashing import Member, owners
from modelcd.placement.membership import Membership
from modelcd.placement.plan import node_plan, place


def _members(n: int, weight: float = 1.0) -> list[Member]:
    return [Member(f"node-{i}", weight) for i in range(n)]


def _state(name: str, version: str = "1", replicas: int = 0, target: str = "serving") -> ModelState:
    return ModelState(name=name, version=version, target=target, sha256=f"{name}{version}", replicas=replicas,
                      at=1.0)  # type: ignore[arg-type]


def test_owners_deterministic_and_capped() -> None:
    """Same inputs, same owners, whatever the order of members; R is capped at the number of members."""
    ms = _members(5)
    assert owners("iris", ms, 2) == owners("iris", list(reversed(ms)), 2)
    assert len(owners("iris", ms, 2)) == 2 and len(set(owners("iris", ms, 2))) == 2
    assert sorted(owners("iris", ms[:1], 2)) == ["node-0"]
    assert sorted(owners("iris", ms, 9)) == sorted(m.node for m in ms)


def test_minimal_movement_property() -> None:
    """Adding a node only moves keys onto it; removing one only moves the keys it owned (many random fleets)."""
    rng = random.Random(7)
    for _ in range(60):
        n = rng.randint(1, 8)
        r = rng.randint(1, 3)
        ms = [Member(f"n{rng.randrange(10**6)}", rng.choice([1.0, 2.0, 4.0])) for _ in range(n)]
        ms = list({m.node: m for m in ms}.values())
        keys = [f"model-{rng.randrange(10**9)}" for _ in range(80)]
        before = {k: set(owners(k, ms, r)) for k in keys}
        new = Member("newcomer", rng.choice([1.0, 2.0]))
        after_add = {k: set(owners(k, [*ms, new], r)) for k in keys}
        for k in keys:
            gained = after_add[k] - before[k]
            assert gained <= {"newcomer"}, (k, before[k], after_add[k])
            assert len(before[k] - after_add[k]) == len(gained) if len(ms) >= r else before[k] <= after_add[k]
        gone = rng.choice(ms)
        rest = [m for m in ms if m != gone]
        after_rm = {k: set(owners(k, rest, r)) for k in keys} if rest else {}
        for k in after_rm:
            if gone.node not in before[k]:
                assert after_rm[k] == before[k], (k, gone, before[k], after_rm[k])
            else:
                assert before[k] - {gone.node} <= after_rm[k]


def test_weights_share_keys_in_proportion() -> None:
    """A node with twice the memory budget owns about twice the keys."""
    ms = [Member("small", 1.0), Member("big", 2.0), Member("mid", 1.0)]
    counts = Counter(owners(f"m{i}", ms, 1)[0] for i in range(6000))
    assert 1.7 < counts["big"] / counts["small"] < 2.3, counts
    assert 0.8 < counts["mid"] / counts["small"] < 1.25, counts


def test_groups_follow_endpoints_and_shadows() -> None:
    """An endpoint's routed and shadow models share one group, keyed by its smallest name; deleted policies don't link."""
    p = TrafficPolicy(endpoint="fraud", routes=[Route(model="xgb", version="1", weight=50),
                                               Route(model="lgbm", version="2", weight=50)],
                      shadows=[ShadowRelation(primary="xgb", shadow="onnxy:3")])
    dead = TrafficPolicy(endpoint="wine", routes=[Route(model="iris", version="1", weight=100)], deleted=True)
    g = groups(["xgb", "lgbm", "onnxy", "iris", "wine"], [p, dead])
    assert g["xgb"] == g["lgbm"] == g["onnxy"] == g["fraud"] == "fraud"
    assert g["iris"] == "iris" and g["wine"] == "wine"


def test_place_groups_versions_and_replicas() -> None:
    """All versions of a name land on the same nodes; a model's own replica count wins; retired states are not placed."""
    ms = _members(6)
    states = [_state("iris", "1"), _state("iris", "2"), _state("big", "1", replicas=4),
              _state("old", "1", target="retired")]
    placed = place(states, [], ms, default_replicas=2)
    assert placed["iris:1"] == placed["iris:2"] and len(placed["iris:1"]) == 2
    assert len(placed["big:1"]) == 4
    assert "old:1" not in placed
    assert place(states, [], [], 2)["iris:1"] == []


def test_node_plan_keeps_until_new_owners_are_ready() -> None:
    """A moved model is kept on its old node until every new owner reports it ready, then released."""
    placement = {"iris:1": ["b", "c"], "wine:1": ["a", "b"]}
    plan = node_plan("a", placement, held=["iris:1", "wine:1"], holders={"iris:1": {"b"}})
    assert plan.load == {"wine:1"} and plan.keep == {"iris:1"}
    plan = node_plan("a", placement, held=["iris:1", "wine:1"], holders={"iris:1": {"b", "c"}})
    assert plan.keep == frozenset() and plan.desired == {"wine:1"}
    # The last node leaving (no members): it keeps what it holds.
    assert node_plan("a", {"iris:1": []}, held=["iris:1"], holders={}).keep == {"iris:1"}


def test_membership_ttl_stopping_and_holders() -> None:
    """Members are alive and not stopping; a silent node leaves after the TTL; holders are ready models only."""
    fleet = Membership(ttl=3.0)
    models = [LoadedModel(name="iris", version="1", sha256="x"),
              LoadedModel(name="wine", version="1", sha256="y", state="loading")]
    fleet.observe(NodeStatus(node="a", ready=True, models=models, memory_budget=100, at=1.0), now=0.0)
    fleet.observe(NodeStatus(node="b", ready=True, memory_budget=200, stopping=True, at=1.0), now=0.0)
    fleet.observe(NodeStatus(node="a", ready=False, at=0.5), now=1.0)  # late, older: ignored
    assert fleet.members(1.0) == [Member("a", 100.0)]
    assert fleet.holders(1.0) == {"iris:1": {"a"}}
    assert fleet.members(5.0) == [] and fleet.holders(5.0) == {}
    assert sorted(fleet.expire(100.0)) == ["a", "b"]
