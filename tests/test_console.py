"""The console without a browser: sessions, the API's token check, the sign-in flow, the rendering of each
section from events, the SVG plot, and the server-sent-event fan-out with its bounded per-browser queues."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcd.console import render
from modelcd.console.api import STATIC, ConsoleRoutes
from modelcd.console.fanout import PING, Hub, frame
from modelcd.console.figures import model_rows
from modelcd.console.state import ConsoleState
from modelcd.events.schemas import (
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentProgress,
    LoadedModel,
    ModelHealth,
    ModelState,
    NodeStatus,
    RolloutPlan,
    RolloutStep,
    Route,
    ShadowComparison,
    ShadowRelation,
    TrafficPolicy,
    UsageReport,
)
from modelcd.ingest import session
from modelcd.ingest.api import ApiConfig, DeploymentApi
from modelcd.ingest.tracking import TrackingView
from modelcd.retirement import policy as retirement
from modelcd.store.blobs import LocalStore

from ._release import built_wheel  # noqa: F401 - a fixture

TOKEN = "t0ken-for-tests"
NOW = 1_800_000_000.0
VIEW = render.View(warn_share=0.8, heartbeat_s=5.0)


# --- sessions and the API's token check -------------------------------------------------------------


def test_session_values_are_signed_expire_and_die_with_the_token() -> None:
    """A session is valid only with the token that issued it, until it expires, and not when tampered with."""
    value = session.issue(TOKEN, NOW, ttl=60)
    assert session.valid(TOKEN, value, NOW + 59)
    assert not session.valid(TOKEN, value, NOW + 61)
    assert not session.valid("another-token", value, NOW)
    expires, mac = value.split(".")
    assert not session.valid(TOKEN, f"{int(expires) + 3600}.{mac}", NOW)  # a later expiry is not signed
    assert not session.valid(TOKEN, f"{expires}.{'0' * len(mac)}", NOW)
    for junk in ("", ".", "abc.def", "1" * 40 + ".x", value + "x"):
        assert not session.valid(TOKEN, junk, NOW)
    assert session.from_cookie_header(f"a=1; {session.COOKIE}={value}; b=2".encode()) == value
    assert session.from_cookie_header(b"a=1") is None and session.from_cookie_header(None) is None
    assert session.token_matches(TOKEN, TOKEN) and not session.token_matches(TOKEN[:-1], TOKEN)


def deployment_api(tmp_path: Path, token: str | None, routes: dict[str, Any] | None = None) -> httpx.AsyncClient:
    app = DeploymentApi(ApiConfig(api_token=token, max_upload_bytes=1 << 20), LocalStore(tmp_path / "store"),
                        _NoSink(), TrackingView(), routes=routes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest")


class _NoSink:
    async def publish(self, event: Any, *, event_id: str | None = None) -> None:
        raise AssertionError("nothing is published in these tests")


async def test_api_accepts_a_live_session_cookie_beside_the_bearer_token(tmp_path: Path) -> None:
    """The console's cookie opens the API like the bearer token; a forged, expired or foreign one does not."""
    async with deployment_api(tmp_path, TOKEN) as client:
        assert (await client.get("/models")).status_code == 401
        assert (await client.get("/models", headers={"authorization": f"Bearer {TOKEN}"})).status_code == 200
        good = session.issue(TOKEN, time.time())
        assert (await client.get("/models", headers={"cookie": f"{session.COOKIE}={good}"})).status_code == 200
        for bad in (session.issue(TOKEN, time.time() - 2 * session.TTL_S), session.issue("other", time.time()),
                    good[:-1] + ("0" if good[-1] != "0" else "1")):
            r = await client.get("/models", headers={"cookie": f"{session.COOKIE}={bad}"})
            assert r.status_code == 401, bad
        assert (await client.get("/models", headers={"authorization": "Bearer wrong"})).status_code == 401


def console_client(tmp_path: Path, token: str | None) -> tuple[httpx.AsyncClient, ConsoleRoutes]:
    routes = ConsoleRoutes(token=token, view=render.View(login_required=token is not None), cfg=None)
    client = deployment_api(tmp_path, token, {"console": lambda targets, sink: routes})
    return client, routes


