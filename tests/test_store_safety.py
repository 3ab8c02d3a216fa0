"""The safety check (modelcd.store.safety), pure: what uses a model, and what each action refuses."""

from __future__ import annotations

import pytest

from modelcd.events.schemas import ModelState, RolloutStep, Route, ShadowRelation, TrafficPolicy
from modelcd.retirement import policy as retirement
from modelcd.store.safety import (
    Unsafe,
    World,
    check_endpoint_delete,
    check_retire,
    check_serving,
    fold_traffic,
    uses_of,
    world,
)


def served(*refs: str, retired: tuple[str, ...] = ()) -> list[ModelState]:
    out = [ModelState(name=r.split(":")[0], version=r.split(":")[1], target="serving") for r in refs]
    return out + [ModelState(name=r.split(":")[0], version=r.split(":")[1], target="retired") for r in retired]


def policy(endpoint: str, *routes: tuple[str, float], shadows: tuple[tuple[str, str], ...] = (),
           revision: int = 1) -> TrafficPolicy:
    return TrafficPolicy(endpoint=endpoint, revision=revision,
                         routes=[Route(model=r.split(":")[0], version=r.split(":")[1], weight=w) for r, w in routes],
                         shadows=[ShadowRelation(primary=p, shadow=s) for p, s in shadows])


def start(endpoint: str, rid: str, canary: str, baseline: str) -> RolloutStep:
    name, version = baseline.split(":")
    return RolloutStep(endpoint=endpoint, rollout_id=rid, action="start", canary=canary, baseline=baseline,
                       baseline_routes=[Route(model=name, version=version, weight=100.0)])


def test_retire_refused_while_an_endpoint_routes_to_it() -> None:
    """`traffic set winep wine:1=100 && retire wine 1`: refused, naming the endpoint and the command that frees it."""
    w = world(served("wine:1", "wine:2"), {"winep": policy("winep", ("wine:1", 100.0))})
    with pytest.raises(Unsafe) as err:
        check_retire("wine:1", w)
    msg = str(err.value)
    assert "serves 100% of endpoint winep" in msg and "modelcd traffic set winep" in msg
    assert "--force" in msg and "503" in msg
    assert check_retire("wine:2", w) == []  # not routed: free to retire


def test_retire_refused_for_a_rollout_arm_and_a_shadow() -> None:
    """A rollout's canary and a shadow are in use too: the reasons name the rollout and the relation."""
    events = [policy("iris", ("iris:1", 100.0), shadows=(("iris", "iris:3"),)), start("iris", "r1", "iris:2", "iris:1")]
    w = world(served("iris:1", "iris:2", "iris:3"), {}, events)
    with pytest.raises(Unsafe) as canary:
        check_retire("iris:2", w)
    assert "rollout r1 in progress on endpoint iris" in str(canary.value)
    assert "modelcd rollout abort iris" in str(canary.value)
    with pytest.raises(Unsafe) as shadow:
        check_retire("iris:3", w)
    assert "shadows iris on endpoint iris" in str(shadow.value)
    assert "modelcd shadow remove iris iris:3 --endpoint iris" in str(shadow.value)
    # Forced: allowed, and the caller learns what it breaks.
    assert [u.kind for u in check_retire("iris:3", w, force=True)] == ["shadow"]
    # The rollout ends: the canary is free again.
    ended = RolloutStep(endpoint="iris", rollout_id="r1", action="rollback", canary="iris:2", baseline="iris:1")
    assert uses_of("iris:2", world(served("iris:2"), {}, [*events, ended])) == []


def test_retiring_a_rollout_baseline_says_to_end_the_rollout_first() -> None:
    """The baseline of a rollout: the reason reads as a sentence and the route's fix starts with the abort."""
    events = [policy("iris", ("iris:1", 90.0), ("iris:2", 10.0)), start("iris", "r1", "iris:2", "iris:1")]
    with pytest.raises(Unsafe) as err:
        check_retire("iris:1", world(served("iris:1", "iris:2"), {}, events))
    msg = str(err.value)
    assert "it is moved by rollout r1 in progress on endpoint iris" in msg
    # `traffic set` alone is refused while the rollout drives the endpoint: the fix says to abort first.
    assert "(resolve: modelcd rollout abort iris, then modelcd traffic set iris" in msg


