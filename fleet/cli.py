"""`modelcd frontdoor` (the fleet's one address, through Caddy) and `modelcd release` (the serving binary's own CD)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from modelcd.settings import Settings


def register(sub: Any) -> None:
    p = sub.add_parser(
        "frontdoor", help="run the fleet's front door (Caddy) on MODELCD_SERVING_PORT until Ctrl-C",
        description="Start Caddy on MODELCD_SERVING_HOST:MODELCD_SERVING_PORT in front of every serving node that "
                    "heartbeats on the bus: each model's requests go to the nodes that hold it, a node failing "
                    "/v2/health/ready is skipped, a failed attempt is retried on another node.")
    p.add_argument("--port", type=int, help="port to listen on (default MODELCD_SERVING_PORT)")
    p.set_defaults(func=cmd_frontdoor)

    p = sub.add_parser(
        "release", help="release the serving code itself: staging test, canary across production models, rolling "
                        "rollout",
        description="ENV is a virtual environment where the candidate modelcd is installed "
                    "(python -m venv ENV && ENV/bin/pip install 'modelcd[all]==VERSION'). Each step exits 1 when "
                    "the release fails it, with the reason.")
    rsub = p.add_subparsers(dest="release_command", metavar="STEP", required=True)
    r = rsub.add_parser("staging", help="a throwaway fleet from ENV: deploy every flavor, predict, shadow, roll out, "
                                        "retire; pass/fail per check")
    r.add_argument("env", type=Path, metavar="ENV")
    r.add_argument("--nodes", type=int, default=2, help="serving nodes of the throwaway fleet (default 2)")
    r.add_argument("--keep", action="store_true", help="leave the throwaway fleet's files for inspection")
    r.set_defaults(func=cmd_staging)
    r = rsub.add_parser("canary", help="every model the production target state serves, on a node from ENV and "
                                       "one from this installation: outputs and p99 compared, a table per model")
    r.add_argument("env", type=Path, metavar="ENV")
    r.add_argument("--runs", type=int, default=30, help="timed repetitions per model for the p99 (default 30)")
    r.add_argument("--margin", type=float, default=0.5,
                   help="share by which the candidate's p99 may exceed the current one's (default 0.5)")
    r.add_argument("--slack-ms", type=float, default=5.0, help="absolute p99 slack in ms (default 5)")
    r.add_argument("--logged", type=int, default=20,
                   help="recent logged requests per model replayed from modelcd.predictions (default 20)")
    r.set_defaults(func=cmd_canary)
    r = rsub.add_parser("roll", help="replace the fleet's serving nodes one at a time with nodes from ENV; roll "
                                     "back by itself if one fails to become ready")
    r.add_argument("env", type=Path, metavar="ENV")
    r.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds a new node has to be ready and hold its share (default 120)")
    r.add_argument("--observe", type=float, default=5.0,
                   help="seconds each new node serves beside the old ones before they leave; a higher error rate "
                        "than theirs rolls back (default 5)")
    r.set_defaults(func=cmd_roll)


def _workdir(settings: Settings, step: str) -> Path:
    import time

    return settings.home.resolve() / "release" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_canary(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runner import run_main

    from .canary import canary

    async def main(stop: asyncio.Event) -> int:
        report = await canary(settings, args.env, workdir=_workdir(settings, "canary"), runs=args.runs,
                              margin=args.margin, slack_ms=args.slack_ms, logged=args.logged,
                              say=lambda line: print(line, file=sys.stderr, flush=True))
        print(report.table())
        return 0 if report.ok else 1

    return run_main(main)


def cmd_roll(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runner import run_main

    from .roll import roll

    async def main(stop: asyncio.Event) -> int:
        result = await roll(settings, args.env, workdir=_workdir(settings, "roll"), ready_timeout=args.ready_timeout,
                            observe=args.observe,
                            say=lambda line: print(line, file=sys.stderr, flush=True))
        if result.ok:
            print(f"rolled: {', '.join(f'{o} -> {n}' for o, n in result.replaced)}")
            for n in result.started:
                print(f"  {n.node_id}: {n.url} (pid {n.proc.pid}, log {n.log})")
            return 0
        print(f"roll failed and was rolled back: {result.reason}", file=sys.stderr)
        return 1

    return run_main(main)


def cmd_staging(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runner import run_main

    from .staging import staging

    async def main(stop: asyncio.Event) -> int:
        report = await staging(args.env, workdir=_workdir(settings, "staging"), nodes=args.nodes, keep=args.keep,
                               say=lambda line: print(line, file=sys.stderr, flush=True))
        print(report.table())
        return 0 if report.ok else 1

    return run_main(main)


def cmd_frontdoor(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.runner import run_main

    from .frontdoor import FrontDoor

    async def main(stop: asyncio.Event) -> int:
        fd = FrontDoor(settings, port=args.port)
        ready = asyncio.Event()
        task = asyncio.create_task(fd.run(stop=stop, ready=ready))
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if ready.is_set():
            print(f"front door ready on {fd.url}/v2", file=sys.stderr, flush=True)
        await task
        return 0

    return run_main(main)
