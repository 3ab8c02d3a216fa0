"""`modelcd frontdoor` (the fleet's one address, through Caddy) and `modelcd release` (the serving binary's own CD)."""

from __future__ import annotations

import argparse
import asyncio
import sys
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
