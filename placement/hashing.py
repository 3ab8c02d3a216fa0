"""Weighted rendezvous (highest-random-weight) hashing. Pure.

Each (node, key) pair gets a pseudo-random score from a stable hash; a key is owned by the R
nodes with the highest scores. Weighted: score = -w / ln(u) with u uniform in (0, 1), so a node
of weight w wins a share of keys proportional to w (Schindelhauer & Schomaker's logarithmic method).

Invariants (tested as properties):
- deterministic: the answer depends only on the key, the member names and weights, and R;
- minimal movement: adding a node changes a key's owners only by putting the new node in them
  (one owner out, the new node in); removing a node changes only the keys it owned (it is replaced
  by the next-best node); every other key keeps its owners;
- R is capped at the number of members: with fewer nodes than replicas, every node owns the key.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

_SCALE = float(1 << 64)


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """A node that takes a share of the fleet's models, in proportion to its weight (its memory budget)."""

    node: str
    weight: float = 1.0


def score(node: str, key: str, weight: float = 1.0) -> float:
    """The node's bid for the key: higher wins. Weights <= 0 never win against a positive weight."""
    if weight <= 0:
        return -math.inf
    digest = hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _SCALE  # in (0, 1), never 0 nor 1
    return -weight / math.log(u)


def owners(key: str, members: Iterable[Member], replicas: int) -> list[str]:
    """The nodes that hold `key`, best first: the `replicas` highest bids (all members when fewer)."""
    ranked = sorted(members, key=lambda m: (score(m.node, key, m.weight), m.node), reverse=True)
    return [m.node for m in ranked[:max(1, replicas)]]
