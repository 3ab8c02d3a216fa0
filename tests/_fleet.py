"""Helpers for fleet tests: serving nodes as real processes (`modelcd serve`), the front door in-process,
a steady bounded load through it, and "placement settled" as the heartbeats show it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelcd.events.broker import free_port
from modelcd.fleet.frontdoor import FrontDoor
from modelcd.placement.plan import place
from modelcd.settings import Settings

from ._serving import infer_body

MODELCD = [sys.executable, "-m", "modelcd"]


def fleet_settings(tmp_path: Path, bootstrap: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "kafka_bootstrap": bootstrap, "kafka_idempotence": False, "home": tmp_path / "home", "store_url": str(tmp_path / "store"),
        "serving_host": "127.0.0.1", "serving_port": free_port(), "frontdoor_admin_port": free_port(), "heartbeat_interval": 0.5,
        "usage_interval": 1.0, "reconcile_interval": 5.0, "health_interval": 60.0, "frontdoor_health_interval": 0.5,
        "handoff_timeout": 30.0, "drain_timeout": 5.0, "log_format": "json", "replicas": 2}
    base.update(overrides)
    return Settings(**base)


def node_env(settings: Settings, home: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a node process gets: the same settings as MODELCD_* variables."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    for name, _default, _doc in Settings.describe():
        value = getattr(settings, name.removeprefix("MODELCD_").lower())
        if value is not None:
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    out["MODELCD_HOME"] = str(home)
    out.update(env or {})
    return out


@dataclass
class NodeProc:
    node_id: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_node(settings: Settings, node_id: str, tmp_path: Path, *, python: str = sys.executable,
                     env: dict[str, str] | None = None, wait: bool = True, timeout: float = 60.0) -> NodeProc:
    """`modelcd serve` in its own process on a free port; returns once it answers ready (unless wait=False)."""
    port = free_port()
    home = tmp_path / f"home-{node_id}"
    home.mkdir(parents=True, exist_ok=True)
    log = tmp_path / f"{node_id}.log"
    with open(log, "ab") as f:
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "modelcd", "serve", "--port", str(port), "--node-id", node_id,
            env=node_env(settings, home, env), stdout=f, stderr=f, start_new_session=True)
    node = NodeProc(node_id, port, proc, log)
    if wait:
        await wait_ready(node, timeout)
    return node


async def wait_ready(node: NodeProc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if node.proc.returncode is not None:
                raise AssertionError(f"node {node.node_id} exited ({node.proc.returncode}): "
                                     f"{node.log.read_text()[-2000:]}")
            try:
                if (await client.get(f"{node.url}/v2/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"node {node.node_id} not ready within {timeout}s: {node.log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)


async def stop_node(node: NodeProc, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if node.proc.returncode is None:
        node.proc.send_signal(sig)
    return await asyncio.wait_for(node.proc.wait(), timeout)


@asynccontextmanager
async def front_door(settings: Settings, timeout: float = 30.0) -> AsyncIterator[FrontDoor]:
    fd = FrontDoor(settings)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(fd.run(stop=stop, ready=ready))
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done:
        task.result()
    assert ready.is_set(), "front door not ready"
    try:
        yield fd
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def settled(fd: FrontDoor, nodes: set[str]) -> bool:
    """Every serving model is held (ready) by exactly its owners among `nodes`, and the front door routes so."""
    now = time.monotonic()
    alive = {n.node for n in fd.fleet.alive(now)}
    members = [m for m in fd.fleet.members(now) if m.node in nodes]
    if {m.node for m in members} != nodes or not alive >= nodes:
        return False
    placement = place(fd.states.values(), fd.policies.values(), members, fd.settings.replicas)
    holders = fd.fleet.holders(now)
    for key, own in placement.items():
        if holders.get(key, set()) != set(own):
            return False
    return fd.table == fd.compute(now)


def owners_now(fd: FrontDoor) -> dict[str, list[str]]:
    now = time.monotonic()
    return place(fd.states.values(), fd.policies.values(), fd.fleet.members(now), fd.settings.replicas)


@dataclass
class Load:
    """Steady bounded load: `workers` clients, each one request at a time with a pause, over `models`."""

    url: str
    models: list[str]
    workers: int = 4
    pause: float = 0.01
    ok: int = 0
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (started at, model, what)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self, i: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as client:
            n = i
            while not self._stop.is_set():
                model = self.models[n % len(self.models)]
                n += 1
                t0 = time.monotonic()
                try:
                    r = await client.post(f"/v2/models/{model}/infer", json=infer_body())
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append((t0, model, f"{r.status_code} {r.text[:200]}"))
                except httpx.HTTPError as exc:
                    self.failures.append((t0, model, repr(exc)))
                await asyncio.sleep(self.pause)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def eventually(check: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
