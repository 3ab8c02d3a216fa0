"""The front door's routing table, the DNS answers it becomes, and Caddy's (static) configuration. Pure.

From the fleet's view (alive nodes and what their heartbeats say they hold) and the placement
every node computes the same way, each group of models (placement.groups: a model's versions,
the endpoints that route to it and their shadows) gets the nodes that answer it:

- the nodes that hold it ready *and* own it (a node handing a model off drops out of its route as
  soon as the new owners hold it: it releases the model only after that, so no request meets a 404);
- else the nodes that hold it ready (a move in progress: the old holders);
- else its owners that are alive (it is loading: they load it on demand or answer 503 with why);
- a name nobody knows goes to the default route: every ready node (each answers 404 with the reason).

With several versions in a group, the nodes good for every version are preferred; when there
are none, the union. Nodes that fail the front door's own check of `/v2/health/ready` are left
out (unless that leaves a name with nobody). Caddy asks for a name's nodes by DNS (dns.py) on
every request (cached for `refresh`), so its configuration never changes after start; it retries
a failed attempt on another node (inference is a pure function of its inputs: a POST is safe to
retry) and avoids a node that just failed (passive health check).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from modelcd.events.schemas import ModelState, NodeStatus

from .dns import SRV, ZONE, A, Answer, Srv

Upstreams = tuple[str, ...]  # "host:port" Caddy dials, sorted


@dataclass(frozen=True)
class RouteTable:
    by_upstreams: dict[Upstreams, tuple[str, ...]] = field(default_factory=dict)  # upstreams -> names, sorted
    default: Upstreams = ()
    _index: dict[str, Upstreams] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for ups, names in self.by_upstreams.items():
            for n in names:
                self._index[n] = ups

    def upstreams_of(self, name: str) -> Upstreams:
        return self._index.get(name, self.default)


def dial(url: str) -> str:
    """'http://127.0.0.1:8082' -> '127.0.0.1:8082' (what Caddy's upstream `dial` takes)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 80}"


def route_table(alive: Iterable[NodeStatus], states: Iterable[ModelState], placement: Mapping[str, list[str]],
                group_of: Mapping[str, str], healthy: set[str] | None = None) -> RouteTable:
    """`healthy`: nodes whose last health check passed (None: all alive nodes count as healthy)."""
    alive = [n for n in alive if n.url]
    if healthy is not None:
        alive = [n for n in alive if n.node in healthy] or alive
    addr = {n.node: dial(n.url) for n in alive}
    holders: dict[str, set[str]] = {}
    for n in alive:
        for m in n.models:
            if m.state == "ready":
                holders.setdefault(f"{m.name}:{m.version}", set()).add(n.node)
    per_group: dict[str, list[set[str]]] = {}
    for s in states:
        if s.target != "serving":
            continue
        key = s.key()
        held = holders.get(key, set())
        own = set(placement.get(key, ())) & set(addr)
        choice = (held & own) or held or own
        per_group.setdefault(group_of.get(s.name, s.name), []).append(choice)
    names_of: dict[str, list[str]] = {}
    for name, g in group_of.items():
        names_of.setdefault(g, []).append(name)
    grouped: dict[Upstreams, list[str]] = {}
    for g, choices in per_group.items():
        common = set.intersection(*choices) if choices else set()
        nodes = common or set().union(*choices)
        if not nodes:
            continue
        ups = tuple(sorted(addr[n] for n in nodes))
        grouped.setdefault(ups, []).extend(names_of.get(g, [g]))
    ready = [n for n in alive if n.ready and not n.stopping] or [n for n in alive if not n.stopping] or alive
    default = tuple(sorted(addr[n.node] for n in ready))
    return RouteTable({u: tuple(sorted(set(ns))) for u, ns in sorted(grouped.items())}, default)



# ---------------------------------------------------------------------- DNS answers

NODES = f"nodes.{ZONE}"
MODELS = f"models.{ZONE}"
DEFAULT = f"default.{ZONE}"


def node_label(address: str) -> str:
    """'127.0.0.1:8082' -> a stable DNS label for that upstream."""
    return "n" + hashlib.blake2b(address.encode(), digest_size=6).hexdigest()


def answer(table: RouteTable, hosts: Mapping[str, str], name: str, qtype: int) -> Answer:
    """The DNS answer for `name` from the table; `hosts` maps a dial host to its IPv4 address."""
    name = name.lower().rstrip(".")
    if name.endswith("." + NODES):
        label = name[: -len(NODES) - 1]
        for ups in (table.default, *table.by_upstreams):
            for u in ups:
                if node_label(u) == label:
                    host = u.rpartition(":")[0]
                    return [hosts.get(host, host)] if qtype in (A, SRV) else []
        return None
    ups: Upstreams | None = None
    if name.startswith("_oip._tcp."):
        target = name[len("_oip._tcp."):]
        if target == DEFAULT:
            ups = table.default
        elif target.endswith("." + MODELS):
            ups = table.upstreams_of(target[: -len(MODELS) - 1])
    if ups is None:
        return None
    if qtype != SRV:
        return []
    return [Srv(f"{node_label(u)}.{NODES}", int(u.rpartition(":")[2])) for u in ups]


# ---------------------------------------------------------------------- Caddy's configuration


@dataclass(frozen=True)
class ProxyOptions:
    try_duration: float = 5.0  # how long a request may be retried on other nodes
    try_interval: float = 0.025
    fail_duration: float = 2.0  # passive health check: a node that failed a request is avoided this long
    # How long Caddy caches a name's nodes. Caddy refreshes under a lock every request for that name waits
    # on, so shorter costs tail latency (measured: 0.1 s tripled the p99 at 400 req/s); a moved model's old
    # holder waits longer than this before unloading it (serving.placement.RELEASE_GRACE).
    refresh: float = 0.5
    policy: str = "least_conn"
    request_buffers: int = 4 << 20  # bodies up to this size are buffered, so a retry can resend them


def _ms(x: float) -> str:
    return f"{max(1, round(x * 1000))}ms"


def proxy(srv_name: str, dns_port: int, opts: ProxyOptions) -> dict[str, Any]:
    """A Caddy `reverse_proxy` whose upstreams come from our DNS (SRV), with retries and passive health checks."""
    resolver = {"addresses": [f"udp/127.0.0.1:{dns_port}"]}
    return {
        "handler": "reverse_proxy",
        "dynamic_upstreams": {"source": "srv", "service": "oip", "proto": "tcp", "name": srv_name,
                              "refresh": _ms(opts.refresh), "resolver": resolver, "dial_timeout": "1s"},
        "load_balancing": {
            "selection_policy": {"policy": opts.policy},
            "try_duration": _ms(opts.try_duration),
            "try_interval": _ms(opts.try_interval),
            "retry_match": [{"method": ["GET", "HEAD", "POST"]}],  # predictions are idempotent
        },
        "health_checks": {"passive": {"fail_duration": _ms(opts.fail_duration), "max_fails": 1}},
        "request_buffers": opts.request_buffers,
        "transport": {"protocol": "http", "dial_timeout": "1s", "resolver": resolver},
    }


SERVER = "front"


def caddy_config(listen: str, admin: str, dns_port: int, opts: ProxyOptions) -> dict[str, Any]:
    """Caddy's whole config, written once: admin API on loopback, one HTTP server, two routes, no TLS."""
    routes = [
        {"match": [{"path": ["/v2/models/*"]}],
         "handle": [proxy(f"{{http.request.uri.path.2}}.{MODELS}", dns_port, opts)], "terminal": True},
        {"handle": [proxy(DEFAULT, dns_port, opts)], "terminal": True},
    ]
    return {
        "admin": {"listen": admin, "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": "ERROR"}}},
        "apps": {"http": {"servers": {SERVER: {
            "listen": [listen],
            "routes": routes,
            "automatic_https": {"disable": True},
        }}}},
    }
