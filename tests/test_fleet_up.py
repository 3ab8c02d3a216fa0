"""`modelcd up --nodes 2`: the front door answers on MODELCD_SERVING_PORT, the nodes on ports of their own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from modelcd.events.broker import free_port

from ._serving import infer_body, iris_package
from .test_up import MODELCD, Up


class UpNodes(Up):
    """`modelcd up --nodes N`."""

    def __init__(self, tmp: Path, nodes: int, **env: str) -> None:
        super().__init__(tmp, **env)
        self.nodes = nodes

    def start(self) -> None:
        import subprocess

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*MODELCD, "up", "--nodes", str(self.nodes)], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(300)]


async def test_up_with_two_nodes_serves_through_the_front_door(tmp_path: Path) -> None:
    """A model deployed through the API answers on MODELCD_SERVING_PORT (the front door), placed on both nodes."""
    up = UpNodes(tmp_path, 2, MODELCD_FRONTDOOR_ADMIN_PORT=str(free_port()), MODELCD_HEARTBEAT_INTERVAL="1")
    up.start()
    try:
        st = await up.ready()
        names = {c["name"] for c in st["components"]}
        assert {"frontdoor", "serving-0", "serving-1"} <= names
        front = up.url("serving")
        async with httpx.AsyncClient(timeout=10.0) as client:
            r = await client.post(f"{up.url('ingest')}/deployments", content=iris_package("fleet-up", "1").data,
                                  headers={"content-type": "application/x-tar"})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 90
            while True:
                r = await client.post(f"{front}/v2/models/fleet-up/infer", json=infer_body())
                if r.status_code == 200:
                    break
                assert time.monotonic() < deadline, f"no answer through the front door: {r.status_code} {r.text}"
                await asyncio.sleep(0.3)
            assert r.json()["model_name"] == "fleet-up"
            # Each node has a port of its own after the front door's, and holds the model (R=2 of 2).
            port = up.ports["MODELCD_SERVING_PORT"]
            for i in (1, 2):
                deadline = time.monotonic() + 60
                while (r := await client.get(f"http://127.0.0.1:{port + i}/v2/models/fleet-up/ready")).status_code != 200:
                    assert time.monotonic() < deadline, f"node on :{port + i} does not hold fleet-up: {r.text}"
                    await asyncio.sleep(0.3)
    finally:
        assert await up.stop() == 0
