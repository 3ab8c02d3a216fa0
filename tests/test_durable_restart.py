"""Durable state: a restart whose broker comes back empty (the embedded broker keeps topics in memory) loses no
view. Deployments, models, traffic policies with their revisions, shadows and rollouts with their history read
the same before and after, through the CLI and the API; the next `traffic set` carries on from the stored
revision; a redeploy's "already serving (deployment X)" names an X the API still knows."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.rollout.service import run_controller
from modelcd.settings import Settings

from ._ingest import iris_package, running_ingest, settings_for
from .test_ingest_e2e import run_cli


@asynccontextmanager
async def services(settings: Settings) -> AsyncIterator[None]:
    """Ingest (API with /endpoints) and the rollout controller, as `modelcd up` runs them, until the block exits."""
    stop, ready = asyncio.Event(), asyncio.Event()
    async with running_ingest(settings), asyncio.TaskGroup() as tg:
        controller = tg.create_task(run_controller(settings, stop=stop, ready=ready))
        async with asyncio.timeout(60):
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({controller, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if controller.done():
                controller.result()
        try:
            yield
        finally:
            stop.set()


def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_INGEST_URL=f"http://127.0.0.1:{settings.ingest_port}", MODELCD_KAFKA_BOOTSTRAP=settings.bootstrap,
               MODELCD_KAFKA_IDEMPOTENCE="false", MODELCD_STORE_URL=str(settings.resolved_store_url),
               MODELCD_HOME=str(settings.home))
    return env


async def deploy(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    resp = await client.post("/deployments", content=data, headers={"content-type": "application/x-tar"})
    assert resp.status_code == 202, resp.text
    deployment_id = resp.json()["deployment_id"]
    async with asyncio.timeout(90):
        while True:
            view = (await client.get(f"/deployments/{deployment_id}", params={"after": "-1", "wait": "5"})).json()
            if view.get("status") in ("completed", "failed"):
                return dict(view)
            await asyncio.sleep(0.1)


def deployment_fields(view: dict[str, Any]) -> dict[str, Any]:
    """What a deployment view says, without the revision of the process answering it."""
    keep = ("deployment_id", "model", "version", "status", "reason", "failed_step", "sha256", "runtime", "noop",
            "existing_deployment_id", "nodes_serving")
    return {**{k: view.get(k) for k in keep},
            "steps": [(s["step"], s["status"], s["detail"]) for s in view.get("steps", [])]}


async def views(settings: Settings, deployment_ids: list[str]) -> dict[str, Any]:
    """Every view of the state, from the API and from the CLI."""
    env = cli_env(settings)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}", timeout=30) as client:
        api = {
            "models": (await client.get("/models")).json(),
            "deployments": [deployment_fields((await client.get(f"/deployments/{d}")).json())
                            for d in deployment_ids],
            "traffic": (await client.get("/endpoints/iris/traffic")).json(),
            "shadow traffic": (await client.get("/endpoints/iris-shadow/traffic")).json(),
            "shadows": (await client.get("/endpoints/iris-shadow/shadows")).json(),
            "rollout": (await client.get("/endpoints/iris/rollout")).json(),
        }
    results = await asyncio.gather(
        run_cli(env, "traffic", "show", "iris", "--json"),
        run_cli(env, "rollout", "status", "iris", "--json"),
        run_cli(env, "models"),
        *(run_cli(env, "deployments", d) for d in deployment_ids))
    for code, _out, err in results:
        assert code == 0, err
    (_, traffic, _), (_, rollout, _), (_, models, _), *deployments = results
    cli = {"traffic": json.loads(traffic), "rollout": json.loads(rollout), "models": models,
           "deployments": [out for _code, out, _err in deployments]}
    return {"api": api, "cli": cli}


@pytest.mark.faults
async def test_restart_with_an_empty_broker_keeps_every_view(tmp_path: Path) -> None:
    """Deploy two versions, set traffic, add a shadow, start a rollout; stop everything, restart with a broker
    that lost its topics: every view (API and CLI) is the same, and the state carries on from where it was."""
    store = str(tmp_path / "store")
    first = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu-1.log")
    await first.start()
    try:
        settings = settings_for(first.bootstrap, store, free_port(), tmp_path, rollout_tick=0.2)
        async with services(settings), httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}",
                                                         timeout=30) as client:
            v1, v2 = await deploy(client, iris_package("iris", "1").data), \
                await deploy(client, iris_package("iris", "2", c=0.5).data)
            assert v1["status"] == v2["status"] == "completed", (v1, v2)
            for endpoint in ("iris", "iris-shadow"):
                resp = await client.put(f"/endpoints/{endpoint}/traffic",
                                        json={"routes": [{"model": "iris", "version": "1", "weight": 100}]})
                assert resp.status_code == 200, resp.text
            resp = await client.post("/endpoints/iris-shadow/shadows", json={"primary": "iris", "shadow": "iris:2"})
            assert resp.status_code == 201, resp.text
            resp = await client.post("/endpoints/iris/rollout", json={"to": "iris:2", "plan": "fast"})
            assert resp.status_code == 202, resp.text
            async with asyncio.timeout(30):
                while (await client.get("/endpoints/iris/rollout")).status_code != 200:
                    await asyncio.sleep(0.1)
            ids = [v1["deployment_id"], v2["deployment_id"]]
            before = await views(settings, ids)
    finally:
        await first.stop()
    assert before["api"]["rollout"]["phase"] == "running" and before["api"]["traffic"]["revision"] >= 2

    # The broker comes back empty, as the embedded one does after a restart of `modelcd up`.
    second = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu-2.log")
    await second.start()
    try:
        settings = settings_for(second.bootstrap, store, free_port(), tmp_path, rollout_tick=0.2)
        async with services(settings), httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}",
                                                         timeout=30) as client:
            after = await views(settings, ids)
            async with asyncio.timeout(30):  # the list too, once ingest recalled them from the store
                while not {d["deployment_id"] for d in (await client.get("/deployments")).json()["deployments"]} \
                        >= set(ids):
                    await asyncio.sleep(0.2)
            assert after["api"]["deployments"] == before["api"]["deployments"]
            assert after["api"]["models"] == before["api"]["models"]
            for view in ("traffic", "shadow traffic", "shadows"):
                assert after["api"][view] == before["api"][view], view
            assert after["cli"]["traffic"] == before["cli"]["traffic"] == after["api"]["traffic"]
            assert after["cli"]["deployments"] == before["cli"]["deployments"]
            assert after["cli"]["models"] == before["cli"]["models"]
            for rollout in (after["api"]["rollout"], after["cli"]["rollout"]):
                old = before["api"]["rollout"]
                assert rollout["rollout_id"] == old["rollout_id"] and rollout["phase"] == "running"
                assert rollout["history"][:len(old["history"])] == old["history"]

            # State carries on: the next revision follows the stored one, through the CLI and the API.
            code, _out, err = await run_cli(cli_env(settings), "traffic", "set", "iris-shadow", "iris:1=100")
            assert code == 0, err
            policy = (await client.get("/endpoints/iris-shadow/traffic")).json()
            assert policy["revision"] == before["api"]["shadow traffic"]["revision"] + 1
            assert policy["shadows"] == before["api"]["shadow traffic"]["shadows"]
            # A redeploy of the same package names the deployment that serves it, which the API still knows.
            again = await deploy(client, iris_package("iris", "1").data)
            assert again["noop"] and again["existing_deployment_id"] == ids[0]
            assert (await client.get(f"/deployments/{ids[0]}")).status_code == 200
    finally:
        await second.stop()
