"""Pick the route of an endpoint's TrafficPolicy that answers a request: pure, no I/O.

Invariants:
- without a sticky key, a route is chosen at random in proportion to its weight;
- with a key, the choice is a deterministic function of (key, routes, weights): weighted
  rendezvous hashing, so raising one route's weight (and lowering the others' in the
  same proportion, as a canary step does) only moves keys *onto* that route, and the
  order of routes in the policy does not matter;
- routes of weight <= 0 never answer; a policy without a positive route has no route.

`compile_policy` does all the per-policy work once (when the event arrives), so the
request path costs one hash of the key and a few float operations per route.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass

from modelcd.events.schemas import Route, TrafficPolicy

_MASK = (1 << 64) - 1


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: turns (key hash ^ route seed) into an independent uniform 64-bit value."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A TrafficPolicy ready for the request path."""

    endpoint: str
    routes: tuple[Route, ...]  # positive weight only
    seeds: tuple[int, ...]  # per route, from "model:version": stable across policy revisions
    inv_weights: tuple[float, ...]
    cumulative: tuple[float, ...]
    sticky_key: str | None
    policy: TrafficPolicy

    def pick(self, key: str | None, rnd: float) -> Route:
        """The route for a request with sticky `key` (or None) and a uniform `rnd` in [0, 1)."""
        routes = self.routes
        if len(routes) == 1:
            return routes[0]
        if key is None:
            i = bisect.bisect_right(self.cumulative, rnd * self.cumulative[-1])
            return routes[min(i, len(routes) - 1)]
        base = _h64(key)
        best = 0
        best_score = math.inf
        for i, seed in enumerate(self.seeds):
            u = ((_mix(base ^ seed) >> 11) + 0.5) * (1.0 / (1 << 53))  # uniform in (0, 1)
            score = -math.log(u) * self.inv_weights[i]
            if score < best_score:
                best, best_score = i, score
        return routes[best]


def compile_policy(policy: TrafficPolicy) -> CompiledPolicy | None:
    """None when the policy is deleted or routes nothing."""
    if policy.deleted:
        return None
    routes = tuple(r for r in policy.routes if r.weight > 0)
    if not routes:
        return None
    cumulative: list[float] = []
    total = 0.0
    for r in routes:
        total += r.weight
        cumulative.append(total)
    return CompiledPolicy(
        endpoint=policy.endpoint,
        routes=routes,
        seeds=tuple(_h64(f"{r.model}:{r.version}") for r in routes),
        inv_weights=tuple(1.0 / r.weight for r in routes),
        cumulative=tuple(cumulative),
        sticky_key=policy.sticky_key,
        policy=policy,
    )
