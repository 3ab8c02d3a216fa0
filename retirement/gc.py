"""Garbage collection of retired packages: plan (pure) and apply (store I/O).

Rules, in order:
- only packages that some retired target refers to are candidates: a package no target
  names (an upload whose deployment failed, say) is left alone, since nothing says it is done;
- a package any non-retired target still refers to (another version, or a redeploy of
  the same content) is kept: packages are content-addressed and shared;
- a candidate goes once its latest retirement is `retention` seconds old.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelcd.events.schemas import ModelState
from modelcd.logs import get_logger

if TYPE_CHECKING:
    from modelcd.store.blobs import Store

log = get_logger("modelcd.retirement.gc")

_PACKAGE_KEY = re.compile(r"^packages/[0-9a-f]{2}/(?P<sha>[0-9a-f]{64})\.tar$")


@dataclass(frozen=True, slots=True)
class GcItem:
    """One package to delete, and why."""

    key: str
    sha256: str
    models: tuple[str, ...]  # the retired name:version that used it
    retired_at: float


def plan_gc(targets: Iterable[ModelState], package_keys: Iterable[str], now: float,
            retention: float) -> list[GcItem]:
    """The packages to delete, sorted by key."""
    in_use: set[str] = set()
    retired: dict[str, tuple[float, list[str]]] = {}
    for t in targets:
        if not t.sha256:
            continue
        if t.target != "retired":
            in_use.add(t.sha256)
            continue
        at, models = retired.get(t.sha256, (0.0, []))
        retired[t.sha256] = (max(at, t.at), [*models, f"{t.name}:{t.version}"])
    out = []
    for key in sorted(package_keys):
        m = _PACKAGE_KEY.match(key)
        if m is None:
            continue
        sha = m["sha"]
        if sha in in_use or sha not in retired:
            continue
        at, models = retired[sha]
        if now - at >= retention:
            out.append(GcItem(key=key, sha256=sha, models=tuple(sorted(models)), retired_at=at))
    return out


async def run_gc(store: Store, *, now: float, retention: float, dry_run: bool) -> list[GcItem]:
    """Plan against `store` (an ingest Store) and delete unless `dry_run`; returns the plan."""
    from modelcd.store.targets import TargetState

    targets = await TargetState(store).models()
    keys = await store.list("packages/")
    plan = plan_gc(targets, keys, now, retention)
    for item in plan:
        if not dry_run:
            await store.delete(item.key)
        # debug: `modelcd gc` prints each package itself (at info, a terminal showed every package twice)
        log.debug("package garbage-collected" if not dry_run else "package would be garbage-collected",
                  key=item.key, models=list(item.models), retired_at=item.retired_at)
    return plan
