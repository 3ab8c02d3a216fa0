"""`modelcd release roll ENV`: replace the fleet's serving nodes, one at a time, by nodes from ENV.

For each node of the fleet (as its heartbeats show it, alive and not stopping), in order:
start a node from the candidate environment (`ENV/bin/python -m modelcd serve`, a new port and a
new node id, detached so it outlives this command) → wait until it answers ready *and* holds
every model placed on it → ask the old node to leave (a `NodeDrain` on modelcd.health: it hands
its models off, drains and exits) → wait until it is gone. The front door follows the heartbeats,
so requests move with the models and none fails.

Rollback, by itself: when a new node exits, never becomes ready, does not hold its placement
within the timeout, or answers with a higher error rate than the old nodes while both serve the
live traffic for `observe` seconds (Prometheus counters scraped from each node's /metrics), every node this roll started is asked to leave, and each old node it had
already replaced is started again from the current installation first. An old node is only ever
asked to leave once its replacement holds its share, so a candidate that cannot start leaves
every old node untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelcd.errors import CliError
from modelcd.events import topics
from modelcd.events.broker import free_port
from modelcd.events.bus import KafkaConfig, Publisher, follow_events
from modelcd.events.schemas import ModelState, NodeDrain, NodeStatus, TrafficPolicy
from modelcd.logs import get_logger
from modelcd.placement.membership import Membership
from modelcd.placement.plan import place
from modelcd.runner import wait_for
from modelcd.settings import Settings

from .frontdoor import HEALTH_BACKLOG, membership_ttl

log = get_logger("modelcd.fleet.roll")


class ReleaseError(CliError):
    """A release step failed (what and why in the message)."""


def env_python(env: Path) -> Path:
    """The interpreter of a candidate environment (a venv path)."""
    py = env / "bin" / "python"
    if not py.exists():
        raise ReleaseError(f"{env} is not a virtual environment with modelcd installed (no {py}); create it with "
                           "python -m venv ENV && ENV/bin/pip install 'modelcd[all]==VERSION'")
    return py


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The current process's environment with every setting as a MODELCD_* variable, plus `extra`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            out[f"MODELCD_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    out.update(extra)
    return out


@dataclass
class Launched:
    node_id: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    python: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def launch_node(settings: Settings, python: Path | str, node_id: str, workdir: Path,
                extra_env: dict[str, str] | None = None) -> Launched:
    """`python -m modelcd serve` on a free port, detached (its own session: it outlives the caller)."""
    port = free_port()
    home = workdir / node_id
    home.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{node_id}.log"
    env = settings_env(settings, MODELCD_HOME=str(home), MODELCD_SERVING_HOST="127.0.0.1", **(extra_env or {}))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([str(python), "-m", "modelcd", "serve", "--port", str(port), "--node-id", node_id],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=workdir)
    return Launched(node_id, port, proc, log_path, str(python))


@dataclass
class FleetView:
    """What the roll knows of the fleet: heartbeats and the target state, live from the bus."""

    settings: Settings
    fleet: Membership = field(init=False)
    states: dict[str, ModelState] = field(default_factory=dict)
    policies: dict[str, TrafficPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fleet = Membership(membership_ttl(self.settings))

    def on_state(self, event: Any) -> None:
        if isinstance(event, ModelState):
            known = self.states.get(event.key())
            if known is None or known.at <= event.at:
                self.states[event.key()] = event
        elif isinstance(event, TrafficPolicy):
            self.policies[event.endpoint] = event

    def on_health(self, event: Any) -> None:
        if isinstance(event, NodeStatus):
            self.fleet.observe(event, time.monotonic() - max(0.0, time.time() - event.at))

    def members(self) -> list[str]:
        return [m.node for m in self.fleet.members(time.monotonic())]

    def alive(self, node: str) -> NodeStatus | None:
        for st in self.fleet.alive(time.monotonic()):
            if st.node == node:
                return st
        return None

    def holds_its_share(self, node: str) -> bool:
        """Every model placed on `node` (from the membership as heartbeats show it) is ready there."""
        now = time.monotonic()
        placement = place(self.states.values(), self.policies.values(), self.fleet.members(now),
                          self.settings.replicas) if self.settings.replicas > 0 else {
            s.key(): [node] for s in self.states.values() if s.target == "serving"}
        mine = [k for k, own in placement.items() if node in own]
        held = self.fleet.holders(now)
        return node in self.members() and all(node in held.get(k, ()) for k in mine)


# ---------------------------------------------------------------------- error rate (pure)


def counters(metrics_text: str) -> tuple[float, float]:
    """(requests, errors) summed over models from a node's Prometheus /metrics text."""
    req = err = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("modelcd_requests_total"):
            req += float(line.rsplit(" ", 1)[1])
        elif line.startswith("modelcd_request_errors_total"):
            err += float(line.rsplit(" ", 1)[1])
    return req, err


