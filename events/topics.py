"""Topic names and settings, in one place.

State topics (`model-state`, `traffic`) are compacted where the broker supports
it; their readers never rely on it and take the last write per key.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schemas import TOPIC_EVENTS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    retention_ms: int = 7 * 24 * 3600 * 1000

    def configs(self) -> dict[str, str]:
        if self.compacted:
            return {"cleanup.policy": "compact"}
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


DEPLOY_REQUESTS = "modelcd.deploy-requests"
DEPLOYMENTS = "modelcd.deployments"
MODEL_STATE = "modelcd.model-state"
TRAFFIC = "modelcd.traffic"
PREDICTIONS = "modelcd.predictions"
SHADOW_PREDICTIONS = "modelcd.shadow-predictions"
SHADOW_COMPARISONS = "modelcd.shadow-comparisons"
USAGE = "modelcd.usage"
HEALTH = "modelcd.health"
RETIREMENT = "modelcd.retirement"

TOPICS: dict[str, TopicSpec] = {
    DEPLOY_REQUESTS: TopicSpec(DEPLOY_REQUESTS),
    DEPLOYMENTS: TopicSpec(DEPLOYMENTS),
    MODEL_STATE: TopicSpec(MODEL_STATE, compacted=True),
    TRAFFIC: TopicSpec(TRAFFIC, compacted=True),
    PREDICTIONS: TopicSpec(PREDICTIONS, retention_ms=24 * 3600 * 1000),
    SHADOW_PREDICTIONS: TopicSpec(SHADOW_PREDICTIONS, retention_ms=3 * 24 * 3600 * 1000),
    SHADOW_COMPARISONS: TopicSpec(SHADOW_COMPARISONS),
    USAGE: TopicSpec(USAGE),
    HEALTH: TopicSpec(HEALTH, retention_ms=24 * 3600 * 1000),
    RETIREMENT: TopicSpec(RETIREMENT),
}

assert set(TOPICS) == set(TOPIC_EVENTS), "every topic has a spec and an event union"
