"""The fleet's front door: one address (MODELCD_SERVING_PORT) for every serving node, through Caddy.

It reads what every node reads (model-state and traffic from the beginning, recent heartbeats on
modelcd.health, then both live), computes the same placement the nodes compute, checks each
node's `/v2/health/ready` every MODELCD_FRONTDOOR_HEALTH_INTERVAL, and turns all of it into a
routing table (routes.py) that its DNS responder (dns.py) serves to Caddy. Caddy is configured
once and never reloaded; it retries a failed attempt on another node, so a node that dies costs
no request and is left out of every answer within one health-check period.

Start: DNS up → Caddy up → caught up on state and heartbeats → first table → ready.
Stop: Caddy stops gracefully (in-flight requests finish) → followers cancelled → DNS closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

from modelcd.events import topics
from modelcd.events.bus import PROMPT_FETCH_WAIT_MS, KafkaConfig, ensure_topics, follow_events
from modelcd.events.schemas import ModelState, NodeStatus, TrafficPolicy
from modelcd.logs import get_logger
from modelcd.placement.groups import groups
from modelcd.placement.membership import Membership
from modelcd.placement.plan import place
from modelcd.runner import wait_for
from modelcd.settings import Settings

from .caddy import Caddy
from .dns import Answer, DnsServer
from .routes import ProxyOptions, RouteTable, answer, caddy_config, dial, route_table

log = get_logger("modelcd.fleet.frontdoor")

HEALTH_BACKLOG = 5000
TICK = 0.2


def membership_ttl(settings: Settings) -> float:
    """The same time-to-live the nodes use (serving.placement): three missed heartbeats."""
    return 3 * settings.heartbeat_interval + 1.0


class FrontDoor:
    def __init__(self, settings: Settings, *, port: int | None = None, admin_port: int | None = None,
                 options: ProxyOptions | None = None) -> None:
        self.settings = settings
        self.port = settings.serving_port if port is None else port
        self.admin_port = settings.frontdoor_admin_port if admin_port is None else admin_port
        self.options = options or ProxyOptions()
        self.fleet = Membership(membership_ttl(settings))
        self.healthy: set[str] = set()  # nodes whose last check of /v2/health/ready passed
        self._hosts: dict[str, str] = {}  # dial host -> IPv4 address (what the DNS answers for a node)
        self.states: dict[str, ModelState] = {}
        self.policies: dict[str, TrafficPolicy] = {}
        self.table = RouteTable()
        self.caddy: Caddy | None = None
        self.changes = 0

    @property
    def url(self) -> str:
        return f"http://{self.settings.serving_host}:{self.port}"

    # ------------------------------------------------------------------ pure view

    def compute(self, now: float) -> RouteTable:
        alive = self.fleet.alive(now)
        members = self.fleet.members(now)
        states = list(self.states.values())
        policies = list(self.policies.values())
        if self.settings.replicas > 0:
            placement = place(states, policies, members, self.settings.replicas)
        else:
            placement = {s.key(): [m.node for m in members] for s in states if s.target == "serving"}
        group_of = groups((s.name for s in states if s.target == "serving"), policies)
        return route_table(alive, states, placement, group_of, self.healthy)

    def resolve(self, name: str, qtype: int) -> Answer:
        return answer(self.table, self._hosts, name, qtype)

    # ------------------------------------------------------------------ I/O

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event) -> None:
        s = self.settings
        cfg = KafkaConfig.from_settings(s)
        await ensure_topics(cfg)
        dns = DnsServer(self.resolve)
        await dns.start()
        caddy = self.caddy = Caddy(listen=f"{s.serving_host}:{self.port}", admin_port=self.admin_port,
                                   workdir=s.home.resolve() / "frontdoor")
        try:
            await caddy.start(caddy_config(caddy.listen, caddy.admin, dns.port, self.options))
            async with asyncio.TaskGroup() as tg:
                state_known, fleet_known = asyncio.Event(), asyncio.Event()
                tasks = [
                    tg.create_task(follow_events(cfg, [topics.MODEL_STATE, topics.TRAFFIC], self._on_state,
                                                 caught_up=state_known, client_id=f"{s.kafka_client_id}-frontdoor",
                                                 max_records=1000, fetch_wait_ms=PROMPT_FETCH_WAIT_MS),
                                   name="frontdoor-state"),
                    tg.create_task(follow_events(cfg, [topics.HEALTH], self._on_health, caught_up=fleet_known,
                                                 client_id=f"{s.kafka_client_id}-frontdoor-fleet",
                                                 backlog=HEALTH_BACKLOG, max_records=1000), name="frontdoor-fleet"),
                    tg.create_task(self._check_health(), name="frontdoor-health"),
                ]
                both = asyncio.ensure_future(asyncio.gather(state_known.wait(), fleet_known.wait()))
                halt = asyncio.ensure_future(stop.wait())
                await asyncio.wait({both, halt}, return_when=asyncio.FIRST_COMPLETED)
                both.cancel()
                if not stop.is_set():
                    await self._check_once()
                    self._update()
                    ready.set()
                    log.info("front door ready", url=self.url, nodes=len(self.fleet.alive(time.monotonic())))
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await wait_for(asyncio.shield(halt), TICK)
                    self._update()
                halt.cancel()
                await caddy.stop()  # in-flight requests finish while the table still answers
                for t in tasks:
                    t.cancel()
        finally:
            await caddy.stop()
            dns.close()
            log.info("front door stopped", route_changes=self.changes, dns_queries=dns.queries)

    def _update(self) -> None:
        now = time.monotonic()
        self.fleet.expire(now)
        table = self.compute(now)
        if table == self.table:
            return
        self.table = table
        self.changes += 1
        log.info("front door routes changed", default=list(table.default),
                 routes={",".join(u): len(n) for u, n in table.by_upstreams.items()})

    async def _check_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.frontdoor_health_interval)
            await self._check_once()
            self._update()

    async def _check_once(self) -> None:
        """GET /v2/health/ready on every alive node, at once; a node passes with a 200 within the interval."""
        nodes = [n for n in self.fleet.alive(time.monotonic()) if n.url]
        timeout = max(0.2, self.settings.frontdoor_health_interval)

        async def check(client: httpx.AsyncClient, st: NodeStatus) -> tuple[str, bool]:
            try:
                r = await client.get(f"{st.url}/v2/health/ready")
                return st.node, r.status_code == 200
            except httpx.HTTPError:
                return st.node, False

        async with httpx.AsyncClient(timeout=timeout) as client:
            results = await asyncio.gather(*(check(client, st) for st in nodes))
        self.healthy = {node for node, ok in results if ok}
        for st in nodes:
            host = dial(st.url).rpartition(":")[0]
            if host not in self._hosts:
                self._hosts[host] = await _ipv4(host)

    def _on_state(self, event: Any) -> None:
        match event:
            case ModelState():
                known = self.states.get(event.key())
                if known is None or known.at <= event.at:
                    self.states[event.key()] = event
            case TrafficPolicy():
                known_p = self.policies.get(event.endpoint)
                if known_p is None or (known_p.at, known_p.revision) <= (event.at, event.revision):
                    self.policies[event.endpoint] = event
            case _:
                pass

    def _on_health(self, event: Any) -> None:
        if isinstance(event, NodeStatus):
            age = max(0.0, time.time() - event.at)  # an old heartbeat read at start is not a live node
            self.fleet.observe(event, time.monotonic() - age)


async def _ipv4(host: str) -> str:
    """A node's address as Caddy will dial it (our DNS answers A records with it)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=2)  # AF_INET
        return str(infos[0][4][0])
    except OSError:
        return host


async def run_frontdoor(settings: Settings, *, stop: asyncio.Event, ready: asyncio.Event, port: int | None = None,
                        admin_port: int | None = None) -> None:
    """Run the front door until `stop` is set (the shape `modelcd up` starts its services in)."""
    await FrontDoor(settings, port=port, admin_port=admin_port).run(stop=stop, ready=ready)
