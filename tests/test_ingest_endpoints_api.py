"""The deployment API's /endpoints routes: traffic policies, shadow relations, rollouts.

Unit tests run the ASGI app with a fake sink whose events feed the endpoint view, as the traffic
topic does (a tiny stand-in controller answers rollout commands); the last test uses the real
broker and the same reader `modelcd traffic show` uses.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
from aiokafka.errors import KafkaConnectionError

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.events.schemas import Event, ModelState, RolloutStep, TrafficPolicy
from modelcd.ingest.api import ApiConfig, DeploymentApi
from modelcd.ingest.tracking import TrackingView
from modelcd.rollout.api import endpoint_routes
from modelcd.rollout.machine import make_plan, on_command
from modelcd.rollout.traffic_ops import EndpointView, load_view
from modelcd.store.blobs import LocalStore
from modelcd.store.targets import TargetState


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


SERVING = ("iris:1", "iris:2", "iris:3", "iris:7", "iris:8", "iris:9", "wine:1", "wine:2", "wine:3", "wine:4")


def seeded(root: Path, refs: tuple[str, ...] = SERVING) -> LocalStore:
    """A local store whose target state serves `refs` (what a deployment writes), as the safety check reads it."""
    for ref in refs:
        name, version = ref.split(":")
        path = root / "targets" / "models" / name / f"{version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(msgspec.json.encode(ModelState(name=name, version=version, target="serving")))
    return LocalStore(root)


def api(tmp_path: Path, token: str | None = None,
        serving: tuple[str, ...] = SERVING) -> tuple[httpx.AsyncClient, TopicSink, LocalStore]:
    store, sink = seeded(tmp_path / "store", serving), TopicSink()
    app = DeploymentApi(ApiConfig(api_token=token, max_upload_bytes=1 << 20), store, sink, TrackingView(),
                        routes={"endpoints": endpoint_routes(sink.view)})
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
    store = seeded(tmp_path / "store")
    async with Publisher(broker.config, "api") as pub:
        app = DeploymentApi(ApiConfig(api_token=None, max_upload_bytes=1 << 20), store, pub, TrackingView(),
                            routes={"endpoints": endpoint_routes(functools.partial(load_view, broker.config))})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            r = await client.put("/endpoints/wine/traffic", json=routes(wine_1=70, wine_2=30))
            assert r.status_code == 200, r.text
            r = await client.post("/endpoints/wine/shadows", json={"primary": "wine:1", "shadow": "wine:3"})
            assert r.status_code == 201, r.text
    view = await load_view(broker.config, "wine")
    assert view.policy is not None and view.policy.revision == 2
    assert {(x.version, x.weight) for x in view.policy.routes} == {("1", 70.0), ("2", 30.0)}
    assert [(s.primary, s.shadow) for s in view.policy.shadows] == [("wine:1", "wine:3")]


async def test_unknown_endpoints_are_404_everywhere_and_publish_nothing(tmp_path: Path) -> None:
    """Reading or steering an endpoint with nothing on record answers 404 with a reason."""
    client, sink, store = api(tmp_path)
    async with client:
        for method, path, reason in [("GET", "/endpoints/nope/traffic", "no traffic policy"),
                                     ("GET", "/endpoints/nope/shadows", "no traffic policy"),
                                     ("DELETE", "/endpoints/nope/shadows/iris:2", "no traffic policy"),
                                     ("GET", "/endpoints/nope/rollout", "no rollout"),
                                     ("POST", "/endpoints/nope/rollout/pause", "none on record"),
                                     ("POST", "/endpoints/nope/rollout/promote", "none on record"),
                                     ("POST", "/endpoints/nope/rollout/explode", "unknown rollout action"),
                                     ("GET", "/endpoints/nope/traffic/extra", "no such route")]:
            r = await client.request(method, path)
            assert r.status_code == 404 and reason in r.json()["error"], (method, path, r.text)
        r = await client.post("/endpoints/nope/rollout", json={"to": "iris:2"})
        assert r.status_code == 404 and "set its policy first" in r.json()["error"]
    assert sink.events == [] and await TargetState(store).traffic() == {}


async def test_rollout_body_is_checked_like_the_cli(tmp_path: Path) -> None:
    """Plans, steps, intervals and thresholds go through make_plan: the same reasons as `rollout start`."""
    client, sink, _ = api(tmp_path)
    async with client:
        assert (await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))).status_code == 200
        for body, reason in [({"to": "iris:2", "plan": "yolo"}, "unknown plan 'yolo'"),
                             ({"to": "iris:2", "steps": [10, 50]}, "the last step must be 100"),
                             ({"to": "iris:2", "steps": [100]}, "at least two steps"),
                             ({"to": "iris:2", "steps": [0, 100]}, "blue-green"),
                             ({"to": "iris:2", "interval": "soon"}, "not a duration"),
                             ({"to": "iris:2", "interval": -5}, "interval must be positive"),
                             ({"to": "iris:2", "log_rate": 3}, "log rate"),
                             ({"to": "iris"}, "expected MODEL:VERSION"),
                             ({"plan": "fast"}, "malformed JSON body"),
                             ({"to": "iris:2", "steps": "1,10,100"}, "malformed JSON body")]:
            bad = await client.post("/endpoints/iris/rollout", json=body)
            assert bad.status_code == 400 and reason in bad.json()["error"], (body, bad.text)
        assert [type(e) for e in sink.events] == [TrafficPolicy]
        ok = await client.post("/endpoints/iris/rollout", json={
            "to": "iris:2", "plan": "blue-green", "interval": 45, "max_error_rate": 0.02,
            "max_latency_p99_ms": 80, "min_agreement": 0.9})
        assert ok.status_code == 202, ok.text
    cmd = sink.events[1]
    assert isinstance(cmd, RolloutStep) and cmd.command and cmd.command_id == ok.json()["command_id"]
    assert cmd.plan is not None and cmd.plan.name == "blue-green" and cmd.plan.interval_s == 45.0
    t = cmd.plan.thresholds
    assert (t.max_error_rate, t.max_latency_p99_ms, t.min_agreement) == (0.02, 80.0, 0.9)


async def test_promote_and_resume_reach_the_controller_and_status_shows_history(tmp_path: Path) -> None:
    """pause → resume → promote (the canary takes 100 %): each answered; GET rollout is `rollout status --json`."""
    client, sink, _ = api(tmp_path)
    async with client:
        await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        started = await client.post("/endpoints/iris/rollout", json={"to": "iris:2", "steps": [5, 50, 100]})
        assert started.status_code == 202
        for action in ("pause", "resume", "promote"):
            r = await client.post(f"/endpoints/iris/rollout/{action}")
            assert r.status_code == 202 and r.json()["action"] == action, r.text
        status = (await client.get("/endpoints/iris/rollout")).json()
    view = await sink.view("iris")
    assert view.rollout is not None
    assert status["rollout_id"] == started.json()["rollout_id"] and status["steps"] == [5.0, 50.0, 100.0]
    assert [h["action"] for h in status["history"]] == ["start", "pause", "resume", "promote", "complete"]
    assert status["phase"] == "completed" and status["weight"] == view.rollout.weight == 100.0
    assert {"last_analysis", "next_analysis_at", "summary", "plan", "phase"} <= status.keys()
    reasons = [e.reason for e in sink.events if isinstance(e, RolloutStep) and e.command]
    assert reasons == ["started through the API", "pause through the API", "resume through the API",
                       "promote through the API"]


async def test_put_keeps_shadows_and_bumps_the_revision(tmp_path: Path) -> None:
    """A new split keeps the endpoint's shadow relations; each write is revision + 1, in store and on the bus."""
    client, sink, store = api(tmp_path)
    async with client:
        await client.post("/endpoints/iris/shadows", json={"primary": "iris:1", "shadow": "iris:3"})
        await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        r = await client.put("/endpoints/iris/traffic", json={**routes(iris_1=50, iris_2=50), "sticky_key": None})
        assert r.status_code == 200 and r.json()["revision"] == 3 and r.json()["sticky_key"] is None
    stored = await TargetState(store).get_traffic("iris")
    assert stored == sink.events[-1] and stored is not None
    assert [(s.primary, s.shadow) for s in stored.shadows] == [("iris:1", "iris:3")]
    assert [p.revision for p in sink.events if isinstance(p, TrafficPolicy)] == [1, 2, 3]


