"""Online feature lookup for shadows: fetch only the features the primary did not already have.

A model's signature names the inputs (features) it needs. The primary's request carries some of
them, and the node may have looked up more for the primary; a shadow that needs features beyond
those gets them from the feature store, one HMGET of just the missing names. Without a feature
store (or without an entity id on the request), the shadow gets the request's own inputs.

`RedisFeatureStore` keeps one hash per entity, `features:<entity>`, field = feature name, value =
the feature as JSON (a bare number or a string that is not JSON is returned as text).

Failures: a lookup that fails raises `FeatureLookupError`; the executor turns it into that
shadow's `shadow_error`, never into a failure of the primary.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

_json = msgspec.json.Decoder()


class FeatureLookupError(RuntimeError):
    """The feature store could not answer (unreachable, timeout, wrong type at the key)."""

    retriable = True


@runtime_checkable
class FeatureStore(Protocol):
    """Features of one entity by name; names the store does not hold are absent from the answer."""

    async def get(self, entity: str, names: Sequence[str]) -> dict[str, Any]: ...


def _decode(raw: bytes | str) -> Any:
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        return _json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")


class RedisFeatureStore:
    """redis.asyncio: one hash per entity (`<prefix><entity>`), one HMGET per lookup."""

    def __init__(self, client: Any, *, prefix: str = "features:") -> None:
        self._client = client
        self._prefix = prefix

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisFeatureStore:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - an optional extra
            raise FeatureLookupError("a Redis feature store needs redis-py: pip install 'modelcd[redis]'") from exc
        return cls(aioredis.Redis.from_url(url), **kwargs)

    async def get(self, entity: str, names: Sequence[str]) -> dict[str, Any]:
        if not names:
            return {}
        try:
            values = await self._client.hmget(self._prefix + entity, list(names))
        except Exception as exc:  # redis' own errors: connection, timeout, WRONGTYPE
            raise FeatureLookupError(f"feature lookup for {entity!r} failed: {exc}") from exc
        return {n: _decode(v) for n, v in zip(names, values, strict=True) if v is not None}

    async def aclose(self) -> None:
        await self._client.aclose()


class FeatureFetcher:
    """Counts what it fetches, so tests and /metrics can see that shared features are not refetched."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.lookups = 0  # calls to the store
        self.features_fetched = 0  # feature names asked for
        self.features_shared = 0  # needed features the primary already had

    async def fetch_missing(self, needed: Iterable[str], already_have: Collection[str] | Mapping[str, Any],
                            entity: str) -> dict[str, Any]:
        """The features in `needed` that are not in `already_have`, from the store (no lookup if none)."""
        needed = list(dict.fromkeys(needed))  # keep order, drop repeats
        missing = [n for n in needed if n not in already_have]
        self.features_shared += len(needed) - len(missing)
        if not missing:
            return {}
        self.lookups += 1
        self.features_fetched += len(missing)
        return await self.store.get(entity, missing)
