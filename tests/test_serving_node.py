"""A serving node against a real broker and store: deploy, retire, swap, reconcile, restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.store.blobs import open_store

from ._serving import deploy, eventually, iris_package, node_settings, retire, running_node


async def test_deploy_served_without_restart_then_retire_404(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A model deployed while the node runs is served, names the version that answered, and 404s once retired."""
    settings = node_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        async with running_node(settings) as n:
            assert (await n.infer("iris")).status_code == 404
            state = await deploy(store, pub, iris_package("iris", "1"))
            await eventually(lambda: n.registry.loaded_keys() == ["iris:1"], what="iris:1 loaded")
            r = await n.infer("iris")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_name"] == "iris" and body["model_version"] == "1"
            assert {o["name"] for o in body["outputs"]} >= {"label"}
            await retire(store, pub, state)
            await eventually(lambda: not n.registry.entries, what="iris:1 unloaded")
            r = await n.infer("iris")
            assert r.status_code == 404 and "error" in r.json()
            assert n.registry.resident_bytes == 0


async def test_version_swap_under_continuous_requests_has_zero_failures(broker: EmbeddedBroker,
                                                                         tmp_path: Path) -> None:
    """Deploying v2 and retiring v1 while clients hammer the model name fails no request, and v2 takes over."""
    settings = node_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        v1 = await deploy(store, pub, iris_package("swap", "1", depth=2))
        async with running_node(settings) as n:
            answered: list[tuple[bool, str]] = []  # (request started after v1 was gone, version that answered)
            failures: list[str] = []
            done = asyncio.Event()
            swapped = asyncio.Event()

            async def client() -> None:
                while not done.is_set():
                    after = swapped.is_set()  # a request already in flight on v1 may finish on v1: allowed
                    r = await n.infer("swap")
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        answered.append((after, r.json()["model_version"]))

            clients = [asyncio.create_task(client()) for _ in range(4)]
            try:
                await eventually(lambda: len(answered) > 20, what="traffic on v1")
                await deploy(store, pub, iris_package("swap", "2", depth=3))
                await retire(store, pub, v1)  # right after: the node must keep v1 until v2 is ready
                await eventually(lambda: "swap:1" not in n.registry.entries, what="v1 unloaded")
                swapped.set()
                await eventually(lambda: sum(a for a, _ in answered) > 20, what="traffic after the swap")
            finally:
                done.set()
                await asyncio.gather(*clients)
            assert failures == []
            assert answered[0][1] == "1"
            assert {v for after, v in answered if after} == {"2"}


async def test_lost_event_is_repaired_by_reconcile(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A model written to the target state without its event is served after one reconcile period."""
    settings = node_settings(tmp_path, broker.bootstrap, reconcile_interval=0.5)
    async with open_store(settings.resolved_store_url) as store:
        async with running_node(settings) as n:
            await deploy(store, None, iris_package("quiet", "1"), publish=False)
            await eventually(lambda: n.registry.loaded_keys() == ["quiet:1"], timeout=10, what="reconciled load")
            assert (await n.infer("quiet")).status_code == 200


async def test_restart_comes_back_to_exactly_the_target_state(broker: EmbeddedBroker, tmp_path: Path,
                                                              s3_store_url: str, s3_endpoint: str) -> None:
    """After a restart the node serves exactly the store's target state (S3), even where events were lost."""
    settings = node_settings(tmp_path, broker.bootstrap, store_url=s3_store_url, s3_endpoint_url=s3_endpoint)
    async with open_store(s3_store_url, endpoint_url=s3_endpoint) as store, \
            Publisher(broker.config, "test") as pub:
        a = await deploy(store, pub, iris_package("a", "1"))
        await deploy(store, pub, iris_package("b", "1"))
        async with running_node(settings) as n:
            assert sorted(n.registry.loaded_keys()) == ["a:1", "b:1"]
        # While the node is down: retire a (event and store), deploy c with its event lost,
        # and retire b in the store only (its event lost too).
        await retire(store, pub, a)
        await deploy(store, None, iris_package("c", "1"), publish=False)
        import msgspec

        from modelcd.store.targets import TargetState
        b = await TargetState(store).get_model("b", "1")
        assert b is not None
        await TargetState(store).put_model(msgspec.structs.replace(b, target="retired", at=b.at + 1))
        async with running_node(settings) as n:
            assert sorted(n.registry.loaded_keys()) == ["c:1"]
            assert sorted(n.registry.entries) == ["c:1"]
            assert (await n.infer("c")).status_code == 200
            assert (await n.infer("a")).status_code == 404
            assert (await n.infer("b")).status_code == 404