async def test_shadow_body_forms(tmp_path: Path) -> None:
    """`end` (what GET answers) or `until`, epoch or text; null means no end; criteria as structs or `where`."""
    client, _sink, store = api(tmp_path)
    async with client:
        r = await client.post("/endpoints/wine/shadows", json={
            "primary": "wine", "shadow": "wine:2", "start": 1_900_000_000, "end": 1_900_003_600,
            "criteria": [{"field": "input:alcohol", "op": "ge", "value": 12}], "where": ["param:tier in gold,silver"]})
        assert r.status_code == 201, r.text
        r = await client.post("/endpoints/wine/shadows", json={"primary": "wine", "shadow": "wine:3", "until": None})
        assert r.status_code == 201, r.text
        r = await client.post("/endpoints/wine/shadows", json={"primary": "wine", "shadow": "wine:4", "end": "never"})
        assert r.status_code == 201, r.text
        for body, reason in [({"primary": "wine", "shadow": "wine:5", "end": "1d", "until": "2d"}, "not both"),
                             ({"primary": "wine", "shadow": "wine:5", "start": 10, "end": 5}, "not after the start"),
                             ({"primary": "wine", "shadow": "wine:5", "where": ["age>=18"]}, "FIELD OP VALUE"),
                             ({"primary": "wine", "shadow": "wine:5", "sample_rate": 1.5}, "rate"),
                             ({"primary": "wine", "shadow": "wine:5", "rate": 0.5}, "malformed JSON body")]:
            bad = await client.post("/endpoints/wine/shadows", json=body)
            assert bad.status_code == 400 and reason in bad.json()["error"], (body, bad.text)
        listed = {s["shadow"]: s for s in (await client.get("/endpoints/wine/shadows")).json()["shadows"]}
    first = listed["wine:2"]
    assert (first["start"], first["end"]) == (1_900_000_000, 1_900_003_600)
    assert first["criteria"] == [{"field": "input:alcohol", "op": "ge", "value": 12},
                                 {"field": "param:tier", "op": "in", "value": ["gold", "silver"]}]
    assert listed["wine:3"]["end"] is None and listed["wine:4"]["end"] is None
    stored = await TargetState(store).get_traffic("wine")
    assert stored is not None and stored.revision == 3 and len(stored.shadows) == 3


