"""`modelcd up`: the whole system on one machine, as a supervisor of child processes.

Tiers, started in order and stopped in reverse: the embedded broker (unless
MODELCD_KAFKA_BOOTSTRAP is set), then the services (ingest, each serving node, the front
door when there are several nodes, the shadow comparison, the rollout controller, retirement), each a child process (`python -m
modelcd.child KIND`) that gets every setting as `MODELCD_*` variables. A child that dies is
restarted with backoff while the others keep serving (modelcd/supervisor.py). Adding a
component (a proxy, more nodes) is one `Component` entry in `components()`.

Invariants:
- One `up` per home: `<home>/up.json` records this process (pid + start time), its run id and
  each child's state; a second `up` on a live home refuses to start.
- A start after a crash or a SIGKILL needs no manual step: the previous run's processes are
  found by their run mark and killed, and a broker recorded in `<home>/broker.pid` (pid, port,
  start time) that is still ours is stopped. Nothing else is ever killed: a pid counts as ours
  only if its start time matches the record (and, for the broker, its command line).
- SIGINT/SIGTERM stop everything within the drain timeout plus a few seconds; a second one
  SIGKILLs every child at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from modelcd.events.broker import BrokerError, EmbeddedBroker, answers_metadata, looks_like_broker, port_in_use
from modelcd.events.bus import KafkaConfig, ensure_topics
from modelcd.logs import get_logger
from modelcd.runner import proc_start_time
from modelcd.settings import Settings
from modelcd.supervisor import Component, Supervisor, kill_marked

log = get_logger("modelcd.up")

STATUS_FILE = "up.json"
BROKER_PIDFILE = "broker.pid"
STOP_GRACE_S = 2.0  # beyond the drain timeout, before a child is SIGKILLed


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the `MODELCD_*` variables a child reads back into the same Settings."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            out[f"MODELCD_{f.name.upper()}"] = str(value)
    return out


def internal(kind: str, name: str | None = None, *, env: dict[str, str] | None = None,
             url: str | None = None) -> Component:
    """A modelcd service as a child process (`python -m modelcd.child KIND`)."""
    name = name or kind
    return Component(name=name, argv=[sys.executable, "-m", "modelcd.child", kind, "--name", name],
                     env=env or {}, ready_fd=True, url=url)


def broker_component(settings: Settings) -> Component:
    """The embedded broker: the Tansu binary, ready once it answers metadata (topics created then)."""
    broker = EmbeddedBroker(port=settings.broker_port, storage=settings.broker_storage,
                            partitions=settings.topic_partitions)

    async def probe() -> bool:
        if not await answers_metadata(broker.host, broker.port):
            return False
        await ensure_topics(broker.config)  # again after a restart: an in-memory broker forgets them
        return True

    def record(pid: int) -> None:
        _write_json(settings.home / BROKER_PIDFILE,
                    {"pid": pid, "port": broker.port, "start_time": proc_start_time(pid)})

    return Component(name="broker", argv=broker.command(), env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                     probe=probe, url=broker.bootstrap + " (embedded)", stop_timeout=STOP_GRACE_S,
                     log_file=settings.home / "broker.log", on_spawn=record)


def components(settings: Settings, nodes: int) -> list[list[Component]]:
    """Every child `up` supervises, in tiers: each tier starts once the one before is ready."""
    tiers: list[list[Component]] = []
    if settings.kafka_bootstrap is None:
        tiers.append([broker_component(settings)])
    services = [internal("ingest", url=settings.resolved_ingest_url)]
    if nodes > 1:
        # The fleet's one address: the front door on MODELCD_SERVING_PORT, the nodes on the ports after it.
        services.append(internal("frontdoor", url=f"http://{settings.serving_host}:{settings.serving_port}/v2"))
    for i in range(nodes):
        port = node_port(settings, nodes, i)
        services.append(internal("serving", f"serving-{i}", url=f"http://{settings.serving_host}:{port}/v2",
                                 env={"MODELCD_SERVING_PORT": str(port), "MODELCD_NODE_ID": f"node-{i}"}))
    services += [internal("shadow-comparison"), internal("rollout-controller"), internal("retirement")]
    tiers.append(services)
    return tiers


def node_port(settings: Settings, nodes: int, i: int) -> int:
    """Node i's port: MODELCD_SERVING_PORT for a lone node; behind the front door, the ports after it."""
    return settings.serving_port + i + (1 if nodes > 1 else 0)


def _ports(settings: Settings, nodes: int) -> list[tuple[str, str, int, str]]:
    """(what, host, port, setting) of every port `up` will listen on."""
    out = [("the deployment API", settings.ingest_host, settings.ingest_port, "MODELCD_INGEST_PORT")]
    if nodes > 1:
        out += [("the front door", settings.serving_host, settings.serving_port, "MODELCD_SERVING_PORT"),
                ("the front door's admin API", "127.0.0.1", settings.frontdoor_admin_port,
                 "MODELCD_FRONTDOOR_ADMIN_PORT")]
    out += [(f"serving node {i}", settings.serving_host, node_port(settings, nodes, i), "MODELCD_SERVING_PORT")
            for i in range(nodes)]
    if settings.kafka_bootstrap is None:
        out.insert(0, ("the embedded broker", "127.0.0.1", settings.broker_port, "MODELCD_BROKER_PORT"))
    return out


