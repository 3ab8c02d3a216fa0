"""`modelcd shadow add|list|remove|report|compare`.

add/remove are a read-modify-write of the endpoint's TrafficPolicy: read it from the store's
target state, edit it (shadow/relations.py), write it back (the store is the source of truth),
then publish it on `modelcd.traffic` (the fast path the serving nodes follow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from modelcd.events.schemas import ShadowComparison, TrafficPolicy
from modelcd.runner import run_main
from modelcd.settings import Settings

from .relations import RelationError, add_relation, describe_criterion, make_relation, remove_relation, status


def register(sub: Any) -> None:
    p = sub.add_parser("shadow", help="shadow models on live traffic and compare them with their primaries",
                       description="A shadow receives a sample of its primary's live traffic; its answers never reach "
                                   "the caller, they are published to modelcd.shadow-predictions and compared in "
                                   "windows (modelcd.shadow-comparisons).")
    ssub = p.add_subparsers(dest="shadow_command", metavar="ACTION", required=True)

    a = ssub.add_parser("add", help="shadow PRIMARY's traffic with SHADOW (name:version)",
                        description="Add (or replace) a shadow relation in an endpoint's traffic policy.",
                        epilog="Example: modelcd shadow add iris iris:2 --rate 0.1 --until 14d "
                               "--where 'header:x-country=DE' --where 'input:sepal_length>=5'")
    a.add_argument("primary", help="primary model name (any version) or name:version")
    a.add_argument("shadow", help="shadow model name:version")
    a.add_argument("--endpoint", help="endpoint whose policy holds the relation (default: the primary's name)")
    a.add_argument("--rate", type=float, default=1.0, help="share of the matching traffic to shadow (default 1.0)")
    a.add_argument("--from", dest="start", default=None, help="start: ISO time or duration from now (default: now)")
    a.add_argument("--until", default="14d",
                   help="end: duration from now (14d, 12h), ISO time, or 'never' (default 14d: it stops by itself)")
    a.add_argument("--where", action="append", default=[], metavar="CRITERION",
                   help="only requests where FIELD OP VALUE holds (repeatable, all must hold); FIELD is "
                        "header:<name>, param:<name> or input:<name>; OP is = != > >= < <= in exists")
    a.set_defaults(func=cmd_add)

    r = ssub.add_parser("remove", help="stop shadowing PRIMARY with SHADOW")
    r.add_argument("primary")
    r.add_argument("shadow")
    r.add_argument("--endpoint", help="endpoint whose policy holds the relation (default: every one that has it)")
    r.set_defaults(func=cmd_remove)

    li = ssub.add_parser("list", help="list shadow relations (endpoint, primary, shadow, rate, window, criteria)")
    li.add_argument("--all", action="store_true", help="include ended relations")
    li.add_argument("--json", action="store_true", help="print JSON (times as epoch seconds)")
    li.set_defaults(func=cmd_list)

    rep = ssub.add_parser("report", help="the latest windowed comparisons of PRIMARY with its shadows, as a table")
    rep.add_argument("primary", help="primary model name or name:version")
    rep.add_argument("--windows", type=int, default=1, help="windows per pair, newest first (default 1)")
    rep.add_argument("--json", action="store_true", help="print the comparisons as JSON (ShadowComparison events)")
    rep.add_argument("--output", metavar="NAME",
                     help="compare this output (e.g. probabilities of a classifier, whose label alone gives no "
                          "differences): recomputed from modelcd.shadow-predictions over MODELCD_COMPARISON_WINDOW "
                          "windows instead of read from the comparison processor's results")
    rep.set_defaults(func=cmd_report)

    c = ssub.add_parser("compare", help="run the comparison stream processor until Ctrl-C "
                                        "(window: MODELCD_COMPARISON_WINDOW)")
    c.set_defaults(func=cmd_compare)


def _fail(message: str, code: int = 1) -> Exception:
    """Refused (1), or with code=2 a usage error: what was typed cannot be a relation."""
    from modelcd.errors import CliError

    return CliError(message, code=code)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


async def _save(settings: Settings, targets: Any, policy: TrafficPolicy) -> None:
    from modelcd.events.bus import KafkaConfig, Publisher

    # Bus first, then store, like `traffic set` and the API: a broker that refuses changes nothing.
    async with Publisher(KafkaConfig.from_settings(settings), source="cli") as pub:
        await pub.publish(policy)
    await targets.put_traffic(policy)


def _targets(settings: Settings) -> Any:
    from modelcd.store.blobs import open_store

    return open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url)


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.store.safety import World
    from modelcd.store.targets import TargetState

    now = time.time()
    try:
        relation = make_relation(args.primary, args.shadow, now=now, sample_rate=args.rate, start=args.start or None,
                                 end=args.until, where=args.where)
    except RelationError as exc:
        raise _fail(str(exc), code=2) from None
    endpoint = args.endpoint or args.primary.partition(":")[0]

    async def run(stop: asyncio.Event) -> int:
        async with _targets(settings) as store:
            targets = TargetState(store)
            world = World(models={f"{m.name}:{m.version}": m for m in await targets.models()})
            try:
                policy = add_relation(await targets.get_traffic(endpoint), endpoint, relation, now=now, world=world)
            except RelationError as exc:  # a version that does not serve is refused; bad input is usage
                raise _fail(str(exc), code=1 if exc.kind == "conflict" else 2) from None
            await _save(settings, targets, policy)
        crit = "; ".join(describe_criterion(c) for c in relation.criteria) or "all requests"
        print(f"{relation.shadow} shadows {relation.primary} on endpoint {endpoint}: {relation.sample_rate:.0%} of "
              f"{crit}, until {_fmt_time(relation.end)} (policy revision {policy.revision})")
        return 0

    return run_main(run)


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.store.targets import TargetState

    async def run(stop: asyncio.Event) -> int:
        now = time.time()
        async with _targets(settings) as store:
            targets = TargetState(store)
            if args.endpoint:
                found = await targets.get_traffic(args.endpoint)
                policies = [found] if found else []
            else:
                policies = list((await targets.traffic()).values())
            changed = 0
            for policy in policies:
                new = remove_relation(policy, args.primary, args.shadow, now=now)
                if new is not None:
                    await _save(settings, targets, new)
                    changed += 1
                    print(f"removed: {args.shadow} no longer shadows {args.primary} (endpoint {policy.endpoint})")
        if not changed:
            raise _fail(f"no shadow relation {args.primary} -> {args.shadow}"
                        + (f" on endpoint {args.endpoint}" if args.endpoint else "")
                        + "; `modelcd shadow list` shows the existing ones")
        return 0

    return run_main(run)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.store.targets import TargetState

    async def run(stop: asyncio.Event) -> int:
        now = time.time()
        async with _targets(settings) as store:
            policies = await TargetState(store).traffic()
        rows = []
        found = []
        for endpoint, policy in sorted(policies.items()):
            if policy.deleted:
                continue
            for rel in policy.shadows:
                st = status(rel, now)
                if st == "ended" and not args.all:
                    continue
                found.append({"endpoint": endpoint, **msgspec.to_builtins(rel), "status": st})
                rows.append([endpoint, rel.primary, rel.shadow, f"{rel.sample_rate:.0%}", _fmt_time(rel.start),
                             _fmt_time(rel.end), st,
                             "; ".join(describe_criterion(c) for c in rel.criteria) or "-"])
        if getattr(args, "json", False):
            print(json.dumps(found, indent=2))
            return 0
        if not rows:
            print("no shadow relations (add one with `modelcd shadow add PRIMARY SHADOW`)")
            return 0
        print(table(rows, ["ENDPOINT", "PRIMARY", "SHADOW", "RATE", "FROM", "UNTIL", "STATUS", "WHERE"]))
        return 0

    return run_main(run)


def latest_comparisons(events: Sequence[ShadowComparison], primary: str, windows: int = 1) -> list[ShadowComparison]:
    """The newest `windows` comparisons of each of `primary`'s pairs (last write per window wins)."""
    by_window: dict[tuple[str, str, float], ShadowComparison] = {}
    for c in events:
        name = c.primary.partition(":")[0]
        if primary not in (c.primary, name):
            continue
        by_window[(c.primary, c.shadow, c.window_start)] = c
    per_pair: dict[tuple[str, str], list[ShadowComparison]] = {}
    for (p, s, _), c in by_window.items():
        per_pair.setdefault((p, s), []).append(c)
    out = []
    for pair in sorted(per_pair):
        out.extend(sorted(per_pair[pair], key=lambda c: c.window_start, reverse=True)[:windows])
    return out


