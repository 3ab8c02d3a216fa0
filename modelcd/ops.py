"""Ops commands on the bus and the store: `replay`, `tail`, `topics list`, `logs export`, `state check`.

They read topics raw (events/records.py) and decode here, so nothing is dropped silently: a record
that does not decode is reported on stderr with its partition, offset and reason, and counted in
the summary line. Writing into a topic modelcd acts on (model-state, traffic, deploy-requests)
needs `--force`: nodes, ingest and the rollout controller would act on the replayed events.

Pure parts (filters, the prediction-log frame, the state comparison) are plain functions tested
without a broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from modelcd.errors import CliError
from modelcd.runner import run_main
from modelcd.settings import Settings
from modelcd.units import duration_arg

# Topics whose events modelcd components act on: replaying into them changes what is served.
LIVE_TOPICS = ("modelcd.model-state", "modelcd.traffic", "modelcd.deploy-requests")


def register(sub: Any) -> None:
    """`replay`, `tail`, `logs`, `state` (and `topics list`, added to `topics` by the shell)."""
    p = sub.add_parser(
        "replay", help="read a topic (or a dump file) and print, save or re-publish its events",
        description="Read TOPIC from the beginning (or --from-file DUMP), filter by time, offset, key or type, and "
                    "print one decoded event per line (default), write a lossless dump (--out FILE: keys, values "
                    "and headers byte for byte) or publish the records into another topic (--to TOPIC). Records "
                    "that cannot be decoded are reported on stderr and counted, never dropped silently.",
        epilog="Examples: modelcd replay modelcd.deployments --since 1h --type DeploymentFailed; "
               "modelcd replay modelcd.traffic --out traffic.jsonl; "
               "modelcd replay --from-file traffic.jsonl --to modelcd.traffic --force")
    p.add_argument("topic", nargs="?", help="topic to read, e.g. modelcd.model-state (with --from-file: a filter)")
    p.add_argument("--from-file", type=Path, metavar="DUMP", help="read records from a dump written by --out")
    p.add_argument("--since", type=duration_arg, metavar="DURATION",
                   help="only records written in the last DURATION (5m, 1h, 7d; scans, so it works on any broker)")
    p.add_argument("--offset", type=int, help="start at this offset on every partition (see --partition)")
    p.add_argument("--partition", type=int, action="append", help="only this partition (repeatable)")
    p.add_argument("--key", action="append", help="only records with this key (repeatable)")
    p.add_argument("--type", action="append", dest="types", metavar="TYPE",
                   help="only events of this type: ce_type or class name, e.g. DeploymentFailed (repeatable)")
    p.add_argument("--state", action="store_true", help="only the last event per key (state topics)")
    p.add_argument("--limit", type=int, default=0, help="stop after N records (0: no limit)")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--out", type=Path, metavar="FILE", help="write a lossless dump (JSON lines: topic, partition, offset, timestamp, key, value, "
                           "headers) to FILE, or to stdout with '-'")
    dest.add_argument("--to", metavar="TOPIC", help="publish the records (keys, values, headers unchanged) to TOPIC "
                                                   "(any topic: a backup, another cluster's name for it)")
    p.add_argument("--force", action="store_true",
                   help=f"allow --to into a topic modelcd acts on ({', '.join(LIVE_TOPICS)})")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("tail", help="follow a topic and print each event as it arrives (decoded, JSON lines)",
                       description="Print each new event of TOPIC as one JSON line until Ctrl-C (or --count). "
                                   "Undecodable records are reported on stderr.")
    p.add_argument("topic", help="topic to follow, e.g. modelcd.deployments")
    p.add_argument("--from-beginning", action="store_true", help="start at the beginning instead of the end")
    p.add_argument("--key", action="append", help="only records with this key (repeatable)")
    p.add_argument("--type", action="append", dest="types", metavar="TYPE", help="only events of this type")
    p.add_argument("--count", type=int, default=0, help="exit after N events (0: follow until Ctrl-C)")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("logs", help="prediction logs: export them for analysis")
    lsub = p.add_subparsers(dest="logs_command", metavar="ACTION", required=True)
    e = lsub.add_parser("export", help="write sampled prediction logs of every node to Parquet, CSV or JSON lines",
                        description="Read modelcd.predictions (every node's sampled logs) and write one row per "
                                    "prediction: request_id, model, version, endpoint, node, at (UTC), latency_ms, "
                                    "error, and input.<name> / output.<name> columns with the tensors' values. "
                                    "Parquet and CSV need the `analysis` extra (pandas, pyarrow).",
                        epilog="Example: modelcd logs export --since 1h --model iris --out logs.parquet")
    e.add_argument("--since", type=duration_arg, metavar="DURATION", help="only logs of the last DURATION (1h, 1d)")
    e.add_argument("--model", help="only this model")
    e.add_argument("--version", help="only this version")
    e.add_argument("--out", required=True, help="file to write: .parquet, .csv or .jsonl; '-' for JSON lines on stdout")
    e.add_argument("--no-shadowed", dest="shadowed", action="store_false",
                   help="leave out shadowed requests (a node logs those in modelcd.shadow-predictions, not in "
                        "modelcd.predictions; by default their primary answers are included, source=shadow)")
    e.set_defaults(func=cmd_logs_export)

    p = sub.add_parser("state", help="compare the target state the events describe with the store's")
    ssub = p.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    c = ssub.add_parser("check", help="print where modelcd.model-state / modelcd.traffic and the store differ",
                        description="Read the last event per key of modelcd.model-state and modelcd.traffic and the "
                                    "target state in the store, and print each difference. Exits 1 when they differ. "
                                    "--repair store writes the events' view into the store; --repair events "
                                    "publishes the store's view as events (the store is the source of truth).")
    c.add_argument("--repair", choices=["store", "events"], help="make this side match the other")
    c.add_argument("--json", action="store_true", help="print the differences as JSON")
    c.set_defaults(func=cmd_state_check)


def register_topics_list(topics_parser_sub: Any) -> None:
    t = topics_parser_sub.add_parser("list", help="list the broker's topics: partitions and the events each carries")
    t.add_argument("--all", action="store_true", help="also topics that are not modelcd's")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=cmd_topics_list)


# --- filters and decoding (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    since_ms: int | None = None
    keys: frozenset[str] | None = None
    types: frozenset[str] | None = None

    @classmethod
    def from_args(cls, since: float | None, keys: Sequence[str] | None, types: Sequence[str] | None,
                  *, now: float) -> Filter:
        return cls(since_ms=int((now - since) * 1000) if since is not None else None,
                   keys=frozenset(keys) if keys else None, types=_known_types(types) if types else None)

    def wants(self, record: Any, ce_type: str | None) -> bool:
        if self.since_ms is not None and record.timestamp_ms < self.since_ms:
            return False
        if self.keys is not None and (record.key or b"").decode(errors="replace") not in self.keys:
            return False
        return not (self.types is not None and ce_type not in self.types)


def _known_types(types: Sequence[str]) -> frozenset[str]:
    """ce_types for each TYPE given as a ce_type or a class name; CliError for one that names no event."""
    from modelcd.events.schemas import ALL_EVENTS

    by_name = {e.__name__.lower(): e.ce_type() for e in ALL_EVENTS}
    ce_types = {e.ce_type() for e in ALL_EVENTS}
    out = set()
    for t in types:
        if t in ce_types:
            out.add(t)
        elif t.lower() in by_name:
            out.add(by_name[t.lower()])
        else:
            raise CliError(f"unknown event type {t!r}; types: {', '.join(sorted(e.__name__ for e in ALL_EVENTS))}",
                           code=2)
    return frozenset(out)


def decode_record(record: Any, topic: str | None = None) -> tuple[Any, str | None, str | None]:
    """(event or None, its ce_type, the reason it could not be decoded or None)."""
    from modelcd.events.codec import DecodeError, decode

    try:
        event, env = decode(topic or record.topic, record.value, record.headers)
    except DecodeError as exc:
        return None, record.header("ce_type"), str(exc)
    return event, env.type, None


def _report(err: IO[str], record: Any, reason: str) -> None:
    err.write(f"modelcd: undecodable record {record.topic}[{record.partition}]@{record.offset}: {reason}\n")


def _check_topic(topic: str) -> None:
    from modelcd.events.schemas import TOPIC_EVENTS

    if topic not in TOPIC_EVENTS:
        raise CliError(f"unknown topic {topic!r}; modelcd's topics: {', '.join(TOPIC_EVENTS)}", code=2)


# --- replay ------------------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events import records as raw
    from modelcd.events.bus import KafkaConfig
    from modelcd.events.codec import to_json

    if args.from_file is None and not args.topic:
        raise CliError("name a topic to replay (e.g. modelcd.model-state) or --from-file DUMP", code=2)
    if args.topic:
        _check_topic(args.topic)
    if args.to:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", args.to):
            raise CliError(f"not a Kafka topic name: {args.to!r} (letters, digits, '.', '_', '-')", code=2)
        if args.to in LIVE_TOPICS and not args.force:
            raise CliError(f"refusing to publish into {args.to}: modelcd acts on its events (nodes load and unload, "
                           "ingest deploys, traffic moves); pass --force if that is what you want", code=1)
    if args.from_file is not None and not args.from_file.is_file():
        raise CliError(f"dump file not found: {args.from_file}", code=2)
    flt = Filter.from_args(args.since, args.key, args.types, now=time.time())
    cfg = KafkaConfig.from_settings(settings)
    err = sys.stderr

    async def source() -> Any:
        if args.from_file is not None:
            with args.from_file.open(encoding="utf-8") as f:
                try:
                    for rec in raw.load_lines(f):
                        if args.topic and rec.topic != args.topic:
                            continue
                        if args.partition and rec.partition not in args.partition:
                            continue
                        if args.offset is not None and rec.offset < args.offset:
                            continue
                        yield rec
                except ValueError as exc:
                    raise CliError(f"{args.from_file}: {exc}") from None
        else:
            async for rec in raw.scan(cfg, args.topic, offset=args.offset, partitions=args.partition):
                yield rec

    async def run(stop: asyncio.Event) -> int:
        kept: list[tuple[Any, Any]] = []  # (record, event or None)
        undecodable = 0
        async for rec in source():
            event, ce_type, reason = decode_record(rec)
            if not flt.wants(rec, ce_type):
                continue
            if reason is not None:
                undecodable += 1
                _report(err, rec, reason)
            kept.append((rec, event))
            if args.limit and len(kept) >= args.limit:
                break
        if args.state:
            last: dict[bytes | None, tuple[Any, Any]] = {}
            for rec, event in kept:
                last.pop(rec.key, None)
                last[rec.key] = (rec, event)
            kept = list(last.values())
        if args.out is not None and str(args.out) == "-":
            n = raw.write_dump(sys.stdout, (rec for rec, _ in kept))
            sys.stdout.flush()
            err.write(f"wrote {n} records ({undecodable} undecodable, kept as they were)\n")
        elif args.out is not None:
            with args.out.open("w", encoding="utf-8") as f:
                n = raw.write_dump(f, (rec for rec, _ in kept))
            err.write(f"wrote {n} records to {args.out} ({undecodable} undecodable, kept as they were)\n")
        elif args.to:
            n = await raw.produce(cfg, args.to, (rec for rec, _ in kept))
            err.write(f"published {n} records to {args.to} ({undecodable} undecodable, published as they were)\n")
        else:
            out = sys.stdout.buffer
            n = 0
            for _rec, event in kept:
                if event is not None:
                    out.write(to_json(event) + b"\n")
                    n += 1
            out.flush()
            if undecodable:
                err.write(f"modelcd: {n} events printed, {undecodable} undecodable records skipped (listed above; "
                          "`--out FILE` keeps them)\n")
        return 0

    return run_main(run)


# --- tail --------------------------------------------------------------------------------------------


def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events import records as raw
    from modelcd.events.bus import KafkaConfig
    from modelcd.events.codec import to_json

    _check_topic(args.topic)
    flt = Filter.from_args(None, args.key, args.types, now=time.time())
    cfg = KafkaConfig.from_settings(settings)

    async def follow() -> int:
        n = 0
        out = sys.stdout.buffer
        try:
            async for rec in raw.follow(cfg, args.topic, from_beginning=args.from_beginning):
                event, ce_type, reason = decode_record(rec)
                if not flt.wants(rec, ce_type):
                    continue
                if reason is not None:
                    _report(sys.stderr, rec, reason)
                    continue
                out.write(to_json(event) + b"\n")
                out.flush()
                n += 1
                if args.count and n >= args.count:
                    break
        except raw.TopicMissing:
            raise CliError(f"topic {args.topic} does not exist on {settings.bootstrap} yet: `modelcd topics create` "
                           "creates modelcd's topics (`modelcd up` does too)", code=2) from None
        return 0

    async def run(stop: asyncio.Event) -> int:
        task = asyncio.ensure_future(follow())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (task, stopper):
            if t not in done:
                t.cancel()
                try:
                    await t
                except asyncio.CancelledError:
                    pass
        return task.result() if task in done else 0

    return run_main(run)


# --- topics list -------------------------------------------------------------------------------------


def cmd_topics_list(args: argparse.Namespace, settings: Settings) -> int:
    import typing

    from aiokafka.admin import AIOKafkaAdminClient

    from modelcd.events.schemas import TOPIC_EVENTS
    from modelcd.events.topics import TOPICS

    async def run(stop: asyncio.Event) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id=f"{settings.kafka_client_id}-admin")
        await admin.start()
        try:
            names = sorted(await admin.list_topics())
            described = await admin.describe_topics(names) if names else []
        finally:
            await admin.close()
        partitions = {d["topic"]: len(d.get("partitions", ())) for d in described}
        rows = []
        for name in sorted(set(names) | set(TOPICS)):
            ours = name in TOPICS
            if not ours and not args.all:
                continue
            union = TOPIC_EVENTS.get(name)
            types = [m.ce_type() for m in (typing.get_args(union) or (union,))] if union is not None else []
            rows.append({"topic": name, "exists": name in partitions, "partitions": partitions.get(name, 0),
                         "cleanup": ("compact" if TOPICS[name].compacted else "delete") if ours else "",
                         "events": types})
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'TOPIC':32} {'PARTITIONS':>10}  {'CLEANUP':8} EVENTS")
        for r in rows:
            parts = str(r["partitions"]) if r["exists"] else "missing"
            print(f"{r['topic']:32} {parts:>10}  {r['cleanup']:8} {', '.join(r['events'])}")
        missing = [r["topic"] for r in rows if not r["exists"]]
        if missing:
            print(f"\n{len(missing)} modelcd topics do not exist yet: `modelcd topics create` creates them",
                  file=sys.stderr)
        return 0

    return run_main(run)


# --- logs export -------------------------------------------------------------------------------------


def shadowed_primaries(predictions: Iterable[Any]) -> list[Any]:
    """The primary side of shadowed requests as PredictionLogs (one per request; no inputs).

    A node does not log a request it shadows: its primary answer travels in the ShadowPrediction.
    Without these, a model shadowed at 100 % would have no prediction logs at all."""
    from modelcd.events.schemas import PredictionLog

    seen: set[tuple[str, str, str]] = set()
    out = []
    for p in predictions:
        key = (p.request_id, p.primary_model, p.primary_version)
        if key in seen:
            continue  # one request with several shadows
        seen.add(key)
        out.append(PredictionLog(request_id=p.request_id, model=p.primary_model, version=p.primary_version,
                                 node=p.node, outputs=p.primary_outputs, latency_ms=p.primary_latency_ms, at=p.at))
    return out


def log_rows(logs: Iterable[Any], *, source: str = "log") -> list[dict[str, Any]]:
    """One flat row per PredictionLog: ids, UTC time, latency, status, error, input.<name> / output.<name> values;
    `source` says where the row came from (log: modelcd.predictions, shadow: a shadowed request's primary)."""
    rows = []
    for log in logs:
        row: dict[str, Any] = {"request_id": log.request_id, "model": log.model, "version": log.version,
                               "endpoint": log.endpoint, "node": log.node, "at": log.at,
                               "latency_ms": log.latency_ms, "status": log.status, "error": log.error,
                               "source": source}
        for prefix, tensors in (("input", log.inputs), ("output", log.outputs)):
            for name, tensor in tensors.items():
                data = tensor.get("data", []) if isinstance(tensor, dict) else tensor
                row[f"{prefix}.{name}"] = data[0] if isinstance(data, list) and len(data) == 1 else data
        rows.append(row)
    return rows


def log_frame(rows: list[dict[str, Any]]) -> Any:
    """`log_rows` rows as a pandas DataFrame, `at` as a UTC timestamp, sorted by time."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=None if rows else ["request_id", "model", "version", "endpoint", "node",
                                                          "at", "latency_ms", "status", "error", "source"])
    frame["at"] = pd.to_datetime(frame["at"], unit="s", utc=True)
    return frame.sort_values("at", kind="stable").reset_index(drop=True)


def cmd_logs_export(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events import records as raw
    from modelcd.events.bus import KafkaConfig
    from modelcd.events.schemas import PredictionLog, ShadowPrediction

    topic = "modelcd.predictions"
    suffix = "" if args.out == "-" else Path(args.out).suffix.lower()
    if suffix not in ("", ".parquet", ".csv", ".jsonl", ".json"):
        raise CliError(f"cannot tell the format of {args.out!r}: name it .parquet, .csv or .jsonl (or '-')", code=2)
    if suffix in (".parquet", ".csv"):
        try:
            import pandas  # noqa: F401
            if suffix == ".parquet":
                import pyarrow  # noqa: F401
        except ImportError:
            raise CliError("writing Parquet or CSV needs pandas and pyarrow: pip install 'modelcd[analysis]' "
                           "(or use --out FILE.jsonl)", code=2) from None
    flt = Filter.from_args(args.since, None, None, now=time.time())
    cfg = KafkaConfig.from_settings(settings)

    async def run(stop: asyncio.Event) -> int:
        logs = []
        undecodable = 0
        async for rec in raw.scan(cfg, topic):
            if not flt.wants(rec, None):
                continue
            event, _type, reason = decode_record(rec)
            if reason is not None or not isinstance(event, PredictionLog):
                undecodable += 1
                _report(sys.stderr, rec, reason or "not a PredictionLog")
                continue
            if (args.model and event.model != args.model) or (args.version and event.version != args.version):
                continue
            logs.append(event)
        shadowed = []
        if args.shadowed:
            async for rec in raw.scan(cfg, "modelcd.shadow-predictions"):
                if not flt.wants(rec, None):
                    continue
                event, _type, reason = decode_record(rec)
                if not isinstance(event, ShadowPrediction):
                    continue  # reported by `modelcd replay modelcd.shadow-predictions`, not an export's business
                if (args.model and event.primary_model != args.model) or \
                        (args.version and event.primary_version != args.version):
                    continue
                shadowed.append(event)
        logged = {(e.request_id, e.model, e.version) for e in logs}
        extra = [e for e in shadowed_primaries(shadowed) if (e.request_id, e.model, e.version) not in logged]
        rows = sorted(log_rows(logs) + log_rows(extra, source="shadow"), key=lambda r: r["at"])
        if suffix in ("", ".jsonl", ".json"):
            text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
            if args.out == "-":
                sys.stdout.write(text)
            else:
                Path(args.out).write_text(text, encoding="utf-8")
        else:
            frame = log_frame(rows)
            if suffix == ".parquet":
                frame.to_parquet(args.out, index=False)
            else:
                frame.to_csv(args.out, index=False)
        where = "stdout" if args.out == "-" else args.out
        print(f"{len(logs)} prediction logs and {len(extra)} shadowed requests written to {where}"
              + (f" ({undecodable} undecodable records skipped)" if undecodable else ""), file=sys.stderr)
        return 0

    return run_main(run)


# --- state check -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One key whose state differs between the events and the store."""

    kind: str  # "model" or "endpoint"
    key: str
    events: Any  # the last event for the key, or None
    store: Any  # what the store holds, or None
    fields: tuple[str, ...]  # fields that differ (empty when one side is missing)

    def describe(self) -> str:
        if self.store is None:
            return f"{self.kind} {self.key}: in the events ({_brief(self.events)}), missing from the store"
        if self.events is None:
            return f"{self.kind} {self.key}: in the store ({_brief(self.store)}), no event on the topic"
        shown = ", ".join(f"{f}: events {_value(self.events, f)} / store {_value(self.store, f)}" for f in self.fields)
        return f"{self.kind} {self.key}: differs: {shown}"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "fields": list(self.fields),
                "events": msgspec.to_builtins(self.events), "store": msgspec.to_builtins(self.store)}


