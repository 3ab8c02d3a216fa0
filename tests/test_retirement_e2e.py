"""Auto-retirement, the whole path on a real broker, from the deployment API to a running node.

Two models are deployed through ingest's HTTP API (upload, validation, serving validation,
publish) with an owner-set expiry of a few seconds in their manifests; a serving node
loads both and reports usage every half second; the retirement worker checks every half
second. One model is kept busy with predictions, the other is never called. The unused
one must be warned exactly once, then decided for retirement, retired by ingest
(`RetireRequested` → retired target state → `ModelState(target="retired")`) and unloaded
by the running node, which then answers 404 for it and stops listing it in its
heartbeats; the busy one gets nothing from the retirement processor and keeps serving.

Only events and HTTP answers are asserted; timeouts are generous bounds for waiting.
tests/test_retirement_unload.py covers the retirement → ingest → node leg with models
written straight into the store; this test adds the real deployment path and the HTTP
and heartbeat views of the result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import (
    DeploymentCompleted,
    NodeStatus,
    RetirementDecision,
    RetirementWarning,
    RetireRequested,
)
from modelcd.events.topics import DEPLOY_REQUESTS, HEALTH, RETIREMENT
from modelcd.retirement.service import RetirementProcessor
from modelcd.runtimes.build import build_package
from modelcd.settings import Settings
from modelcd.store.package import BuiltPackage

from ._ingest import running_ingest
from ._serving import _iris, eventually, running_node
from ._watch import BusWatcher

EXPIRY_S = 8  # the owner-set expiry in both manifests: warned after 4 s unused, retired after 8 s
WAIT = 60.0  # a bound for waiting on a shared machine, never a measurement
NODE = "e2e-node"


def e2e_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    return Settings(kafka_bootstrap=broker.bootstrap, kafka_idempotence=False, home=tmp_path / "home",
                    store_url=str(tmp_path / "store"), ingest_port=free_port(), serving_host="127.0.0.1",
                    log_format="console", compile_onnx=False,
                    # A node reports usage every MODELCD_USAGE_INTERVAL (10 s by default) and its loaded
                    # models every heartbeat: both short, so the processor and the test hear of them soon.
                    usage_interval=0.5, heartbeat_interval=0.5, reconcile_interval=30.0, health_interval=60.0,
                    retirement_check_interval=0.5, retirement_warn_share=0.5)


def short_lived_package(name: str, depth: int) -> BuiltPackage:
    """A decision tree on iris whose manifest says: retire me after EXPIRY_S seconds unused."""
    from sklearn.tree import DecisionTreeClassifier

    x, y = _iris()
    model = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(x, y)
    return build_package(model, name=name, version="1", owner="e2e-owner", expiry=EXPIRY_S,
                         sample_inputs={"input": x[:5]})


def statuses(bus: BusWatcher) -> list[NodeStatus]:
    return [e for e in bus.events if isinstance(e, NodeStatus) and e.node == NODE]


def lists(status: NodeStatus, key: str) -> bool:
    return any(f"{m.name}:{m.version}" == key and m.state == "ready" for m in status.models)


@pytest.mark.slow
async def test_unused_model_is_warned_retired_and_unloaded_through_the_whole_path(broker: EmbeddedBroker,
                                                                                 tmp_path: Path) -> None:
    settings = e2e_settings(broker, tmp_path)
    async with BusWatcher(broker.bootstrap, RETIREMENT, DEPLOY_REQUESTS, HEALTH) as bus, running_ingest(settings) as ingest, \
            RetirementProcessor(settings) as proc, running_node(settings, node_id=NODE) as node, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}", timeout=30.0) as api:

        async def deploy(built: BuiltPackage) -> None:
            r = await api.post("/deployments", content=built.data, headers={"content-type": "application/x-tar"})
            assert r.status_code == 202, r.text
            outcome = await ingest.outcome(r.json()["deployment_id"], timeout=WAIT)
            assert isinstance(outcome, DeploymentCompleted), outcome

        async def ready(name: str) -> int:
            return (await node.client.get(f"/v2/models/{name}/versions/1/ready")).status_code

        # "busy" is called from before it exists (404s, which count as nobody's use) until the end.
        answers: list[int] = []

        async def keep_busy() -> None:
            while True:
                answers.append((await node.infer("busy")).status_code)
                await asyncio.sleep(0.1)

        busy = asyncio.create_task(keep_busy())
        try:
            await deploy(short_lived_package("busy", depth=3))
            await deploy(short_lived_package("idle", depth=2))
            (idle_state,) = ingest.states_of("idle")
            assert idle_state.expiry_seconds == EXPIRY_S and idle_state.owner == "e2e-owner"
            await eventually(lambda: 200 in answers, timeout=WAIT, what="busy:1 answering")
            await eventually(lambda: _eq(ready("idle"), 200), timeout=WAIT, what="idle:1 ready on the node")
            await eventually(lambda: any(lists(s, "idle:1") for s in statuses(bus)), timeout=WAIT,
                             what="a heartbeat listing idle:1")
            listed_at = next(i for i, s in enumerate(statuses(bus)) if lists(s, "idle:1"))

            # Nothing more is done to "idle": the processor, ingest and the node take it from here.
            await ingest.wait_for(lambda: any(s.target == "retired" for s in ingest.states_of("idle")), timeout=WAIT)
            await eventually(lambda: _eq(ready("idle"), 404), timeout=WAIT, what="idle:1 unknown to the node")
            await eventually(lambda: any(not lists(s, "idle:1") and lists(s, "busy:1")
                                         for s in statuses(bus)[listed_at + 1:]),
                             timeout=WAIT, what="a heartbeat without idle:1")
            served_before = answers.count(200)
            await eventually(lambda: answers.count(200) >= served_before + 5, timeout=WAIT,
                             what="busy:1 still answering after idle:1 was unloaded")
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)

        # The node: "idle" is gone (HTTP and registry), "busy" never failed once it was loaded.
        r = await node.infer("idle")
        assert r.status_code == 404, r.text
        assert await ready("idle") == 404
        assert "idle:1" not in node.registry.loaded_keys()
        assert set(answers[answers.index(200):]) == {200}, answers
        assert (await node.infer("busy")).status_code == 200
        assert await ready("busy") == 200

        # Ingest: the target state says so, and the deployment API shows it.
        idle = await model_view(api, "idle")
        assert idle["state"] == "retired" and "auto-retired" in idle["reason"], idle
        assert (await model_view(api, "busy"))["state"] == "serving"
        await eventually(lambda: _nodes_serving(api, "busy", 1), timeout=WAIT, what="the node counted as serving busy:1")

        # The bus: exactly one warning, then the decision (one partition of modelcd.retirement, keyed by
        # model), and the one request ingest acted on, published after the decision; nothing for "busy".
        await eventually(lambda: bool(bus.about("idle", RetirementDecision)) and bool(bus.about("idle", RetireRequested)),
                         timeout=WAIT, what="the decision and the request read back from the bus")
        kinds = [type(e) for e in bus.about("idle", RetirementWarning, RetirementDecision)]
        assert kinds == [RetirementWarning, RetirementDecision], kinds
        warning, decision = bus.about("idle", RetirementWarning, RetirementDecision)
        (request,) = bus.about("idle", RetireRequested)
        assert isinstance(warning, RetirementWarning) and warning.owner == "e2e-owner" and warning.version == "1"
        assert isinstance(decision, RetirementDecision) and decision.action == "retire"
        assert isinstance(request, RetireRequested) and request.requested_by == "retirement"
        assert bus.stamps[id(decision)] <= bus.stamps[id(request)]
        assert bus.about("busy", RetirementWarning, RetirementDecision, RetireRequested) == []
        states = [(s.target, s.deployment_id) for s in ingest.states_of("idle")]
        assert [t for t, _ in states] == ["serving", "retired"], states
        assert proc.stats.errors == 0 and proc.stats.undecodable == 0
        assert proc.stats.warnings == 1 and proc.stats.retirements == 1 and proc.stats.cancels == 0


async def _eq(answer: Awaitable[int], expected: int) -> bool:
    return await answer == expected


async def model_view(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """Version 1 of `name` as `GET /models/{name}` shows it."""
    r = await api.get(f"/models/{name}")
    assert r.status_code == 200, r.text
    (v1,) = [v for v in r.json()["versions"] if v["version"] == "1"]
    return v1  # type: ignore[no-any-return]


async def _nodes_serving(api: httpx.AsyncClient, name: str, expected: int) -> bool:
    return (await model_view(api, name))["nodes_serving"] == expected
