"""What a service publishes again on start (pure): only what the topic lacks or holds older, so a restore after
Kafka retention dropped some events, or a restore repeated, changes nothing that is already right."""

from __future__ import annotations

from modelcd.events.schemas import ModelState, RolloutPlan, RolloutStep, Route, TrafficPolicy
from modelcd.store.restore import missing_policies, missing_rollouts, missing_states, restore_id


def _state(name: str, at: float, target: str = "serving") -> ModelState:
    return ModelState(name=name, version="1", target=target, at=at)  # type: ignore[arg-type]


def test_missing_states_are_the_lost_and_the_older() -> None:
    """A target the topic lost, or holds an older state of (a retirement it missed), is republished; one the topic
    holds as stored, or newer, is not."""
    stored = [_state("lost", 1.0), _state("same", 2.0), _state("retired", 5.0, "retired"), _state("behind", 3.0)]
    on_topic = {"same:1": _state("same", 2.0), "retired:1": _state("retired", 4.0), "behind:1": _state("behind", 9.0)}
    assert [s.name for s in missing_states(stored, on_topic)] == ["lost", "retired"]


def test_missing_policies_keep_the_revision_going() -> None:
    """A policy is republished when the topic has none or a lower revision, never over a higher one."""
    p = [TrafficPolicy(endpoint=e, routes=[Route(model="m", version="1", weight=100.0)], revision=r)
         for e, r in (("a", 15), ("b", 3), ("c", 2))]
    on_topic = {"b": p[1], "c": TrafficPolicy(endpoint="c", revision=7)}
    assert [x.endpoint for x in missing_policies(p, on_topic)] == ["a"]


def test_missing_rollouts_and_stable_ids() -> None:
    """A rollout the topic holds none of is restored; one whose facts (even some) are there is not; republished
    events get the same id whoever republishes them."""
    plan = RolloutPlan(name="fast", steps=[10.0, 100.0], interval_s=60.0)
    facts = [RolloutStep(endpoint="e", rollout_id="r1", action="start", plan=plan, at=1.0),
             RolloutStep(endpoint="e", rollout_id="r1", action="hold", at=2.0)]
    other = [RolloutStep(endpoint="f", rollout_id="r2", action="start", plan=plan, at=1.0)]
    assert missing_rollouts({"e": facts, "f": other}, [facts[-1]]) == {"f": other}
    assert restore_id("traffic", "a", 15) == restore_id("traffic", "a", 15) != restore_id("traffic", "a", 16)
