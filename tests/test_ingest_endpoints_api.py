"""The deployment API's /endpoints routes: traffic policies, shadow relations, rollouts.

Unit tests run the ASGI app with a fake sink whose events feed the endpoint view, as the traffic
topic does (a tiny stand-in controller answers rollout commands); the last test uses the real
broker and the same reader `modelcd traffic show` uses.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import httpx

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.events.schemas import Event, RolloutStep, TrafficPolicy
from modelcd.ingest.api import ApiConfig, DeploymentApi
from modelcd.ingest.store import LocalStore
from modelcd.ingest.targets import TargetState
from modelcd.ingest.tracking import TrackingView
from modelcd.serving.rollout import on_command
from modelcd.serving.traffic_ops import EndpointView, load_view


class TopicSink:
    """Records what the API publishes; answers rollout commands like the controller would."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event, *, event_id: str | None = None) -> None:
        self.events.append(event)
        if isinstance(event, RolloutStep) and event.command:
            view = EndpointView(event.endpoint, self.events)
            self.events.extend(on_command(view.rollout, event, view.policy, time.time()))

    async def view(self, endpoint: str) -> EndpointView:
        return EndpointView(endpoint, self.events)


def api(tmp_path: Path, token: str | None = None) -> tuple[httpx.AsyncClient, TopicSink, LocalStore]:
    store, sink = LocalStore(tmp_path / "store"), TopicSink()
    app = DeploymentApi(ApiConfig(api_token=token, max_upload_bytes=1 << 20), store, sink, TrackingView(),
                        endpoint_views=sink.view)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest"), sink, store


def routes(**weights: float) -> dict[str, Any]:
    return {"routes": [{"model": ref.split("_")[0], "version": ref.split("_")[1], "weight": w}
                       for ref, w in weights.items()]}


async def test_put_and_get_traffic(tmp_path: Path) -> None:
    client, sink, store = api(tmp_path)
    async with client:
        assert (await client.get("/endpoints/iris/traffic")).status_code == 404
        r = await client.put("/endpoints/iris/traffic", json={**routes(iris_1=90, iris_2=10), "sticky_key": "user"})
        assert r.status_code == 200, r.text
        [policy] = sink.events
        assert isinstance(policy, TrafficPolicy) and policy.revision == 1 and policy.sticky_key == "user"
        assert {(x.model, x.version, x.weight) for x in policy.routes} == {("iris", "1", 90.0), ("iris", "2", 10.0)}
        assert await TargetState(store).get_traffic("iris") == policy  # what nodes reconcile against
        got = (await client.get("/endpoints/iris/traffic")).json()
        assert got["revision"] == 1 and len(got["routes"]) == 2
        assert [e["endpoint"] for e in (await client.get("/endpoints")).json()["endpoints"]] == ["iris"]


async def test_bad_policies_are_refused_with_reasons_and_change_nothing(tmp_path: Path) -> None:
    client, sink, store = api(tmp_path)
    async with client:
        cases = [
            (routes(iris_1=90, iris_2=20), "add up to 110"),
            (routes(iris_1=110, iris_2=-10), "negative"),
            ({"routes": [{"model": "iris", "version": "1", "weight": 50}] * 2}, "once"),
            ({"routes": []}, "at least one route"),
            ({"routes": [{"model": "iris", "version": "1", "weight": 100, "log_rate": 2}]}, "0..1"),
            ({"routes": "iris"}, "malformed JSON body"),
            ({"routes": [], "extra": 1}, "malformed JSON body"),
        ]
        for body, reason in cases:
            r = await client.put("/endpoints/iris/traffic", json=body)
            assert r.status_code == 400 and reason in r.json()["error"], (body, r.text)
        bad = await client.put("/endpoints/iris/traffic", content=b"{not json",
                               headers={"content-type": "application/json"})
        assert bad.status_code == 400
        assert (await client.delete("/endpoints/iris/traffic")).status_code == 405
    assert sink.events == [] and await TargetState(store).traffic() == {}


async def test_shadow_add_list_remove(tmp_path: Path) -> None:
    client, sink, store = api(tmp_path)
    async with client:
        r = await client.post("/endpoints/iris/shadows", json={"primary": "iris", "shadow": "iris:2",
                                                               "sample_rate": 0.25, "until": "2h",
                                                               "where": ["header:x-country=DE"]})
        assert r.status_code == 201, r.text
        [rel] = (await client.get("/endpoints/iris/shadows")).json()["shadows"]
        assert rel["shadow"] == "iris:2" and rel["sample_rate"] == 0.25
        assert rel["criteria"] == [{"field": "header:x-country", "op": "eq", "value": "DE"}]
        assert 2 * 3600 - 60 < rel["end"] - time.time() <= 2 * 3600
        stored = await TargetState(store).get_traffic("iris")
        assert stored is not None and [s.shadow for s in stored.shadows] == ["iris:2"]
        for body, reason in [({"primary": "iris:2", "shadow": "iris:2"}, "itself"),
                             ({"primary": "iris", "shadow": "iris"}, "name:version"),
                             ({"primary": "iris", "shadow": "iris:3", "sample_rate": 0}, "rate"),
                             ({"primary": "iris", "shadow": "iris:3", "until": "someday"}, "not a time")]:
            bad = await client.post("/endpoints/iris/shadows", json=body)
            assert bad.status_code == 400 and reason in bad.json()["error"], (body, bad.text)
        assert (await client.delete("/endpoints/iris/shadows/iris:9")).status_code == 404
        gone = await client.delete("/endpoints/iris/shadows/iris:2")
        assert gone.status_code == 200 and gone.json()["shadows"] == []
    policies = [e for e in sink.events if isinstance(e, TrafficPolicy)]
    assert [len(p.shadows) for p in policies] == [1, 0] and [p.revision for p in policies] == [1, 2]


