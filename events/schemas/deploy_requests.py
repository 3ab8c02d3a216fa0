"""`modelcd.deploy-requests`: what a training pipeline, the CLI or the HTTP API asks ingest to do.

Keyed by model name so that requests for one model are handled in order.
"""

from __future__ import annotations

import msgspec

from .base import Event, new_id, now

TOPIC = "modelcd.deploy-requests"


class DeployRequested(Event, frozen=True, kw_only=True, tag="modelcd.deploy.requested.v1"):
    """Deploy the package found at `package_uri` (store key `store:packages/..`, file:// or s3://)."""

    topic = TOPIC
    deployment_id: str = msgspec.field(default_factory=new_id)
    model: str = ""  # model name, when the requester knows it (the key); else read from the manifest
    package_uri: str
    sha256: str | None = None  # expected archive checksum, when the requester knows it
    owner: str | None = None  # overrides the manifest's owner
    expiry_seconds: int | None = None  # overrides the manifest's expiry period
    pinned: bool = False  # never auto-retired
    requested_by: str = ""
    requested_at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return self.model or self.deployment_id


class RetireRequested(Event, frozen=True, kw_only=True, tag="modelcd.retire.requested.v1"):
    """Retire `model:version` (by a person, or by the retirement processor)."""

    topic = TOPIC
    deployment_id: str = msgspec.field(default_factory=new_id)
    model: str
    version: str
    reason: str = ""
    requested_by: str = ""
    requested_at: float = msgspec.field(default_factory=now)
    # Retire even while an endpoint routes to it, a rollout moves it or a relation shadows it (the
    # requests that reach it then fail); without it ingest refuses a model in use (store.safety).
    force: bool = False

    def key(self) -> str:
        return self.model


DeployRequestEvent = DeployRequested | RetireRequested
