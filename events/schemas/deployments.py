"""`modelcd.deployments`: progress of one deployment, keyed by deployment id.

Steps, in order: `validate`, `compile`, `serving-validation`, `publish` (or `retire`).
A deployment ends with exactly one DeploymentCompleted or DeploymentFailed.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .base import Event, now

TOPIC = "modelcd.deployments"

Step = Literal["accepted", "validate", "compile", "serving-validation", "publish", "retire"]
StepStatus = Literal["started", "succeeded", "failed", "skipped"]


class DeploymentProgress(Event, frozen=True, kw_only=True, tag="modelcd.deployment.progress.v1"):
    topic = TOPIC
    deployment_id: str
    model: str = ""
    version: str = ""
    step: Step
    status: StepStatus
    detail: str = ""
    duration_ms: float | None = None
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.deployment_id


class DeploymentCompleted(Event, frozen=True, kw_only=True, tag="modelcd.deployment.completed.v1"):
    topic = TOPIC
    deployment_id: str
    model: str
    version: str
    sha256: str = ""
    runtime: str = ""
    noop: bool = False  # an identical package was already serving: nothing changed
    existing_deployment_id: str | None = None
    timings_ms: dict[str, float] = {}
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.deployment_id


class DeploymentFailed(Event, frozen=True, kw_only=True, tag="modelcd.deployment.failed.v1"):
    topic = TOPIC
    deployment_id: str
    model: str = ""
    version: str = ""
    step: Step
    reason: str
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.deployment_id


DeploymentEvent = DeploymentProgress | DeploymentCompleted | DeploymentFailed
