"""`modelcd.model-state`: the target state of one `name:version` (a state topic, last write wins)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .base import Doc, Event, now

TOPIC = "modelcd.model-state"

Target = Literal["serving", "retired"]


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """What serving validation measured for a model version."""

    memory_bytes: Annotated[
        int,
        Doc("Resident memory measured at serving validation, in bytes; nodes budget with it."),
    ] = 0
    load_ms: Annotated[float, Doc("Load time measured at serving validation, in milliseconds.")] = 0.0
    predict_us: Annotated[float, Doc("Median predict time on the sample data, in microseconds.")] = 0.0


class ModelState(Event, frozen=True, kw_only=True, tag="modelcd.model.state.v1"):
    """The target state of one model version: serving (nodes load it) or retired (nodes unload it)."""

    topic = TOPIC
    name: Annotated[str, Doc("Model name.")]
    version: Annotated[str, Doc("Model version. The record key is `name:version`.")]
    target: Annotated[Target, Doc("serving (nodes load it) or retired (nodes unload it).")]
    package_uri: Annotated[
        str,
        Doc("Where nodes fetch the package (a store key such as `store:packages/<sha256>.tar`)."),
    ] = ""
    sha256: Annotated[str, Doc("Package id: sha256 (hex) of the package archive.")] = ""
    runtime: Annotated[str, Doc("Runtime the nodes serve it with (e.g. onnx, sklearn, xgboost, lightgbm).")] = ""
    flavor: Annotated[str, Doc("Flavor of the model as packaged (sklearn, onnx, xgboost, lightgbm).")] = ""
    owner: Annotated[str, Doc("Team or person who owns the model.")] = ""
    expiry_seconds: Annotated[
        int,
        Doc("Expiry period in seconds: retired after being unused this long (0: never)."),
    ] = 0
    pinned: Annotated[bool, Doc("true: never auto-retired.")] = False
    deployment_id: Annotated[
        str,
        Doc("The deployment that set this state (look it up with `GET /deployments/{id}`)."),
    ] = ""
    deployed_at: Annotated[float, Doc("When it was deployed, seconds since the Unix epoch (UTC, fractional).")] = 0.0
    resources: Annotated[Resources, Doc("What serving validation measured.")] = Resources()
    replicas: Annotated[
        int,
        Doc("Serving nodes that hold it (placement); 0: the fleet's default (MODELCD_REPLICAS)."),
    ] = 0
    reason: Annotated[str, Doc("Why it was retired (empty while serving).")] = ""
    at: Annotated[
        float,
        Doc("When this state was written, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return f"{self.name}:{self.version}"


ModelStateEvent = ModelState
