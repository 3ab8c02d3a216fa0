"""Feature sharing against a real Redis server: a shadow fetches only the features its primary did not have."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from modelcd.events.schemas import ShadowRelation, TrafficPolicy
from modelcd.shadow.executor import ExecutorConfig, PrimaryResult, ShadowExecutor
from modelcd.shadow.features import FeatureFetcher, RedisFeatureStore
from modelcd.shadow.pressure import PressureLimits

SIGNATURES = {("wide", "2"): ["age", "income", "tenure"], ("same", "2"): ["age", "income"]}


async def hmget_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def test_shadow_fetches_only_missing_features(redis_url: str) -> None:
    """The shadow needing `tenure` gets it with one HMGET of just that name; a shadow needing nothing new makes none."""
    client = aioredis.Redis.from_url(redis_url)
    await client.hset("features:u1", mapping={"age": "41", "income": "52000.5", "tenure": "7", "city": "Lyon"})
    fetcher = FeatureFetcher(RedisFeatureStore(client))
    seen: list[tuple[str, Mapping[str, Any]]] = []
    out: list[Any] = []

    async def predict(model: str, version: str, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        seen.append((model, dict(inputs)))
        return {"y": [1]}, 0.1

    ex = ShadowExecutor(predict=predict, emit=out.append, features=fetcher,
                        needs=lambda m, v: SIGNATURES.get((m, v)),
                        config=ExecutorConfig(limits=PressureLimits(pause_queue=None, pause_lag_ms=None, pause_busy=None)))
    ex.update_policy(TrafficPolicy(endpoint="p", shadows=[ShadowRelation(primary="p", shadow="wide:2"),
                                                          ShadowRelation(primary="p", shadow="same:2")]))
    before = await hmget_calls(client)
    ready = asyncio.Event()
    task = asyncio.create_task(ex.run(ready=ready))
    await ready.wait()
    for i in range(3):  # the primary had age (request) and income (its own lookup)
        ex.offer(PrimaryResult(request_id=f"r{i}", model="p", version="1", inputs={"age": 41, "income": 52000.5},
                               outputs={"y": [1]}, latency_ms=1.0, entity="u1"))
    while len(out) < 6:
        await asyncio.sleep(0.01)
    ex.stop()
    await asyncio.wait_for(task, 10)

    assert await hmget_calls(client) - before == 3 and fetcher.lookups == 3  # one per request, for `wide` only
    assert fetcher.features_fetched == 3 and fetcher.features_shared == 2 * 3 + 2 * 3
    wide = [inputs for model, inputs in seen if model == "wide"]
    assert wide == [{"age": 41, "income": 52000.5, "tenure": 7}] * 3  # `city` was never asked for
    assert all(inputs == {"age": 41, "income": 52000.5} for model, inputs in seen if model == "same")
    assert all(p.shadow_error is None for p in out)
    await client.aclose()


async def test_missing_entity_and_unreachable_store(redis_url: str) -> None:
    """Absent features are left out; an unreachable store becomes the shadow's error, not an exception."""
    client = aioredis.Redis.from_url(redis_url)
    store = RedisFeatureStore(client)
    assert await store.get("nobody", ["age"]) == {}
    await client.aclose()
    dead = FeatureFetcher(RedisFeatureStore(aioredis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))))
    out: list[Any] = []

    async def predict(model: str, version: str, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        return {}, 0.0

    ex = ShadowExecutor(predict=predict, emit=out.append, features=dead, needs=lambda m, v: ["tenure"],
                        config=ExecutorConfig(limits=PressureLimits(pause_queue=None, pause_lag_ms=None, pause_busy=None)))
    ex.update_policy(TrafficPolicy(endpoint="p", shadows=[ShadowRelation(primary="p", shadow="wide:2")]))
    ready = asyncio.Event()
    task = asyncio.create_task(ex.run(ready=ready))
    await ready.wait()
    ex.offer(PrimaryResult(request_id="r", model="p", version="1", inputs={}, outputs={}, latency_ms=1.0, entity="u"))
    while not out:
        await asyncio.sleep(0.01)
    ex.stop()
    await asyncio.wait_for(task, 10)
    assert out[0].shadow_error is not None and out[0].shadow_error.startswith("FeatureLookupError")