def _brief(state: Any) -> str:
    if hasattr(state, "target"):
        return f"target {state.target}, sha256 {state.sha256[:12]}"
    return f"revision {state.revision}, {len(state.routes)} routes"


def _value(state: Any, name: str) -> str:
    v = msgspec.to_builtins(getattr(state, name))
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def compare_states(kind: str, events: dict[str, Any], store: dict[str, Any]) -> list[Difference]:
    """Every key whose last event and store entry differ (or exist on one side only), sorted by key."""
    out = []
    for key in sorted(set(events) | set(store)):
        e, s = events.get(key), store.get(key)
        if e is None or s is None:
            out.append(Difference(kind, key, e, s, ()))
            continue
        if e == s:
            continue
        fields = tuple(f for f in e.__struct_fields__ if getattr(e, f) != getattr(s, f))
        out.append(Difference(kind, key, e, s, fields))
    return out


def cmd_state_check(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events import Publisher
    from modelcd.events.bus import KafkaConfig, read_state
    from modelcd.events.schemas import ModelState, TrafficPolicy
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    cfg = KafkaConfig.from_settings(settings)

    async def run(stop: asyncio.Event) -> int:
        model_events = {k: v for k, v in (await read_state(cfg, "modelcd.model-state")).items()
                        if isinstance(v, ModelState)}
        traffic_events: dict[str, TrafficPolicy] = {}
        for _k, v in (await read_state(cfg, "modelcd.traffic")).items():
            if isinstance(v, TrafficPolicy):
                traffic_events[v.endpoint] = v
        async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
            targets = TargetState(store)
            model_store = {f"{m.name}:{m.version}": m for m in await targets.models()}
            traffic_store = await targets.traffic()
            diffs = (compare_states("model", model_events, model_store)
                     + compare_states("endpoint", traffic_events, traffic_store))
            if args.json:
                print(json.dumps([d.as_json() for d in diffs], indent=2))
            else:
                for d in diffs:
                    print(d.describe())
                print(f"{len(diffs)} differences ({len(model_store)} models and {len(traffic_store)} endpoints in "
                      f"the store, {len(model_events)} and {len(traffic_events)} in the events)", file=sys.stderr)
            if not diffs or not args.repair:
                return 1 if diffs else 0
            fixed = 0
            if args.repair == "store":
                for d in diffs:
                    if d.events is None:
                        continue  # nothing to copy: the store keeps it (`--repair events` publishes it)
                    if d.kind == "model":
                        await targets.put_model(d.events)
                    else:
                        await targets.put_traffic(d.events)
                    fixed += 1
            else:
                async with Publisher(cfg, "ops/state-check") as pub:
                    for d in diffs:
                        if d.store is None:
                            continue  # the store has nothing for it: `--repair store` writes it
                        await pub.publish(d.store)
                        fixed += 1
            print(f"repaired {fixed} of {len(diffs)} differences ({args.repair} now matches)", file=sys.stderr)
            return 0

    return run_main(run)
