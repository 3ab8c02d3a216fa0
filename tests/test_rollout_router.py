"""The router under rollout policies: shares by weight, stickiness, and canary steps that only move keys onto it."""

from __future__ import annotations

import random
from collections import Counter

from modelcd.events.schemas import Route, TrafficPolicy
from modelcd.rollout.machine import Rollout, make_plan, policy_for
from modelcd.serving.router import CompiledPolicy, compile_policy

KEYS = [f"user-{i}" for i in range(20_000)]
# 20 000 keys: a share's standard deviation is at most 0.35 percentage points; 1.5 points is > 4 sigma.
TOLERANCE = 1.5


def compiled(*weights: tuple[str, float]) -> CompiledPolicy:
    routes = [Route(model=m.split(":")[0], version=m.split(":")[1], weight=w) for m, w in weights]
    c = compile_policy(TrafficPolicy(endpoint="e", routes=routes))
    assert c is not None
    return c


def ref(route: Route) -> str:
    return f"{route.model}:{route.version}"


def shares(c: CompiledPolicy, keys: list[str]) -> dict[str, float]:
    counts = Counter(ref(c.pick(k, 0.0)) for k in keys)
    return {m: 100.0 * n / len(keys) for m, n in counts.items()}


def test_keyed_shares_follow_the_weights() -> None:
    """Over 20 000 keys, A 80 / B 15 / C 5 receive their share within 1.5 percentage points."""
    got = shares(compiled(("a:1", 80.0), ("b:1", 15.0), ("c:1", 5.0)), KEYS)
    for model, want in {"a:1": 80.0, "b:1": 15.0, "c:1": 5.0}.items():
        assert abs(got[model] - want) < TOLERANCE, (model, got)


def test_unkeyed_requests_split_at_random_by_weight() -> None:
    """Without a key the uniform draw decides: 90 / 10 within 1.5 points over 20 000 draws."""
    c = compiled(("a:1", 90.0), ("b:1", 10.0))
    rng = random.Random(7)
    counts = Counter(ref(c.pick(None, rng.random())) for _ in KEYS)
    assert abs(100.0 * counts["b:1"] / len(KEYS) - 10.0) < TOLERANCE


def test_every_key_is_sticky() -> None:
    """The same key reaches the same model on every request, whatever the random draw."""
    c = compiled(("a:1", 50.0), ("b:1", 30.0), ("c:1", 20.0))
    rng = random.Random(1)
    first = {k: ref(c.pick(k, rng.random())) for k in KEYS[:5000]}
    for _ in range(3):
        assert all(ref(c.pick(k, rng.random())) == m for k, m in first.items())


def test_raising_the_canary_only_moves_keys_onto_it() -> None:
    """Each rollout step (as the controller writes it) moves keys from the baselines to the canary, never back or across."""
    base = TrafficPolicy(endpoint="e", routes=[Route(model="a", version="1", weight=70.0),
                                               Route(model="b", version="1", weight=30.0)])
    r = Rollout(endpoint="e", rollout_id="r", canary="c:2", baseline="a:1", plan=make_plan("standard"),
                baseline_routes=base.routes, started_at=0.0)
    before = {k: "" for k in KEYS}
    for weight in (0.0, 1.0, 10.0, 50.0, 99.0):
        r.weight = weight
        c = compile_policy(policy_for(r, base))
        assert c is not None
        now = {k: ref(c.pick(k, 0.5)) for k in KEYS}
        moved = {k for k in KEYS if before[k] and before[k] != now[k]}
        assert all(now[k] == "c:2" for k in moved), f"a key left for a baseline at {weight}%"
        assert abs(100.0 * sum(m == "c:2" for m in now.values()) / len(KEYS) - weight) < TOLERANCE
        before = now