def test_weight_zero_and_deleted_policies_protect_nothing() -> None:
    """A route at 0 % and a deleted endpoint do not keep a model."""
    w = World(policies={"a": policy("a", ("m:1", 100.0), ("m:2", 0.0)),
                        "b": TrafficPolicy(endpoint="b", deleted=True, routes=[Route(model="m", version="3",
                                                                                     weight=100.0)])})
    assert uses_of("m:2", w) == [] and uses_of("m:3", w) == [] and len(uses_of("m:1", w)) == 1


def test_the_newest_policy_wins_between_store_and_topic() -> None:
    """The store is the source of truth; a newer revision on the topic (not yet in the store) counts."""
    w = world([], {"e": policy("e", ("m:1", 100.0), revision=3)}, [policy("e", ("m:2", 100.0), revision=4)])
    assert uses_of("m:1", w) == [] and uses_of("m:2", w)[0].endpoint == "e"
    w = world([], {"e": policy("e", ("m:1", 100.0), revision=5)}, [policy("e", ("m:2", 100.0), revision=4)])
    assert uses_of("m:2", w) == [] and uses_of("m:1", w)[0].endpoint == "e"


def test_versions_named_must_be_serving() -> None:
    """iris:9 (never deployed) and iris:0 (retired) are refused, naming what serves."""
    w = world(served("iris:1", "iris:2", retired=("iris:0",)), {})
    check_serving(["iris:1", "iris:2", "iris"], w, role="route")
    with pytest.raises(Unsafe) as missing:
        check_serving(["iris:9"], w, role="canary")
    assert "canary iris:9 is not deployed (serving versions of iris: 1, 2)" in str(missing.value)
    with pytest.raises(Unsafe) as retired:
        check_serving(["iris:0"], w, role="route")
    assert "iris:0 was retired" in str(retired.value)
    with pytest.raises(Unsafe) as unknown:
        check_serving(["wine"], w, role="primary")
    assert "no version of wine serves" in str(unknown.value) and "modelcd deploy" in str(unknown.value)


def test_endpoint_delete_refused_while_a_rollout_drives_it() -> None:
    """Deleting an endpoint in a rollout is refused, naming the rollout and `rollout abort`; unknown is not_found."""
    events = [policy("iris", ("iris:1", 100.0)), start("iris", "r7", "iris:2", "iris:1")]
    policies, rollouts = fold_traffic(events)
    with pytest.raises(Unsafe) as busy:
        check_endpoint_delete("iris", World(policies=policies, rollouts=rollouts))
    assert busy.value.kind == "conflict" and "rollout r7" in str(busy.value) and "rollout abort iris" in str(busy.value)
    assert check_endpoint_delete("iris", World(policies=policies)).endpoint == "iris"
    with pytest.raises(Unsafe) as none:
        check_endpoint_delete("nope", World(policies=policies))
    assert none.value.kind == "not_found"


def test_auto_retirement_and_manual_retire_share_the_check() -> None:
    """The retirement processor's protections are the uses the manual retire refuses on, in the same words."""
    events = [policy("iris", ("iris:1", 100.0), shadows=(("iris:1", "iris:3"),)), start("iris", "r1", "iris:2", "iris:1")]
    view = None
    for ev in events:
        view = retirement.on_traffic(view, ev)
    protections = retirement.endpoint_protections(view)
    w = world(served("iris:1", "iris:2", "iris:3"), {}, events)
    for ref in ("iris:1", "iris:2", "iris:3"):
        assert protections[ref] == sorted({u.what for u in uses_of(ref, w)}), ref
