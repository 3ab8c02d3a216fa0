"""Uploads never orphan: `modelcd gc` collects staged uploads whose deployment ended, was never accepted, or was
accepted longer ago than MODELCD_UPLOAD_RETENTION, and leaves the ones in flight."""

from __future__ import annotations

import json
from pathlib import Path

from modelcd.retirement.gc import plan_uploads, run_gc_uploads
from modelcd.store.blobs import LocalStore


def test_plan_uploads_keeps_only_the_ones_in_flight() -> None:
    """Ended: delete; accepted recently: keep; accepted long ago: delete; never accepted: delete."""
    keys = ["uploads/ended.tar", "uploads/fresh.tar", "uploads/stale.tar", "uploads/orphan.tar"]
    plan = plan_uploads(keys, {"ended"}, {"fresh": 990.0, "stale": 0.0}, now=1000.0, retention=100.0)
    assert {i.deployment_id: i.reason for i in plan} == {
        "ended": "its deployment ended", "stale": "accepted 1000 s ago and never ended",
        "orphan": "no deployment was accepted for it"}


async def test_gc_sees_the_store_uploads(tmp_path: Path) -> None:
    """On a real store: the plan is carried out, and the upload in flight and every record stay."""
    store = LocalStore(tmp_path)
    for name in ("ended", "fresh", "stale", "orphan"):
        await store.put(f"uploads/{name}.tar", b"archive")
    await store.put("deployments/ended.json", b"{}")
    await store.put("requests/fresh.json", json.dumps({"accepted_at": 990.0}).encode())
    await store.put("requests/stale.json", json.dumps({"accepted_at": 0.0}).encode())
    dry = await run_gc_uploads(store, now=1000.0, retention=100.0, dry_run=True)
    assert len(dry) == 3 and len(await store.list("uploads/")) == 4
    await run_gc_uploads(store, now=1000.0, retention=100.0, dry_run=False)
    assert await store.list("uploads/") == ["uploads/fresh.tar"]
    assert await store.list("requests/") == ["requests/fresh.json", "requests/stale.json"]
