"""Retirement's subcommands: `modelcd retirement` (run the processor), `modelcd expiring`, `modelcd gc`.

`modelcd models` belongs to ingest; the shell hands it `cmd_expiring` for `modelcd models --expiring`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelcd.events.schemas import ModelState, TrafficPolicy, UsageReport
from modelcd.settings import Settings
from modelcd.units import duration_arg

from . import policy


def register(sub: Any) -> None:
    p = sub.add_parser("retirement", help="run the retirement processor (faust worker) until Ctrl-C",
                       description="Track each model's last use from modelcd.usage, warn owners and retire models "
                                   "unused past their expiry. Several workers share the partitions.")
    p.set_defaults(func=cmd_retirement)

    p = sub.add_parser("expiring", help="list serving models by time to auto-retirement",
                       description="Target state from the store, last use from modelcd.usage and the store: each "
                                   "serving model "
                                   "with when it will be warned and retired if it stays unused.")
    p.add_argument("--limit", type=int, default=0, help="show only the first N (soonest) models")
    p.add_argument("--json", action="store_true", help="print JSON (times as epoch seconds)")
    p.set_defaults(func=cmd_expiring)

    p = sub.add_parser("gc", help="delete retired packages and orphaned uploads from the store",
                       description="Delete packages that only retired models refer to, once retired for "
                                   "MODELCD_GC_RETENTION seconds (or --retention), and staged uploads whose "
                                   "deployment ended, was never accepted, or was accepted more than "
                                   "MODELCD_UPLOAD_RETENTION seconds ago. --dry-run deletes nothing.")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help="print JSON: each package with the models that used it")
    p.add_argument("--retention", type=duration_arg,
                   help="how long a retired package is kept, e.g. 1h, 7d (default MODELCD_GC_RETENTION)")
    p.set_defaults(func=cmd_gc)


def cmd_retirement(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runner import run_main

    from .service import run_retirement

    async def run(stop: asyncio.Event) -> int:
        await run_retirement(settings, stop=stop, ready=asyncio.Event())
        return 0

    return run_main(run)


@dataclass(frozen=True, slots=True)
class ExpiringRow:
    model: str
    version: str
    owner: str
    last_used: float
    retire_at: float
    status: str  # "", "warning", "overdue", or the protections that keep it
    warn_at: float = 0.0  # when the owner is warned if it stays unused


def expiring(states: Iterable[ModelState], usage: Iterable[UsageReport], traffic: Mapping[str, TrafficPolicy],
             now: float, warn_share: float, remembered: Mapping[str, Mapping[str, Any]] | None = None,
             ) -> list[ExpiringRow]:
    """Serving models with an expiry, soonest retirement first (pure: the command feeds it). `remembered`:
    {name: {version: LastUse}} the retirement processor wrote to the store (last use beyond what the usage
    topic still holds, and since when its table tracks the version), so the view agrees with its decisions."""
    last: dict[str, float] = {}
    tracked: dict[str, float] = {}
    for name, versions in (remembered or {}).items():
        for version, kept in versions.items():
            last[f"{name}:{version}"] = kept.last_used
            tracked[f"{name}:{version}"] = kept.tracked_since
    for u in usage:
        key = f"{u.model}:{u.version}"
        last[key] = max(last.get(key, 0.0), u.last_used)
    protected: dict[str, list[str]] = {}
    for p in traffic.values():
        view = policy.on_traffic(None, p)
        for key, reasons in policy.endpoint_protections(view).items():
            protected.setdefault(key, []).extend(reasons)
    rows = []
    for s in states:
        if s.target != "serving" or s.expiry_seconds <= 0:
            continue
        rec = policy.on_usage(policy.on_state(None, s, tracked.get(f"{s.name}:{s.version}", 0.0)), UsageReport(
            model=s.name, version=s.version, node="", interval_start=0, interval_end=0, count=0,
            last_used=last.get(f"{s.name}:{s.version}", 0.0)))
        reason = policy.protection_reason(rec, protected.get(f"{s.name}:{s.version}", []))
        if reason:
            status = f"kept: {reason}"
        elif now >= rec.retire_at:
            status = "overdue"
        elif now >= rec.warn_at(warn_share):
            status = "warning"
        else:
            status = ""
        rows.append(ExpiringRow(s.name, s.version, s.owner, rec.last_used, rec.retire_at, status,
                                rec.warn_at(warn_share)))
    return sorted(rows, key=lambda r: (r.retire_at, r.model, r.version))


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_expiring(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events.bus import KafkaConfig, read_topic
    from modelcd.events.topics import USAGE
    from modelcd.runner import run_main
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    async def run(stop: asyncio.Event) -> int:
        async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
            targets = TargetState(store)
            states, traffic, remembered = await targets.models(), await targets.traffic(), await targets.last_uses()
        usage = [e for e, _env, _r in await read_topic(KafkaConfig.from_settings(settings), USAGE)
                 if isinstance(e, UsageReport)]
        now = time.time()
        rows = expiring(states, usage, traffic, now, settings.retirement_warn_share, remembered)
        limit = getattr(args, "limit", 0)  # `modelcd models --expiring` has no --limit
        if limit:
            rows = rows[:limit]
        if getattr(args, "json", False):
            print(json.dumps([{"model": r.model, "version": r.version, "owner": r.owner, "last_used": r.last_used or None,
                               "warn_at": r.warn_at, "retire_at": r.retire_at, "status": r.status} for r in rows],
                             indent=2))
            return 0
        if not rows:
            print("no serving model has an expiry", file=sys.stderr)
            return 0
        print(f"{'NAME':<20} {'VERSION':<10} {'OWNER':<16} {'LAST USED':>10} {'WARNED IN':>10} {'RETIRES IN':>10}  "
              "STATUS")
        for r in rows:
            used = f"{_ago(now - r.last_used)} ago" if r.last_used else "never"
            warn = _ago(r.warn_at - now) if r.warn_at > now else "now"
            left = _ago(r.retire_at - now) if r.retire_at > now else "now"
            print(f"{r.model:<20} {r.version:<10} {r.owner or '-':<16} {used:>10} {warn:>10} {left:>10}  {r.status}")
        return 0

    return run_main(run)


def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runner import run_main
    from modelcd.store.blobs import open_store

    from .gc import run_gc, run_gc_uploads

    retention = settings.gc_retention if args.retention is None else args.retention

    async def run(stop: asyncio.Event) -> int:
        async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
            plan = await run_gc(store, now=time.time(), retention=retention, dry_run=args.dry_run)
            uploads = await run_gc_uploads(store, now=time.time(), retention=settings.upload_retention,
                                           dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        if args.json:
            print(json.dumps([{"key": i.key, "sha256": i.sha256, "models": list(i.models), "retired_at": i.retired_at,
                               "deleted": not args.dry_run} for i in plan], indent=2))
            return 0
        for item in plan:
            print(f"{verb} {item.key}  (retired: {', '.join(item.models)}, {_ago(time.time() - item.retired_at)} ago)")
        for upload in uploads:
            print(f"{verb} {upload.key}  (staged upload: {upload.reason})")
        print(f"{verb} {len(plan)} package(s) and {len(uploads)} staged upload(s); retention {_ago(retention)}, "
              f"uploads {_ago(settings.upload_retention)}", file=sys.stderr)
        return 0

    return run_main(run)