async def test_shadow_delete_by_primary(tmp_path: Path) -> None:
    """DELETE ?primary= removes one relation; without it, every primary the shadow follows."""
    client, sink, store = api(tmp_path)
    async with client:
        for primary in ("iris:1", "iris:2"):
            await client.post("/endpoints/iris/shadows", json={"primary": primary, "shadow": "iris:9"})
        assert (await client.delete("/endpoints/iris/shadows/iris:9?primary=iris:7")).status_code == 404
        one = await client.delete("/endpoints/iris/shadows/iris:9?primary=iris:1")
        assert one.status_code == 200 and [s["primary"] for s in one.json()["shadows"]] == ["iris:2"]
        await client.post("/endpoints/iris/shadows", json={"primary": "iris:1", "shadow": "iris:9"})
        every = await client.delete("/endpoints/iris/shadows/iris:9")
        assert every.status_code == 200 and every.json()["shadows"] == []
    stored = await TargetState(store).get_traffic("iris")
    assert stored is not None and stored.shadows == [] and stored == sink.events[-1]


async def test_concurrent_edits_get_distinct_revisions(tmp_path: Path) -> None:
    """Requests racing on one endpoint are serialized: every published policy has its own revision."""
    store, sink = seeded(tmp_path / "store"), TopicSink()

    async def slow_view(endpoint: str) -> EndpointView:
        await asyncio.sleep(0)  # a real read yields here; without the lock every request reads revision 0
        return await sink.view(endpoint)

    app = DeploymentApi(ApiConfig(api_token=None, max_upload_bytes=1 << 20), store, sink, TrackingView(),
                        routes={"endpoints": endpoint_routes(slow_view)})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        answers = await asyncio.gather(
            *(client.put("/endpoints/iris/traffic", json=routes(iris_1=100 - w, iris_2=w)) for w in range(0, 50, 10)),
            *(client.post("/endpoints/iris/shadows", json={"primary": "iris", "shadow": f"iris:{n}"})
              for n in (7, 8)))
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers]
    published = [p.revision for p in sink.events if isinstance(p, TrafficPolicy)]
    assert sorted(published) == list(range(1, 8)) == published
    stored = await TargetState(store).get_traffic("iris")
    assert stored is not None and stored.revision == 7 and {s.shadow for s in stored.shadows} == {"iris:7", "iris:8"}


