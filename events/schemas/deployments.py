"""`modelcd.deployments`: progress of one deployment, keyed by deployment id.

Steps, in order: `validate`, `compile`, `serving-validation`, `publish` (or `retire`).
A deployment ends with exactly one DeploymentCompleted or DeploymentFailed.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.deployments"

Step = Literal["accepted", "validate", "compile", "serving-validation", "publish", "retire"]
StepStatus = Literal["started", "succeeded", "failed", "skipped"]


class DeploymentProgress(Event, frozen=True, kw_only=True, tag="modelcd.deployment.progress.v1"):
    """One step of a deployment started, succeeded, failed or was skipped."""

    topic = TOPIC
    deployment_id: Annotated[str, Doc("The deployment this step belongs to; also the record key.")]
    model: Annotated[str, Doc("Model name, once known (empty before the manifest is read).")] = ""
    version: Annotated[str, Doc("Model version, once known.")] = ""
    step: Annotated[
        Step,
        Doc("Step of the pipeline: accepted, validate, compile, serving-validation, publish (or retire)."),
    ]
    status: Annotated[StepStatus, Doc("started, succeeded, failed or skipped.")]
    detail: Annotated[str, Doc("What happened in the step, in words (e.g. the runtime chosen by compile).")] = ""
    duration_ms: Annotated[float | None, Doc("Time the step took, in milliseconds (null while started).")] = None
    at: Annotated[
        float,
        Doc("When, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.deployment_id


class DeploymentCompleted(Event, frozen=True, kw_only=True, tag="modelcd.deployment.completed.v1"):
    """A deployment ended well: the model version is in the store and nodes load it (or it was already there: noop)."""

    topic = TOPIC
    deployment_id: Annotated[str, Doc("The deployment; also the record key.")]
    model: Annotated[str, Doc("Model name.")]
    version: Annotated[str, Doc("Model version.")]
    sha256: Annotated[str, Doc("Package id: sha256 (hex) of the package archive.")] = ""
    runtime: Annotated[str, Doc("Runtime the nodes serve it with (e.g. onnx, sklearn).")] = ""
    noop: Annotated[
        bool,
        Doc("true: an identical package was already serving under this name:version; nothing changed."),
    ] = False
    existing_deployment_id: Annotated[
        str | None,
        Doc("For a no-op: the deployment that put the identical package in place."),
    ] = None
    timings_ms: Annotated[dict[str, float], Doc("Milliseconds each step took, by step name.")] = {}
    at: Annotated[
        float,
        Doc("When the deployment ended, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.deployment_id


class DeploymentFailed(Event, frozen=True, kw_only=True, tag="modelcd.deployment.failed.v1"):
    """A deployment ended in failure at `step`; nothing was left in the store."""

    topic = TOPIC
    deployment_id: Annotated[str, Doc("The deployment; also the record key.")]
    model: Annotated[str, Doc("Model name, when known.")] = ""
    version: Annotated[str, Doc("Model version, when known.")] = ""
    step: Annotated[Step, Doc("Step that failed.")]
    reason: Annotated[str, Doc("Why it failed and what to change, in words.")]
    at: Annotated[
        float,
        Doc("When it failed, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.deployment_id


DeploymentEvent = DeploymentProgress | DeploymentCompleted | DeploymentFailed
