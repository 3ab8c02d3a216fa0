"""Garbage collection of retired packages: plan (pure) and apply (store I/O).

Rules, in order:
- only packages that some retired target refers to are candidates: a package no target
  names (an upload whose deployment failed, say) is left alone, since nothing says it is done;
- a package any non-retired target still refers to (another version, or a redeploy of
  the same content) is kept: packages are content-addressed and shared;
- a candidate goes once its latest retirement is `retention` seconds old.

Staged uploads (`uploads/<deployment id>.tar`) are collected too, so none is orphaned:
- an upload whose deployment ended (its record exists) goes: the pipeline deletes it at the
  end, so it outlived a crash between the two;
- an upload whose request is on record as accepted (`requests/<id>.json`) is in flight: it goes
  only once accepted `upload_retention` seconds ago (ingest then fails the deployment, saying
  its package is gone, when it resumes it);
- an upload with neither was never accepted (the API writes the request first, and deletes
  both when it cannot publish): it goes.
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


@dataclass(frozen=True, slots=True)
class UploadItem:
    """One staged upload to delete, and why."""

    key: str
    deployment_id: str
    reason: str


def plan_uploads(upload_keys: Iterable[str], ended: set[str], accepted_at: dict[str, float], now: float,
                 retention: float) -> list[UploadItem]:
    """The staged uploads to delete, sorted by key (pure: `ended` ids have a record, `accepted_at` a request)."""
    from modelcd.store.targets import id_of

    out = []
    for key in sorted(upload_keys):
        deployment_id = id_of(key)
        if deployment_id in ended:
            out.append(UploadItem(key, deployment_id, "its deployment ended"))
        elif deployment_id in accepted_at:
            age = now - accepted_at[deployment_id]
            if age >= retention:
                out.append(UploadItem(key, deployment_id, f"accepted {age:.0f} s ago and never ended"))
        else:
            out.append(UploadItem(key, deployment_id, "no deployment was accepted for it"))
    return out


async def run_gc_uploads(store: Store, *, now: float, retention: float, dry_run: bool) -> list[UploadItem]:
    """Plan the staged uploads of `store` and delete unless `dry_run`; returns the plan."""
    import msgspec

    from modelcd.store.blobs import StoreNotFound
    from modelcd.store.targets import UPLOAD_PREFIX, id_of, record_key, request_key

    keys = await store.list(UPLOAD_PREFIX)
    ended: set[str] = set()
    accepted_at: dict[str, float] = {}
    for key in keys:
        deployment_id = id_of(key)
        if await store.exists(record_key(deployment_id)):
            ended.add(deployment_id)
            continue
        try:
            raw = msgspec.json.decode(await store.get(request_key(deployment_id)))
        except StoreNotFound:
            continue
        except msgspec.DecodeError:
            raw = {}
        # An unreadable request still says "in flight": count its age from now, never from zero.
        accepted_at[deployment_id] = float(raw.get("accepted_at", now)) if isinstance(raw, dict) else now
    plan = plan_uploads(keys, ended, accepted_at, now, retention)
    for item in plan:
        if not dry_run:
            await store.delete(item.key)
        log.info("upload garbage-collected" if not dry_run else "upload would be garbage-collected",
                 key=item.key, deployment_id=item.deployment_id, reason=item.reason)
    return plan