class DownSink:
    async def publish(self, event: Event, *, event_id: str | None = None) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")


async def test_broker_unreachable_is_503_and_leaves_the_store_alone(tmp_path: Path) -> None:
    """No broker: reads of the traffic topic and publishes answer 503 with a reason; nothing is half-written."""
    store = seeded(tmp_path / "store")

    async def no_topic(endpoint: str) -> EndpointView:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")

    down = DeploymentApi(ApiConfig(api_token=None, max_upload_bytes=1 << 20), store, DownSink(), TrackingView(),
                         routes={"endpoints": endpoint_routes(no_topic)})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=down), base_url="http://ingest") as client:
        for method, path, body, reason in [
                ("PUT", "/endpoints/iris/traffic", routes(iris_1=100), "could not read the traffic topic"),
                ("GET", "/endpoints/iris/rollout", None, "could not read the traffic topic"),
                ("POST", "/endpoints/iris/rollout", {"to": "iris:2"}, "could not read the traffic topic"),
                ("POST", "/endpoints/iris/rollout/abort", None, "could not read the traffic topic"),
                ("POST", "/endpoints/iris/shadows", {"primary": "iris", "shadow": "iris:2"},
                 "could not publish the traffic policy")]:
            r = await client.request(method, path, json=body)
            assert r.status_code == 503 and reason in r.json()["error"], (method, path, r.text)
    assert await TargetState(store).traffic() == {}

    sink = TopicSink()
    sink.events.append(TrafficPolicy(endpoint="iris", routes=[], revision=1))
    half = DeploymentApi(ApiConfig(api_token=None, max_upload_bytes=1 << 20), store, DownSink(), TrackingView(),
                         routes={"endpoints": endpoint_routes(sink.view)})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=half), base_url="http://ingest") as client:
        r = await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        assert r.status_code == 503 and "could not publish the traffic policy" in r.json()["error"]
        sink.events.append(RolloutStep(endpoint="iris", rollout_id="r1", action="start", canary="iris:2",
                                       plan=make_plan("fast")))
        r = await client.post("/endpoints/iris/rollout/pause")
        assert r.status_code == 503 and "could not publish the rollout command" in r.json()["error"]
    assert await TargetState(store).traffic() == {}