async def test_sign_in_sets_a_strict_httponly_cookie_and_a_wrong_token_is_refused(tmp_path: Path) -> None:
    """Without a session the page sends to the form and the stream answers 401; a wrong token gets 401 and no
    cookie; the right one gets an HttpOnly, SameSite=Strict cookie that opens the page."""
    client, _routes = console_client(tmp_path, TOKEN)
    async with client:
        r = await client.get("/console")
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert (await client.get("/console/events")).status_code == 401
        form = await client.get("/console/login")
        assert form.status_code == 200 and '<label for="token">' in form.text
        r = await client.post("/console/login", data={"token": "wrong"})
        assert r.status_code == 401 and "Wrong token" in r.text and "set-cookie" not in r.headers
        r = await client.post("/console/login", data={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/console"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        value = re.match(rf"{session.COOKIE}=([^;]+)", cookie).group(1)  # type: ignore[union-attr]
        page = await client.get("/console", headers={"cookie": f"{session.COOKIE}={value}"})
        assert page.status_code == 200 and "<h1>modelcd console</h1>" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        r = await client.post("/console/logout")
        assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
        assert (await client.post("/console/login", content=b"token=" + b"x" * 10_000,
                                  headers={"content-type": "application/x-www-form-urlencoded"})).status_code == 413
        assert (await client.delete("/console")).status_code == 405
        assert (await client.get("/console/static/console.js")).status_code == 200
        assert (await client.get("/console/static/../api.py")).status_code == 404


async def test_without_a_token_the_console_is_open(tmp_path: Path) -> None:
    """No MODELCD_API_TOKEN: the page answers directly, no sign-in, no sign-out button."""
    client, _routes = console_client(tmp_path, None)
    async with client:
        r = await client.get("/console")
        assert r.status_code == 200 and "Sign out" not in r.text
        assert (await client.get("/console/login")).status_code == 303


# --- rendering from events ------------------------------------------------------------------------


def folded(*events: Any) -> ConsoleState:
    state = ConsoleState()
    state.apply_all(events)
    return state


def test_deployments_show_steps_with_durations_failures_and_nodes() -> None:
    """Each deployment's steps in order with durations; a failure names its step and reason (escaped)."""
    state = folded(
        DeploymentProgress(deployment_id="d1", model="iris", version="1", step="validate", status="succeeded",
                           duration_ms=12.0, at=NOW - 5),
        DeploymentProgress(deployment_id="d1", model="iris", version="1", step="compile", status="succeeded",
                           duration_ms=1500.0, at=NOW - 4),
        DeploymentCompleted(deployment_id="d1", model="iris", version="1", sha256="s", at=NOW - 3),
        NodeStatus(node="n1", ready=True, models=[LoadedModel(name="iris", version="1", sha256="s")], at=NOW),
        DeploymentFailed(deployment_id="d2", model="bad", version="1", step="validate",
                         reason="manifest <script>alert(1)</script> lacks expiry", at=NOW - 1),
    )
    html = render.deployments(state, NOW, VIEW)
    assert html.index('data-deployment="d2"') < html.index('data-deployment="d1"')  # newest first
    assert re.search(r'data-step="validate" data-status="succeeded">.*?12 ms', html)
    assert re.search(r'data-step="compile" data-status="succeeded">.*?1\.5 s', html)
    assert "Nodes serving: n1" in html
    assert "Failed at validate:" in html and "<script>" not in html and "&lt;script&gt;" in html


def test_model_rows_figures_come_from_events_or_say_they_are_missing() -> None:
    """Rate, error rate, memory, p99 and retirement times are computed from events; what no event carries is
    'not in any event', never a number."""
    deployed = NOW - 1000
    state = folded(
        ModelState(name="iris", version="1", target="serving", owner="ann", expiry_seconds=10_000,
                   deployed_at=deployed, runtime="onnx"),
        ModelState(name="wine", version="3", target="serving", expiry_seconds=0, deployed_at=deployed),
        UsageReport(model="iris", version="1", node="n1", interval_start=NOW - 40, interval_end=NOW - 30, count=90,
                    errors=9, last_used=NOW - 31),
        UsageReport(model="iris", version="1", node="n2", interval_start=NOW - 200, interval_end=NOW - 190,
                    count=10, errors=1, last_used=NOW - 191),
        NodeStatus(node="n1", ready=True, models=[LoadedModel(name="iris", version="1", sha256="s",
                                                              memory_bytes=3 << 20)], at=NOW),
        ModelHealth(node="n1", model="iris", version="1", ok=True, latency_ms=4.0, at=NOW),
    )
    rows = {r.key: r for r in model_rows(state, NOW, 0.8)}
    iris, wine = rows["iris:1"], rows["wine:3"]
    assert iris.requests_per_min == 90 and iris.error_rate == pytest.approx(10 / 100)
    assert iris.memory_bytes == 3 << 20 and iris.nodes == ["n1"] and iris.p99 is None
    record = retirement.on_usage(retirement.on_state(None, state.models["iris:1"]), state.usage["iris:1"][0])
    assert iris.retire_in_s == pytest.approx(record.retire_at - NOW)
    assert iris.warn_in_s == pytest.approx(record.warn_at(0.8) - NOW)
    assert wine.requests_per_min is None and wine.memory_bytes is None and wine.retire_in_s is None
    html = render.models(state, NOW, VIEW)
    row = re.search(r'<tr data-model="iris:1">.*?</tr>', html).group(0)  # type: ignore[union-attr]
    assert "not in any event" in row and "10.00%" in row and "3.0 MiB" in row and "n1: ok 4 ms" in row
    wine_row = re.search(r'<tr data-model="wine:3">.*?</tr>', html).group(0)  # type: ignore[union-attr]
    assert wine_row.count("not in any event") == 2 and "no expiry" in wine_row


def test_p99_and_protections_when_events_carry_them() -> None:
    """A shadow comparison's p99 is shown with its source; traffic, shadows and pins are retirement's reasons."""
    state = folded(
        ModelState(name="iris", version="1", target="serving", expiry_seconds=100, pinned=True, deployed_at=NOW),
        ModelState(name="iris", version="2", target="serving", expiry_seconds=100, deployed_at=NOW),
        TrafficPolicy(endpoint="web", routes=[Route(model="iris", version="1", weight=100.0)],
                      shadows=[ShadowRelation(primary="iris", shadow="iris:2")]),
        ShadowComparison(primary="iris:1", shadow="iris:2", window_start=NOW - 60, window_end=NOW, count=50,
                         agreement=0.96, primary_latency_ms={"p50": 1.0, "p99": 7.5},
                         shadow_latency_ms={"p50": 2.0, "p99": 9.25}),
    )
    rows = {r.key: r for r in model_rows(state, NOW, 0.8)}
    assert rows["iris:1"].p99 is not None and rows["iris:1"].p99.p99_ms == 7.5
    assert "shadow comparison" in rows["iris:1"].p99.source
    assert rows["iris:2"].p99 is not None and rows["iris:2"].p99.p99_ms == 9.25
    assert rows["iris:1"].protections == ["pinned by its owner", "serves 100% of endpoint web"]
    assert rows["iris:2"].protections == ["shadows iris on endpoint web"]
    assert rows["iris:1"].retire_in_s is None  # kept: never warned, never retired


def rollout_events(*, paused: bool = False) -> list[Any]:
    plan = RolloutPlan(name="standard", steps=[10.0, 50.0, 100.0], interval_s=60.0)
    events: list[Any] = [
        TrafficPolicy(endpoint="web", routes=[Route(model="iris", version="1", weight=90.0),
                                              Route(model="iris", version="2", weight=10.0)], revision=2),
        RolloutStep(endpoint="web", rollout_id="r1", action="start", canary="iris:2", baseline="iris:1", weight=10.0,
                    plan=plan, at=NOW - 30, command_id="c1"),
        RolloutStep(endpoint="web", rollout_id="r1", action="hold", canary="iris:2", baseline="iris:1", weight=10.0,
                    at=NOW - 10, reason="error_rate inconclusive", evidence={
                        "verdict": "hold", "canary": {"requests": 20, "errors": 0, "latency_p99_ms": 12.5},
                        "checks": [{"name": "error_rate", "status": "inconclusive", "n": 20, "value": 0.0,
                                    "low": 0.0, "high": 0.16, "bound": 0.05, "detail": "20 requests, need 50"}]}),
    ]
    if paused:
        events.append(RolloutStep(endpoint="web", rollout_id="r1", action="pause", canary="iris:2", weight=10.0,
                                  at=NOW - 5, command_id="c2"))
    return events


def test_endpoints_show_the_split_the_step_the_analysis_and_the_right_buttons() -> None:
    """The split bar has one segment per route with its weight (and says it in words); the last analysis shows
    each check's value, interval and bound; only the actions the phase allows are enabled."""
    html = render.endpoints(folded(*rollout_events()), NOW, VIEW)
    assert 'aria-label="traffic split of web: iris:1 90%, iris:2 10%"' in html
    assert re.search(r'class="seg c0" style="width:90.0000%" data-ref="iris:1" data-weight="90"', html)
    assert 'data-ref="iris:2" data-weight="10"' in html
    assert "step 1 of 3" in html and "next analysis in 50 s" in html
    assert "[0, 0.16]" in html and "20 requests, need 50" in html and "latency p99 ms 12.5" in html
    assert re.search(r'data-action="pause">', html) and re.search(r'data-action="resume" disabled>', html)
    paused = render.endpoints(folded(*rollout_events(paused=True)), NOW, VIEW)
    assert 'data-phase="paused"' in paused
    assert re.search(r'data-action="pause" disabled>', paused) and re.search(r'data-action="resume">', paused)
    # p99 of the canary comes from the rollout analysis
    state = folded(ModelState(name="iris", version="2", target="serving"), *rollout_events())
    row = {r.key: r for r in model_rows(state, NOW, 0.8)}["iris:2"]
    assert row.p99 is not None and row.p99.p99_ms == 12.5 and "rollout analysis on web" in row.p99.source


def test_pending_commands_are_shown_until_the_controller_answers() -> None:
    """A command on the topic without a fact carrying its id is 'sent, not yet answered'."""
    cmd = RolloutStep(endpoint="web", rollout_id="r1", action="pause", canary="iris:2", command=True,
                      command_id="c2", at=NOW - 2)
    state = folded(*rollout_events(), cmd)
    assert [c.command_id for c in state.pending_commands("web")] == ["c2"]
    assert "not yet answered by the controller: pause" in render.endpoints(state, NOW, VIEW)
    state.apply(RolloutStep(endpoint="web", rollout_id="r1", action="pause", canary="iris:2", command_id="c2",
                            at=NOW - 1))
    assert state.pending_commands("web") == []


def test_shadows_plot_agreement_with_gaps_shaded() -> None:
    """Each pair gets an SVG of agreement per window; time with no window is shaded; latencies of both sides."""
    windows = [ShadowComparison(primary="iris:1", shadow="iris:2", window_start=NOW - 600 + 60 * i,
                                window_end=NOW - 540 + 60 * i, count=100, agreement=0.9 + i / 100,
                                primary_latency_ms={"p50": 1.0, "p90": 2.0, "p99": 3.0},
                                shadow_latency_ms={"p50": 1.5, "p90": 2.5, "p99": 4.0})
               for i in (0, 1, 2, 6, 7)]  # windows 3..5 are missing: one gap
    html = render.shadows(folded(*windows), NOW, VIEW)
    assert html.count('<rect class="gap"') == 1 and html.count("<polyline") == 2
    assert "5 windows" in html and "1 period(s) without comparisons" in html
    assert "<title id=\"plot-0-t\">iris:1 vs iris:2: agreement" in html
    assert "4.00 ms" in html and "3.00 ms" in html


def test_fleet_shows_nodes_memory_silence_and_failed_models() -> None:
    """Nodes with their models and memory; a node silent for 3 heartbeats is flagged; failed models listed."""
    state = folded(
        NodeStatus(node="n1", ready=True, memory_bytes=1 << 20, memory_budget=1 << 30, at=NOW - 1, models=[
            LoadedModel(name="iris", version="1", sha256="s", memory_bytes=1 << 20),
            LoadedModel(name="bomb", version="1", sha256="b", state="failed", error="worker died 3 times",
                        quarantined=True, restarts=3),
            LoadedModel(name="broken", version="2", sha256="c", state="failed", error="no such file")]),
        NodeStatus(node="n2", ready=True, at=NOW - 60),
    )
    html = render.fleet(state, NOW, VIEW)
    n1 = re.search(r'<tr data-node="n1">.*?</tr>', html).group(0)  # type: ignore[union-attr]
    n2 = re.search(r'<tr data-node="n2">.*?</tr>', html).group(0)  # type: ignore[union-attr]
    assert "ready" in n1 and "1.0 MiB of 1.0 GiB" in n1 and "worker died 3 times" in n1 and "3 worker restart" in n1
    assert "bomb:1 (quarantined), broken:2 (failed to load)" in n1
    assert "silent" in n2


# --- fan-out --------------------------------------------------------------------------------------


async def test_slow_browser_drops_are_counted_and_it_converges_on_the_latest() -> None:
    """A full queue drops (and counts) frames for that browser only; once it drains it gets the latest rendering
    of what it missed; other browsers get every frame; close ends every stream."""
    hub = Hub(maxsize=2)
    slow, fast = hub.connect(), hub.connect()
    received: list[bytes] = []
    for i in range(5):
        hub.publish("models", frame("models", f"v{i}"))
        received.append(await hub.next(fast, 1.0))  # type: ignore[arg-type]
    assert received == [frame("models", f"v{i}") for i in range(5)]
    assert slow.dropped == 3 and hub.dropped == 3 and fast.dropped == 0
    got = [await hub.next(slow, 1.0) for _ in range(3)]
    assert got == [frame("models", "v0"), frame("models", "v1"), frame("models", "v4")]
    assert await hub.next(slow, 0.01) == PING  # nothing left: a keep-alive comment
    hub.close()
    assert await hub.next(slow, 1.0) is None and await hub.next(fast, 1.0) is None
    assert await hub.next(hub.connect(), 1.0) is None  # connecting after close ends at once


class Browser:
    """Drives the console's ASGI stream by hand (httpx buffers whole responses), recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.more = asyncio.Event()
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.more.set()

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    async def wait_for(self, needle: bytes) -> None:
        async with asyncio.timeout(10):
            while needle not in self.body():
                self.more.clear()
                await self.more.wait()


async def test_stream_sends_a_snapshot_then_each_change_once_and_ends_on_drain() -> None:
    """A browser first gets every section, then the re-rendered section when an event changes it; cancelling the
    console's background work ends the stream (the service drains without waiting on it)."""
    routes = ConsoleRoutes(token=None, view=VIEW, cfg=None)
    runner = asyncio.create_task(routes.run())
    browser = Browser()
    scope = {"type": "http", "method": "GET", "path": "/console/events", "headers": []}
    stream = asyncio.create_task(routes.asgi(scope, browser.receive, browser.send, authorized=True))
    await browser.wait_for(b'"id":"fleet"')
    assert browser.sent[0]["status"] == 200
    assert dict(browser.sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    for section in (b"deployments", b"models", b"endpoints", b"shadows", b"fleet", b"status"):
        assert b'"id":"' + section + b'"' in browser.body()
    routes.changed(routes.state.apply(NodeStatus(node="n-live", ready=True, at=time.time())))
    await browser.wait_for(b"n-live")
    await asyncio.sleep(0.5)  # more than the coalescing window: a second copy would have been sent by now
    assert browser.body().count(b'data-node=\\"n-live\\"') == 1  # the fleet section, sent once for the change
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    async with asyncio.timeout(10):
        await stream
    assert browser.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert not routes.hub.clients


async def test_stream_stops_when_the_browser_leaves() -> None:
    """A closed tab disconnects its client from the hub."""
    routes = ConsoleRoutes(token=None, view=VIEW, cfg=None)
    browser = Browser()
    scope = {"type": "http", "method": "GET", "path": "/console/events", "headers": []}
    stream = asyncio.create_task(routes.asgi(scope, browser.receive, browser.send, authorized=True))
    await browser.wait_for(b'"id":"fleet"')
    assert len(routes.hub.clients) == 1
    browser.gone.set()
    async with asyncio.timeout(10):
        await stream
    assert not routes.hub.clients


# --- the release --------------------------------------------------------------------------------------


def test_wheel_holds_the_console_static_files(built_wheel: Path) -> None:  # noqa: F811
    """console.css and console.js ship in the wheel (package data), so an installed API serves its console."""
    import zipfile

    names = set(zipfile.ZipFile(built_wheel).namelist())
    for name in STATIC:
        assert f"modelcd/console/static/{name}" in names, f"{name} is missing from the wheel"