def report_table(comparisons: Sequence[ShadowComparison]) -> str:
    def num(v: float | None, fmt: str = "{:.4g}") -> str:
        return "-" if v is None else fmt.format(v)

    def lat(d: dict[str, float]) -> str:
        return "/".join(num(d.get(k), "{:.1f}") for k in ("p50", "p90", "p99")) if d else "-"

    rows = [[c.primary, c.shadow, _fmt_time(c.window_start), f"{c.window_end - c.window_start:g}s", str(c.count),
             str(c.errors), num(c.agreement, "{:.1%}"), num(c.mean_abs_diff), num(c.max_abs_diff),
             lat(c.primary_latency_ms), lat(c.shadow_latency_ms)] for c in comparisons]
    return table(rows, ["PRIMARY", "SHADOW", "WINDOW", "LEN", "COUNT", "ERRORS", "AGREEMENT", "MEAN|DIFF|",
                        "MAX|DIFF|", "PRIMARY ms p50/90/99", "SHADOW ms p50/90/99"])


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events.bus import KafkaConfig, read_topic
    from modelcd.events.topics import SHADOW_COMPARISONS

    async def run(stop: asyncio.Event) -> int:
        cfg = KafkaConfig.from_settings(settings)
        if args.output:
            from modelcd.events.schemas import ShadowPrediction
            from modelcd.events.topics import SHADOW_PREDICTIONS

            from .comparison import compare_windows

            name = args.primary.partition(":")[0]
            predictions = [e for e, _env, _r in await read_topic(cfg, SHADOW_PREDICTIONS)
                           if isinstance(e, ShadowPrediction) and e.primary_model == name]
            events = compare_windows(predictions, settings.comparison_window, output=args.output)
        else:
            records = await read_topic(cfg, SHADOW_COMPARISONS)
            events = [e for e, _env, _r in records if isinstance(e, ShadowComparison)]
        latest = latest_comparisons(events, args.primary, args.windows)
        if getattr(args, "json", False):
            print(json.dumps(msgspec.to_builtins(latest), indent=2))
            return 0 if latest else 1
        if not latest:
            print(f"no comparisons for {args.primary} yet: is a shadow configured (`modelcd shadow list`) and "
                  "the comparison processor running (`modelcd up` or `modelcd shadow compare`)? "
                  "A window is reported once it closes (MODELCD_COMPARISON_WINDOW).", file=sys.stderr)
            return 1
        print(report_table(latest))
        return 0

    return run_main(run)


def cmd_compare(args: argparse.Namespace, settings: Settings) -> int:
    from .comparison import run_comparison

    async def run(stop: asyncio.Event) -> int:
        ready = asyncio.Event()
        await run_comparison(settings, stop=stop, ready=ready)
        return 0

    return run_main(run)