async def test_rollout_start_status_commands_and_conflicts(tmp_path: Path) -> None:
    client, sink, _store = api(tmp_path)
    async with client:
        r = await client.post("/endpoints/iris/rollout", json={"to": "iris:2"})
        assert r.status_code == 404 and "no traffic to roll out against" in r.json()["error"]
        assert (await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))).status_code == 200
        for body, reason in [({"to": "iris:2", "plan": "yolo"}, "unknown plan"),
                             ({"to": "iris:2", "steps": [50, 10, 100]}, "increase"),
                             ({"to": "iris:2", "interval": "soon"}, ""),
                             ({"to": "iris"}, "")]:
            bad = await client.post("/endpoints/iris/rollout", json=body)
            assert bad.status_code == 400 and reason in bad.json()["error"], (body, bad.text)
        started = await client.post("/endpoints/iris/rollout", json={"to": "iris:2", "plan": "fast",
                                                                     "interval": "30s", "log_rate": 0.2})
        assert started.status_code == 202, started.text
        cmd = next(e for e in sink.events if isinstance(e, RolloutStep) and e.command)
        assert cmd.action == "start" and cmd.canary == "iris:2" and cmd.plan is not None
        assert cmd.plan.interval_s == 30.0 and cmd.plan.log_rate == 0.2 and cmd.plan.steps == [10.0, 100.0]
        status = (await client.get("/endpoints/iris/rollout")).json()
        assert status["phase"] == "running" and status["canary"] == "iris:2" and status["weight"] == 10.0
        again = await client.post("/endpoints/iris/rollout", json={"to": "iris:2"})
        assert again.status_code == 409 and "already has rollout" in again.json()["error"]
        busy = await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        assert busy.status_code == 409 and "abort it first" in busy.json()["error"]
        paused = await client.post("/endpoints/iris/rollout/pause", json={"reason": "lunch"})
        assert paused.status_code == 202
        assert (await client.get("/endpoints/iris/rollout")).json()["phase"] == "paused"
        assert (await client.post("/endpoints/iris/rollout/explode")).status_code == 404
        assert (await client.post("/endpoints/iris/rollout/abort")).status_code == 202
        assert (await client.get("/endpoints/iris/rollout")).json()["phase"] == "aborted"
        assert (await client.post("/endpoints/iris/rollout/resume")).status_code == 409
        forced = await client.put("/endpoints/iris/traffic", json={**routes(iris_2=100), "force": True})
        assert forced.status_code == 200
    commands = [e.action for e in sink.events if isinstance(e, RolloutStep) and e.command]
    assert commands == ["start", "pause", "abort"]
    facts = [e.action for e in sink.events if isinstance(e, RolloutStep) and not e.command]
    assert facts == ["start", "pause", "abort"]  # each command answered once, by the stand-in controller


async def test_endpoints_need_the_token(tmp_path: Path) -> None:
    client, sink, _ = api(tmp_path, token="s3cret")
    async with client:
        r = await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        ok = await client.put("/endpoints/iris/traffic", json=routes(iris_1=100),
                              headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    assert len(sink.events) == 1


async def test_policy_set_through_the_api_is_what_the_cli_reads(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Real broker: the API publishes; `modelcd traffic show`'s reader (load_view on the topic) sees it."""
    store = LocalStore(tmp_path / "store")
    async with Publisher(broker.config, "api") as pub:
        app = DeploymentApi(ApiConfig(api_token=None, max_upload_bytes=1 << 20), store, pub, TrackingView(),
                            endpoint_views=functools.partial(load_view, broker.config))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            r = await client.put("/endpoints/wine/traffic", json=routes(wine_1=70, wine_2=30))
            assert r.status_code == 200, r.text
            r = await client.post("/endpoints/wine/shadows", json={"primary": "wine:1", "shadow": "wine:3"})
            assert r.status_code == 201, r.text
    view = await load_view(broker.config, "wine")
    assert view.policy is not None and view.policy.revision == 2
    assert {(x.version, x.weight) for x in view.policy.routes} == {("1", 70.0), ("2", 30.0)}
    assert [(s.primary, s.shadow) for s in view.policy.shadows] == [("wine:1", "wine:3")]