async def test_every_endpoints_route_needs_the_token(tmp_path: Path) -> None:
    """With MODELCD_API_TOKEN set, reads and commands alike answer 401 without it (or with a wrong one)."""
    client, sink, _ = api(tmp_path, token="s3cret")
    async with client:
        for method, path in [("GET", "/endpoints"), ("GET", "/endpoints/iris/traffic"),
                             ("GET", "/endpoints/iris/shadows"), ("POST", "/endpoints/iris/shadows"),
                             ("DELETE", "/endpoints/iris/shadows/iris:2"), ("GET", "/endpoints/iris/rollout"),
                             ("POST", "/endpoints/iris/rollout"), ("POST", "/endpoints/iris/rollout/abort")]:
            for headers in ({}, {"authorization": "Bearer wrong"}):
                r = await client.request(method, path, headers=headers)
                assert r.status_code == 401 and "bearer token" in r.json()["error"], (method, path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer")
    assert sink.events == []


async def test_versions_that_do_not_serve_are_refused_everywhere(tmp_path: Path) -> None:
    """traffic set / rollout start / shadow add naming iris:9 (never deployed) are 409s naming what serves."""
    client, sink, store = api(tmp_path, serving=("iris:1", "iris:2"))
    async with client:
        r = await client.put("/endpoints/test/traffic", json=routes(iris_9=100))
        assert r.status_code == 409 and "route iris:9 is not deployed (serving versions of iris: 1, 2)" in r.text
        forced = await client.put("/endpoints/test/traffic", json={**routes(iris_9=100), "force": True})
        assert forced.status_code == 409 and "iris:9 is not deployed" in forced.text  # never forced
        assert (await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))).status_code == 200
        r = await client.post("/endpoints/iris/rollout", json={"to": "iris:9"})
        assert r.status_code == 409 and "canary iris:9 is not deployed" in r.text
        r = await client.post("/endpoints/iris/shadows", json={"primary": "iris", "shadow": "iris:9"})
        assert r.status_code == 409 and "shadow iris:9 is not deployed" in r.text
        r = await client.post("/endpoints/iris/shadows", json={"primary": "wine", "shadow": "iris:2"})
        assert r.status_code == 409 and "primary wine has no serving version" in r.text
    assert [type(e) for e in sink.events] == [TrafficPolicy]  # only the valid policy went out
    assert set(await TargetState(store).traffic()) == {"iris"}


async def test_endpoint_delete_is_refused_while_a_rollout_drives_it(tmp_path: Path) -> None:
    """DELETE /endpoints/{e}: 404 unknown, 409 naming the rollout while one runs, then a tombstone after abort."""
    client, sink, store = api(tmp_path)
    async with client:
        assert (await client.delete("/endpoints/iris")).status_code == 404
        await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        started = (await client.post("/endpoints/iris/rollout", json={"to": "iris:2"})).json()
        busy = await client.delete("/endpoints/iris")
        assert busy.status_code == 409
        assert f"rollout {started['rollout_id']} drives endpoint iris" in busy.text and "rollout abort iris" in busy.text
        await client.post("/endpoints/iris/rollout/abort")
        gone = await client.delete("/endpoints/iris")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert (await client.get("/endpoints/iris/traffic")).status_code == 404
    stored = await TargetState(store).get_traffic("iris")
    assert stored is not None and stored.deleted and stored == sink.events[-1]


