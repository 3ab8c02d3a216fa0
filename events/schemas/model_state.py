"""`modelcd.model-state`: the target state of one `name:version` (a state topic, last write wins)."""

from __future__ import annotations

from typing import Literal

import msgspec

from .base import Event, now

TOPIC = "modelcd.model-state"

Target = Literal["serving", "retired"]


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    memory_bytes: int = 0  # measured at serving validation; the node's budget uses it
    load_ms: float = 0.0
    predict_us: float = 0.0  # median predict time on the sample data


class ModelState(Event, frozen=True, kw_only=True, tag="modelcd.model.state.v1"):
    topic = TOPIC
    name: str
    version: str
    target: Target
    package_uri: str = ""
    sha256: str = ""
    runtime: str = ""
    flavor: str = ""
    owner: str = ""
    expiry_seconds: int = 0
    pinned: bool = False
    deployment_id: str = ""
    deployed_at: float = 0.0
    resources: Resources = Resources()
    reason: str = ""  # why retired
    at: float = msgspec.field(default_factory=now)

    def key(self) -> str:
        return f"{self.name}:{self.version}"


ModelStateEvent = ModelState
