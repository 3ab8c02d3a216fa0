"""Package garbage collection and the `expiring` view: pure plans, then a LocalStore."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from modelcd.events.schemas import ModelState, Route, TrafficPolicy, UsageReport
from modelcd.retirement.cli import expiring
from modelcd.retirement.gc import plan_gc, run_gc
from modelcd.store.blobs import LocalStore, package_key
from modelcd.store.targets import TargetState

NOW = 10_000_000.0
DAY = 86400.0


def sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def target(name: str, version: str, content: str, target: str, at: float) -> ModelState:
    return ModelState(name=name, version=version, target=target, sha256=sha(content), at=at,  # type: ignore[arg-type]
                      owner="ann", expiry_seconds=3600, deployed_at=at - 10 * DAY)


def targets(now: float) -> list[ModelState]:
    return [
        target("old", "1", "old-pkg", "retired", now - 10 * DAY),  # retired long ago, unshared: goes
        target("recent", "1", "recent-pkg", "retired", now - DAY),  # inside retention: stays
        target("shared", "1", "shared-pkg", "retired", now - 10 * DAY),  # same package as a serving version: stays
        target("shared", "2", "shared-pkg", "serving", now - 10 * DAY),
        target("live", "1", "live-pkg", "serving", now - 10 * DAY),
    ]


TARGETS = targets(NOW)
KEYS = [package_key(sha(c)) for c in ("old-pkg", "recent-pkg", "shared-pkg", "live-pkg", "orphan-pkg")]


def test_plan_removes_only_unreferenced_packages_past_retention() -> None:
    """Only the package that only a long-retired model used is planned for deletion."""
    plan = plan_gc(TARGETS, KEYS, NOW, retention=7 * DAY)
    assert [(i.key, i.models) for i in plan] == [(package_key(sha("old-pkg")), ("old:1",))]


async def seed(tmp_path: Path, states: list[ModelState] = TARGETS) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    target_state = TargetState(store)
    for t in states:
        await target_state.put_model(t)
    for k in KEYS:
        await store.put(k, b"package bytes")
    return store


async def test_gc_deletes_from_store_and_dry_run_deletes_nothing(tmp_path: Path) -> None:
    """A dry run leaves every package; a real run deletes exactly the planned one."""
    store = await seed(tmp_path)
    dry = await run_gc(store, now=NOW, retention=7 * DAY, dry_run=True)
    assert len(dry) == 1 and sorted(await store.list("packages/")) == sorted(KEYS)
    done = await run_gc(store, now=NOW, retention=7 * DAY, dry_run=False)
    assert done == dry
    assert sorted(await store.list("packages/")) == sorted(k for k in KEYS if k != dry[0].key)


def test_expiring_sorts_by_time_to_retirement_with_status() -> None:
    """Serving models are listed soonest first; last use comes from usage; protections are shown."""
    states = [
        ModelState(name="a", version="1", target="serving", expiry_seconds=100, deployed_at=NOW - 90),
        ModelState(name="b", version="1", target="serving", expiry_seconds=100, deployed_at=NOW - 90),
        ModelState(name="c", version="1", target="serving", expiry_seconds=100, deployed_at=NOW - 500),
        ModelState(name="d", version="1", target="retired", expiry_seconds=100, deployed_at=NOW - 500),
    ]
    usage = [UsageReport(model="b", version="1", node="n", interval_start=0, interval_end=0, count=1,
                         last_used=NOW - 5)]
    traffic = {"ep": TrafficPolicy(endpoint="ep", routes=[Route(model="c", version="1", weight=100.0)])}
    rows = expiring(states, usage, traffic, NOW, warn_share=0.8)
    assert [(r.model, r.status) for r in rows] == [
        ("c", "kept: serves 100% of endpoint ep"), ("a", "warning"), ("b", "")]


def test_gc_command_dry_run_then_real(tmp_path: Path) -> None:
    """`modelcd gc --dry-run` prints the package and keeps it; `modelcd gc` deletes it."""
    store = asyncio.run(seed(tmp_path, targets(time.time())))  # the command reads the wall clock
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_STORE_URL=str(tmp_path / "store"), MODELCD_HOME=str(tmp_path), MODELCD_LOG_LEVEL="warning")

    def gc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "modelcd", "gc", *args], env=env, capture_output=True,
                              text=True, check=True, timeout=60).stdout

    out = gc("--dry-run")
    assert out.count("would delete packages/") == 1 and "old:1" in out
    assert len(asyncio.run(store.list("packages/"))) == len(KEYS)
    assert gc().count("deleted packages/") == 1
    assert len(asyncio.run(store.list("packages/"))) == len(KEYS) - 1
