"""Which models must sit on the same nodes. Pure.

A node answers an endpoint by picking one of its routes, and runs a shadow beside its primary, so
every model an endpoint routes to or shadows must be on the nodes that answer it. Models are
therefore placed by *group*: the connected components of the graph whose vertices are model names
and endpoint names, linked by each traffic policy (endpoint - route models - shadow models). All
versions of one name share the name's group, so a version swap (load the new, then unload the old)
and a traffic split between versions stay on one node.

A group's key is its smallest name: stable while the group is unchanged, and the same on every node.
"""

from __future__ import annotations

from collections.abc import Iterable

from modelcd.events.schemas import TrafficPolicy


def _name(ref: str) -> str:
    """'iris:2' -> 'iris' (shadow relations name `name` or `name:version`)."""
    return ref.partition(":")[0]


def groups(names: Iterable[str], policies: Iterable[TrafficPolicy]) -> dict[str, str]:
    """{model or endpoint name: its group's key} for every name given or named by a live policy."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo  # the root is the smallest name: the key does not depend on the order of unions

    for n in names:
        find(n)
    for p in policies:
        if p.deleted:
            continue
        linked = [p.endpoint, *(r.model for r in p.routes)]
        for s in p.shadows:
            linked += [_name(s.primary), _name(s.shadow)]
        for other in linked[1:]:
            union(linked[0], other)
    return {n: find(n) for n in list(parent)}