# --- the home: one `up` at a time, and what a crashed one left behind ----------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _alive(pid: Any, start_time: Any) -> bool:
    """The recorded process is still the one running under that pid."""
    return isinstance(pid, int) and start_time is not None and proc_start_time(pid) == start_time


class HomeBusy(RuntimeError):
    """Another `modelcd up` is running with this home."""


def claim_home(home: Path, run_id: str) -> list[str]:
    """Take the home for this run after clearing a crashed run's leftovers; what was cleared, as text."""
    cleared = []
    prev = _read_json(home / STATUS_FILE)
    if prev.get("pid") != os.getpid() and _alive(prev.get("pid"), prev.get("start_time")):
        raise HomeBusy(f"modelcd up is already running with home {home} (pid {prev['pid']}): stop it first "
                       "(Ctrl-C there, or kill it), or start this one with another MODELCD_HOME")
    if prev.get("run_id"):
        killed = kill_marked(str(prev["run_id"]))
        if killed:
            cleared.append(f"killed {len(killed)} process(es) left by the previous run (pids {killed})")
    broker = _read_json(home / BROKER_PIDFILE)
    pid, port = broker.get("pid"), broker.get("port")
    if _alive(pid, broker.get("start_time")) and isinstance(port, int) and looks_like_broker(pid, port):
        _stop_pid(pid)
        cleared.append(f"stopped a stale embedded broker of this home (pid {pid}, port {port})")
    (home / BROKER_PIDFILE).unlink(missing_ok=True)
    _write_json(home / STATUS_FILE, {"pid": os.getpid(), "start_time": proc_start_time(os.getpid()),
                                     "run_id": run_id, "started": time.time(), "components": []})
    return cleared


def _stop_pid(pid: int, timeout: float = 3.0) -> None:
    start = proc_start_time(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc_start_time(pid) == start and start is not None:
        time.sleep(0.05)
    if start is not None and proc_start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc_start_time(pid) == start:
            time.sleep(0.05)


def read_status(home: Path) -> dict[str, Any]:
    """What `<home>/up.json` says (for `modelcd status`), with `running` checked against the pid."""
    data = _read_json(home / STATUS_FILE)
    data["running"] = _alive(data.get("pid"), data.get("start_time"))
    return data


# --- run -------------------------------------------------------------------------------------------


async def run_up(settings: Settings, *, stop: asyncio.Event, nodes: int = 1) -> int:
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, home=home)
    run_id = uuid.uuid4().hex
    try:
        for line in claim_home(home, run_id):
            log.warning(line)
    except HomeBusy as exc:
        print(f"modelcd: {exc}", file=sys.stderr)
        return 2
    try:
        return await _run(settings, stop=stop, nodes=nodes, run_id=run_id)
    finally:
        (home / BROKER_PIDFILE).unlink(missing_ok=True)
        status = _read_json(home / STATUS_FILE)
        if status.get("run_id") == run_id:
            (home / STATUS_FILE).unlink(missing_ok=True)


async def _run(settings: Settings, *, stop: asyncio.Event, nodes: int, run_id: str) -> int:
    for what, host, port, setting in _ports(settings, nodes):
        if port_in_use(port, host):
            print(f"modelcd: port {port} for {what} is already in use: stop what listens there, or choose "
                  f"another port with {setting}", file=sys.stderr)
            return 2
    try:
        tiers = components(settings, nodes)
    except BrokerError as exc:
        print(f"modelcd: {exc}", file=sys.stderr)
        return 2
    if settings.kafka_bootstrap is not None:
        await ensure_topics(KafkaConfig.from_settings(settings))
    home = settings.home
    sup: Supervisor

    def on_change() -> None:
        _write_json(home / STATUS_FILE, {"pid": os.getpid(), "start_time": proc_start_time(os.getpid()),
                                         "run_id": run_id, "components": sup.status()})

    sup = Supervisor(run_id=run_id, base_env={**os.environ, **settings_env(settings)},
                     stop_timeout=settings.drain_timeout + STOP_GRACE_S, on_change=on_change)
    async with sup:
        for tier in tiers:
            if not await sup.wait_ready(sup.start(tier), stop):
                return 0
        print(_banner(settings, sup), file=sys.stderr, flush=True)
        await stop.wait()
        log.info("stopping every component", drain_timeout_s=settings.drain_timeout)
    return 0


def _banner(settings: Settings, sup: Supervisor) -> str:
    lines = ["modelcd is up (each part a supervised child process, restarted if it dies):"]
    for child in sup.children:
        where = child.component.url or ""
        lines.append(f"  {child.component.name:20} {where:44} pid {child.pid}")
    lines.append(f"  {'store':20} {settings.resolved_store_url}")
    lines.append(f"Console: {settings.resolved_ingest_url}/console (live deployments, models, endpoints, shadows, fleet).")
    lines.append(f"Status and restarts: modelcd status (reads {settings.home / STATUS_FILE}).")
    lines.append("Try: modelcd demo && modelcd deploy demo-packages/iris-1.tar  (README: Walkthrough). Ctrl-C to stop.")
    return "\n".join(lines)
