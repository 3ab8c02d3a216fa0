"""The target state in the store: which `name:version` should serve, and each endpoint's traffic policy.

The store is the durable home of every view; topics are the change log (docs/ARCHITECTURE.md,
"Durable state"). Keys:
- `targets/models/<name>/<version>.json`: the last ModelState of that version;
- `targets/traffic/<endpoint>.json`: the last TrafficPolicy of that endpoint (its revision);
- `targets/rollouts/<endpoint>.json`: the facts (RolloutStep) of the endpoint's latest rollout;
- `targets/usage/<name>.json`: each version's last use and since when the retirement processor
  tracks it (`LastUse`, written by the processor, throttled);
- `deployments/<deployment id>.json`: the record of one ended deployment (ingest's tracking view);
- `requests/<deployment id>.json`: a request accepted and not ended yet (ingest resumes it);
- `uploads/<deployment id>.tar`: an archive staged by the API until its deployment ends.
Each is written whole by one atomic put, so no reader sees a half-written state.
"""

from __future__ import annotations

import msgspec

from modelcd.events.schemas import ModelState, RolloutStep, TrafficPolicy

from .blobs import Store, StoreNotFound
from .package import is_model_ref

_model_decoder = msgspec.json.Decoder(ModelState)
_traffic_decoder = msgspec.json.Decoder(TrafficPolicy)
_rollout_decoder = msgspec.json.Decoder(list[RolloutStep])
_encoder = msgspec.json.Encoder()

UPLOAD_PREFIX = "uploads/"
RECORD_PREFIX = "deployments/"
REQUEST_PREFIX = "requests/"


def upload_key(deployment_id: str) -> str:
    """Where the API stages an uploaded archive until its deployment ends."""
    return f"{UPLOAD_PREFIX}{deployment_id}.tar"


def record_key(deployment_id: str) -> str:
    return f"{RECORD_PREFIX}{deployment_id}.json"


def request_key(deployment_id: str) -> str:
    return f"{REQUEST_PREFIX}{deployment_id}.json"


def id_of(key: str) -> str:
    """The deployment id in an upload, record or request key."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def model_key(name: str, version: str) -> str:
    return f"targets/models/{name}/{version}.json"


def traffic_key(endpoint: str) -> str:
    return f"targets/traffic/{endpoint}.json"


def rollout_key(endpoint: str) -> str:
    return f"targets/rollouts/{endpoint}.json"


def usage_key(name: str) -> str:
    return f"targets/usage/{name}.json"


class LastUse(msgspec.Struct, kw_only=True):
    """What the retirement processor remembers of one version beyond the broker: its last use (epoch
    seconds, 0: never seen used) and since when the processor's table tracks it."""

    last_used: float = 0.0
    tracked_since: float = 0.0


_last_use_decoder = msgspec.json.Decoder(dict[str, LastUse])


class TargetState:
    """Typed access to the target state kept in a Store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def put_model(self, state: ModelState) -> None:
        await self.store.put(model_key(state.name, state.version), _encoder.encode(state))

    async def create_model(self, state: ModelState) -> bool:
        """Write a name:version that does not exist yet; False if one appeared meanwhile (create-only)."""
        return await self.store.put_if_absent(model_key(state.name, state.version), _encoder.encode(state))

    async def get_model(self, name: str, version: str) -> ModelState | None:
        if not is_model_ref(name, version):  # no package names it; as a key it may not even be valid (a NUL)
            return None
        try:
            return _model_decoder.decode(await self.store.get(model_key(name, version)))
        except StoreNotFound:
            return None

    async def models(self) -> list[ModelState]:
        out = []
        for key in await self.store.list("targets/models/"):
            if not key.endswith(".json"):
                continue
            try:
                out.append(_model_decoder.decode(await self.store.get(key)))
            except StoreNotFound:  # deleted between list and get
                continue
        return out

    async def serving(self) -> dict[str, ModelState]:
        return {f"{m.name}:{m.version}": m for m in await self.models() if m.target == "serving"}

    async def put_traffic(self, policy: TrafficPolicy) -> None:
        await self.store.put(traffic_key(policy.endpoint), _encoder.encode(policy))

    async def get_traffic(self, endpoint: str) -> TrafficPolicy | None:
        try:
            return _traffic_decoder.decode(await self.store.get(traffic_key(endpoint)))
        except StoreNotFound:
            return None

    async def traffic(self) -> dict[str, TrafficPolicy]:
        out = {}
        for key in await self.store.list("targets/traffic/"):
            try:
                p = _traffic_decoder.decode(await self.store.get(key))
            except StoreNotFound:
                continue
            out[p.endpoint] = p
        return out

    async def put_rollout(self, endpoint: str, facts: list[RolloutStep]) -> None:
        """The facts of the endpoint's latest rollout, in order (what `rollout.apply` folds)."""
        await self.store.put(rollout_key(endpoint), _encoder.encode(facts))

    async def get_rollout(self, endpoint: str) -> list[RolloutStep]:
        try:
            return _rollout_decoder.decode(await self.store.get(rollout_key(endpoint)))
        except StoreNotFound:
            return []

    async def rollouts(self) -> dict[str, list[RolloutStep]]:
        out = {}
        for key in await self.store.list("targets/rollouts/"):
            try:
                facts = _rollout_decoder.decode(await self.store.get(key))
            except StoreNotFound:
                continue
            if facts:
                out[facts[0].endpoint] = facts
        return out

    async def put_last_use(self, name: str, versions: dict[str, LastUse]) -> None:
        await self.store.put(usage_key(name), _encoder.encode(versions))

    async def get_last_use(self, name: str) -> dict[str, LastUse]:
        try:
            return _last_use_decoder.decode(await self.store.get(usage_key(name)))
        except (StoreNotFound, msgspec.DecodeError):
            return {}

    async def last_uses(self) -> dict[str, dict[str, LastUse]]:
        """{"name": {"version": LastUse}} for every model the retirement processor remembers."""
        out = {}
        for key in await self.store.list("targets/usage/"):
            name = key.removeprefix("targets/usage/").removesuffix(".json")
            if versions := await self.get_last_use(name):
                out[name] = versions
        return out
