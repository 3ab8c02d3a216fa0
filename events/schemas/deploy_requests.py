"""`modelcd.deploy-requests`: what a training pipeline, the CLI or the HTTP API asks ingest to do.

Keyed by model name so that requests for one model are handled in order.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import Doc, Event, new_id, now

TOPIC = "modelcd.deploy-requests"


class DeployRequested(Event, frozen=True, kw_only=True, tag="modelcd.deploy.requested.v1"):
    """Deploy the package found at `package_uri` (store key `store:packages/..`, file:// or s3://)."""

    topic = TOPIC
    deployment_id: Annotated[
        str,
        Doc("Id of this deployment (any unique string; default: a random hex id). Set it yourself to follow the "
            "deployment with `GET /deployments/{id}` or on modelcd.deployments, where every progress event carries "
            "it."),
    ] = msgspec.field(default_factory=new_id)
    model: Annotated[
        str,
        Doc("Model name; also the record key. Empty: read from the package's manifest (then key the record by "
            "deployment_id)."),
    ] = ""
    package_uri: Annotated[
        str,
        Doc("Where ingest fetches the package archive: `s3://bucket/key`, `file:///absolute/path.tar` (a path on the "
            "ingest host, absolute) or `store:<key>` (a key in modelcd's store)."),
    ]
    sha256: Annotated[
        str | None,
        Doc("Expected sha256 (hex) of the archive's bytes; the deployment fails when it differs. null: not checked."),
    ] = None
    owner: Annotated[
        str | None,
        Doc("Team or person who owns the model (warned before auto-retirement); overrides the manifest's owner. null:"
            " the manifest's."),
    ] = None
    expiry_seconds: Annotated[
        int | None,
        Doc("Expiry period in seconds: the model is retired after being unused this long. Overrides the manifest's "
            "expiry. null: the manifest's."),
    ] = None
    pinned: Annotated[bool, Doc("true: never auto-retired, whatever its use.")] = False
    requested_by: Annotated[
        str,
        Doc("Who asked (free text, shown in the deployment record), e.g. the pipeline's name."),
    ] = ""
    requested_at: Annotated[
        float,
        Doc("When the request was made, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model or self.deployment_id


class RetireRequested(Event, frozen=True, kw_only=True, tag="modelcd.retire.requested.v1"):
    """Retire `model:version` (by a person, or by the retirement processor)."""

    topic = TOPIC
    deployment_id: Annotated[
        str,
        Doc("Id of this retirement (default: a random hex id); its progress appears on modelcd.deployments under it."),
    ] = msgspec.field(default_factory=new_id)
    model: Annotated[str, Doc("Model name; also the record key.")]
    version: Annotated[str, Doc("Version to retire.")]
    reason: Annotated[str, Doc("Why (free text, kept in the model state).")] = ""
    requested_by: Annotated[str, Doc("Who asked (free text).")] = ""
    requested_at: Annotated[
        float,
        Doc("When the request was made, seconds since the Unix epoch (UTC, fractional)."),
    ] = msgspec.field(default_factory=now)
    force: Annotated[
        bool,
        Doc("Retire even while an endpoint routes to it, a rollout moves it or a relation shadows it (the requests "
            "that reach it then fail); false: ingest refuses to retire a model in use."),
    ] = False

    def key(self) -> str:
        return self.model


DeployRequestEvent = DeployRequested | RetireRequested