async def test_retire_through_the_api_is_refused_while_in_use(tmp_path: Path) -> None:
    """DELETE /models/...: 409 naming the endpoint, rollout or shadow and what resolves it; ?force=true retires."""
    store, sink = seeded(tmp_path / "store"), TopicSink()

    async def traffic() -> list[object]:
        return list(sink.events)

    app = DeploymentApi(ApiConfig(api_token=None, max_upload_bytes=1 << 20), store, sink, TrackingView(),
                        routes={"endpoints": endpoint_routes(sink.view)}, traffic=traffic)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        await client.put("/endpoints/winep/traffic", json=routes(wine_1=100))
        await client.post("/endpoints/winep/shadows", json={"primary": "wine:1", "shadow": "wine:3"})
        await client.put("/endpoints/iris/traffic", json=routes(iris_1=100))
        await client.post("/endpoints/iris/rollout", json={"to": "iris:2"})
        for ref, said in [("wine/versions/1", ["serves 100% of endpoint winep", "modelcd traffic set winep"]),
                          ("wine/versions/3", ["shadows wine:1 on endpoint winep",
                                               "modelcd shadow remove wine:1 wine:3 --endpoint winep"]),
                          ("iris/versions/2", ["in progress on endpoint iris", "modelcd rollout abort iris"])]:
            r = await client.delete(f"/models/{ref}")
            assert r.status_code == 409, r.text
            assert all(s in r.json()["error"] for s in said) and "?force=true" in r.json()["error"], r.text
            name, _, version = ref.partition("/versions/")
            assert f"`modelcd retire {name} {version} --force`" in r.json()["error"], r.text  # a command that runs
        assert not [e for e in sink.events if type(e).__name__ == "RetireRequested"]
        free = await client.delete("/models/wine/versions/2")
        assert free.status_code == 202
        forced = await client.delete("/models/wine/versions/1?force=true")
        assert forced.status_code == 202
        bad = await client.request("DELETE", "/models/wine/versions/3", content=b'{"force": "yes"}')
        assert bad.status_code == 400 and "malformed JSON body" in bad.text
        body = await client.request("DELETE", "/models/wine/versions/3", json={"force": True, "reason": "leaks"})
        assert body.status_code == 202
    retires = [e for e in sink.events if type(e).__name__ == "RetireRequested"]
    assert [(e.version, e.force) for e in retires] == [("2", False), ("1", True), ("3", True)]  # type: ignore[attr-defined]
    assert "forced: it serves 100% of endpoint winep" in retires[1].reason  # type: ignore[attr-defined]
    assert retires[2].reason == "leaks (forced: it shadows wine:1 on endpoint winep)"  # type: ignore[attr-defined]


async def test_endpoint_names_that_cannot_be_keys_are_a_400(tmp_path: Path) -> None:
    """An endpoint named with a NUL, a backslash, '..', a space, 5,000 characters: a 400 naming the rule, not a 500
    or a store error, on every route; nothing is written."""
    client, sink, store = api(tmp_path)
    async with client:
        for name in ("a%00b", "a%5Cb", "%2e%2e", "%20", "x" * 5000, "caf%C3%A9", "-x"):
            for method, path, body in (("PUT", "traffic", routes(iris_1=100)), ("GET", "traffic", None),
                                       ("POST", "shadows", {"primary": "iris", "shadow": "iris:2"}),
                                       ("POST", "rollout", {"to": "iris:2"})):
                r = await client.request(method, f"/endpoints/{name}/{path}", json=body)
                assert r.status_code == 400 and "endpoint name" in r.json()["error"], (name[:20], method, r.text)
        assert (await client.put("/endpoints/fraud-ep.v2/traffic", json=routes(iris_1=100))).status_code == 200
    assert list(await TargetState(store).traffic()) == ["fraud-ep.v2"]
    assert [e.endpoint for e in sink.events] == ["fraud-ep.v2"]


async def test_retire_of_a_name_no_package_can_have_is_a_404(tmp_path: Path) -> None:
    """DELETE /models/{name}/versions/{version} with a NUL, '..', a backslash or 5,000 characters: 404, not a 500/503."""
    client, sink, _store = api(tmp_path)
    async with client:
        for name, version in (("a%00b", "1"), ("iris", "1%00"), ("%2e%2e", "%2e%2e"), ("a%5Cb", "1"), ("iris", "x" * 5000)):
            r = await client.delete(f"/models/{name}/versions/{version}")
            assert r.status_code == 404 and "no model" in r.json()["error"], (name, version[:20], r.text)
    assert sink.events == []