def error_rate_regressed(new: tuple[float, float], old: tuple[float, float], *, min_requests: int = 20,
                         slack: float = 0.01) -> str | None:
    """Why the new node's error rate is above the old nodes' (over the same window), or None.

    `new` and `old` are (requests, errors) deltas. Fewer than `min_requests` on the new node: no
    judgement (None). Above means beyond the old rate by `slack` (an absolute share) and beyond twice it.
    """
    n_req, n_err = new
    o_req, o_err = old
    if n_req < min_requests:
        return None
    n_rate = n_err / n_req
    o_rate = o_err / o_req if o_req else 0.0
    if n_rate > o_rate + slack and n_rate > 2 * o_rate:
        return (f"error rate {n_rate:.1%} ({n_err:.0f} of {n_req:.0f} requests) vs {o_rate:.1%} on the old nodes "
                "over the same window")
    return None


@dataclass
class RollResult:
    ok: bool
    replaced: list[tuple[str, str]]  # (old node, new node)
    started: list[Launched]  # every node this roll started and left running
    reason: str = ""


async def _wait(check: Callable[[], Any], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(interval)
    return False


async def _answers_ready(client: httpx.AsyncClient, node: Launched) -> bool:
    if node.proc.poll() is not None:
        raise ReleaseError(f"node {node.node_id} from {node.python} exited with code {node.proc.returncode} "
                           f"before it was ready; its log: {node.log}\n{_tail(node.log)}")
    try:
        return (await client.get(f"{node.url}/v2/health/ready")).status_code == 200
    except httpx.TransportError:
        return False


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


async def _scrape(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    try:
        r = await client.get(f"{url}/metrics")
        return counters(r.text) if r.status_code == 200 else (0.0, 0.0)
    except httpx.TransportError:
        return 0.0, 0.0


async def _compare_errors(client: httpx.AsyncClient, view: FleetView, new: Launched, old_nodes: list[str],
                          observe: float, say: Callable[[str], None]) -> None:
    """Watch the new node and the remaining old ones for `observe` seconds under the live traffic."""
    olds = [st.url for n in old_nodes if (st := view.alive(n)) is not None and st.url]
    before_new = await _scrape(client, new.url)
    before_old = [await _scrape(client, u) for u in olds]
    await asyncio.sleep(observe)
    after_new = await _scrape(client, new.url)
    after_old = [await _scrape(client, u) for u in olds]
    d_new = (after_new[0] - before_new[0], after_new[1] - before_new[1])
    d_old = (sum(a[0] - b[0] for a, b in zip(after_old, before_old)),
             sum(a[1] - b[1] for a, b in zip(after_old, before_old)))
    why = error_rate_regressed(d_new, d_old)
    if why is not None:
        raise ReleaseError(f"node {new.node_id}: {why}")
    say(f"    {new.node_id}: {d_new[1]:.0f} errors in {d_new[0]:.0f} requests over {observe:g}s "
        f"(old nodes: {d_old[1]:.0f} in {d_old[0]:.0f})")


async def roll(settings: Settings, env: Path, *, workdir: Path, ready_timeout: float = 120.0,
               leave_timeout: float | None = None, tag: str | None = None, observe: float = 5.0,
               say: Callable[[str], None] = lambda line: None) -> RollResult:
    """Replace every node of the fleet by one from `env`, one at a time; roll back by itself on failure."""
    python = env_python(env)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = tag or time.strftime("r%H%M%S")
    leave_timeout = leave_timeout or settings.handoff_timeout + settings.drain_timeout + 30.0
    cfg = KafkaConfig.from_settings(settings)
    view = FleetView(settings)
    known_state, known_fleet = asyncio.Event(), asyncio.Event()
    followers = [
        asyncio.create_task(follow_events(cfg, [topics.MODEL_STATE, topics.TRAFFIC], view.on_state,
                                          caught_up=known_state, client_id=f"{settings.kafka_client_id}-roll",
                                          max_records=1000)),
        asyncio.create_task(follow_events(cfg, [topics.HEALTH], view.on_health, caught_up=known_fleet,
                                          client_id=f"{settings.kafka_client_id}-roll-fleet",
                                          backlog=HEALTH_BACKLOG, max_records=1000)),
    ]
    started: list[Launched] = []
    replaced: list[tuple[str, str]] = []
    try:
        await wait_for(asyncio.gather(known_state.wait(), known_fleet.wait()), 30)
        old_nodes = sorted(view.members())
        if not old_nodes:
            raise ReleaseError("no serving node heartbeats on the bus: nothing to roll (is the fleet up, and "
                               "MODELCD_KAFKA_BOOTSTRAP the production broker?)")
        say(f"rolling {len(old_nodes)} node(s) to {env}: {', '.join(old_nodes)}")
        async with Publisher(cfg, source="release/roll") as pub, httpx.AsyncClient(timeout=2.0) as client:
            for old in old_nodes:
                new = launch_node(settings, python, f"{old}-{tag}", workdir)
                started.append(new)
                say(f"  {old}: started {new.node_id} on {new.url} (pid {new.proc.pid})")
                try:
                    if not await _wait(lambda n=new: _answers_ready(client, n), ready_timeout):
                        raise ReleaseError(f"node {new.node_id} was not ready within {ready_timeout:g}s; "
                                           f"its log: {new.log}")
                    if not await _wait(lambda n=new: view.holds_its_share(n.node_id), ready_timeout):
                        raise ReleaseError(f"node {new.node_id} did not load the models placed on it within "
                                           f"{ready_timeout:g}s; its log: {new.log}")
                    if observe > 0:
                        await _compare_errors(client, view, new, old_nodes, observe, say)
                except ReleaseError as exc:
                    say(f"  {old}: FAILED: {exc}")
                    await _rollback(settings, view, pub, started, replaced, workdir, leave_timeout, say)
                    return RollResult(False, replaced, [], str(exc))
                say(f"  {old}: {new.node_id} ready and holding its share; asking {old} to leave")
                await pub.publish(NodeDrain(node=old, reason=f"replaced by {new.node_id} ({env})"))
                if not await _wait(lambda o=old: _left(client, view, o), leave_timeout):
                    say(f"  {old}: did not leave within {leave_timeout:g}s (still heartbeating); going on")
                replaced.append((old, new.node_id))
                say(f"  {old}: replaced")
        return RollResult(True, replaced, started)
    finally:
        for t in followers:
            t.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


async def _left(client: httpx.AsyncClient, view: FleetView, node: str) -> bool:
    """The node said it is stopping and no longer answers (or stopped heartbeating altogether)."""
    st = view.alive(node)
    if st is None:
        return True
    if not st.stopping:
        return False
    try:
        await client.get(f"{st.url}/v2/health/live")
        return False
    except httpx.TransportError:
        return True


async def _rollback(settings: Settings, view: FleetView, pub: Publisher, started: list[Launched],
                    replaced: list[tuple[str, str]], workdir: Path, leave_timeout: float,
                    say: Callable[[str], None]) -> None:
    """Old nodes already replaced come back from the current installation; every new node is asked to leave."""
    say("rolling back")
    async with httpx.AsyncClient(timeout=2.0) as client:
        for old, _new in replaced:
            back = launch_node(settings, sys.executable, old, workdir)
            ok = await _wait(lambda b=back: _answers_ready(client, b), 120.0)
            say(f"  {old}: started again from the current installation ({'ready' if ok else 'NOT ready'})")
    for node in started:
        if node.proc.poll() is None:
            await pub.publish(NodeDrain(node=node.node_id, reason="release rolled back"))
    for node in started:
        try:
            await asyncio.to_thread(node.proc.wait, leave_timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
        say(f"  {node.node_id}: stopped (exit {node.proc.returncode})")
