"""Putting back on the topics what the broker lost, from the store (the durable home of every view).

The embedded broker keeps topics in memory, and Apache Kafka's retention or compaction may drop old
events: on start, each service that owns a piece of state publishes again what the store holds and
the topic lacks, so every reader of the topic (serving nodes, the retirement processor, the CLI) sees
the same state as the store:

- `ModelState` per `name:version` whose last event on `modelcd.model-state` is missing or older (`at`)
  than the store's target (ingest does this);
- `TrafficPolicy` per endpoint whose last policy on `modelcd.traffic` is missing or has a lower
  revision than the store's, so revisions carry on where they were (ingest does this);
- the facts of an endpoint's latest rollout when the traffic topic holds none of them (the rollout
  controller does this).

Invariants: nothing is published that the topic already has (or has newer), and an event is
republished with the same content and a deterministic event id (derived from its key and revision
or time), so two services restoring at once, or a restore repeated, are deduplicated by consumers
that are idempotent per event id, and last-write-wins readers see one state either way. Deciding
what is missing (`missing_*`) is pure; `restore_targets` is the I/O shell.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from modelcd.events.bus import KafkaConfig, read_topic
from modelcd.events.schemas import Event, ModelState, RolloutStep, TrafficPolicy
from modelcd.events.topics import MODEL_STATE, TRAFFIC
from modelcd.logs import get_logger

from .targets import TargetState

log = get_logger("modelcd.store.restore")

_NAMESPACE = uuid.UUID("0c6b8f7e-5d0f-4a61-9a3e-7f1f3c2b9d10")


class Sink(Protocol):
    async def publish(self, event: Event, *, event_id: str | None = None) -> None: ...


def restore_id(*parts: object) -> str:
    """The event id of a republished event: the same for the same state, whoever republishes it."""
    return uuid.uuid5(_NAMESPACE, "|".join(map(str, parts))).hex


def missing_states(stored: Iterable[ModelState], on_topic: Mapping[str, ModelState]) -> list[ModelState]:
    """Targets whose last ModelState on the topic is missing or older than the store's."""
    out = []
    for state in stored:
        seen = on_topic.get(f"{state.name}:{state.version}")
        if seen is None or seen.at < state.at:
            out.append(state)
    return sorted(out, key=lambda s: (s.at, s.name, s.version))


def missing_policies(stored: Iterable[TrafficPolicy], on_topic: Mapping[str, TrafficPolicy]) -> list[TrafficPolicy]:
    """Policies whose endpoint has no policy on the topic, or only a lower revision."""
    out = []
    for policy in stored:
        seen = on_topic.get(policy.endpoint)
        if seen is None or seen.revision < policy.revision:
            out.append(policy)
    return sorted(out, key=lambda p: p.endpoint)


def missing_rollouts(stored: Mapping[str, Sequence[RolloutStep]],
                     on_topic: Iterable[RolloutStep]) -> dict[str, list[RolloutStep]]:
    """Each endpoint's stored rollout facts when the topic holds none of that rollout's facts."""
    known = {f.rollout_id for f in on_topic if not f.command}
    return {endpoint: list(facts) for endpoint, facts in stored.items()
            if facts and facts[0].rollout_id not in known}


def last_policies(events: Iterable[Any]) -> dict[str, TrafficPolicy]:
    """The last TrafficPolicy per endpoint among the traffic topic's events (rollout facts share the key)."""
    out: dict[str, TrafficPolicy] = {}
    for event in events:
        if isinstance(event, TrafficPolicy):
            out[event.endpoint] = event
    return out


@dataclass(frozen=True)
class Restored:
    states: int = 0
    policies: int = 0


async def restore_targets(targets: TargetState, cfg: KafkaConfig, sink: Sink, *, topic_prefix: str = "") -> Restored:
    """Publish the ModelStates and TrafficPolicies that the store holds and the topics lack (ingest, on start)."""
    states: dict[str, ModelState] = {}
    for event, _env, record in await read_topic(cfg, MODEL_STATE, topic_prefix=topic_prefix):
        if isinstance(event, ModelState):
            states[record.key.decode() if record.key else event.key()] = event
    policies = last_policies(e for e, _env, _r in await read_topic(cfg, TRAFFIC, topic_prefix=topic_prefix))
    lost_states = missing_states(await targets.models(), states)
    lost_policies = missing_policies((await targets.traffic()).values(), policies)
    for state in lost_states:
        await sink.publish(state, event_id=restore_id("model-state", state.name, state.version, state.at))
    for policy in lost_policies:
        await sink.publish(policy, event_id=restore_id("traffic", policy.endpoint, policy.revision))
    if lost_states or lost_policies:
        log.warning("restored state the broker had lost, from the store",
                    model_states=[f"{s.name}:{s.version}" for s in lost_states],
                    policies={p.endpoint: p.revision for p in lost_policies})
    return Restored(states=len(lost_states), policies=len(lost_policies))
