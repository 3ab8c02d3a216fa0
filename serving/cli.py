"""`modelcd serve`: one serving node in the foreground until SIGTERM/Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from typing import Any

from modelcd.settings import Settings

from .hooks import ShadowFactory


def register(sub: Any, *, shadow: ShadowFactory | None = None) -> None:
    """Add `modelcd serve`; the node it runs gets `shadow` (the shell passes modelcd.shadow.node.attach)."""
    p = sub.add_parser(
        "serve", help="run one serving node (Open Inference Protocol on HTTP) until Ctrl-C",
        description="Start a serving node: it reads the target state from the broker and the store, loads what "
                    "fits MODELCD_MEMORY_BUDGET, answers /v2/... on MODELCD_SERVING_HOST:PORT, and drains on "
                    "SIGTERM (not ready → finish in-flight requests → flush telemetry → exit).")
    p.add_argument("--port", type=int, help="port to listen on (default MODELCD_SERVING_PORT)")
    p.add_argument("--node-id", help="name of this node in health events (default MODELCD_NODE_ID, else host:port)")
    p.set_defaults(func=functools.partial(cmd_serve, shadow=shadow))


def cmd_serve(args: argparse.Namespace, settings: Settings, *, shadow: ShadowFactory | None = None) -> int:
    from modelcd.runner import run_main

    from .node import ServingNode

    async def main(stop: asyncio.Event) -> int:
        node = ServingNode(settings, port=args.port, node_id=args.node_id, shadow=shadow)
        ready = asyncio.Event()
        task = asyncio.create_task(node.run(stop=stop, ready=ready))
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if ready.is_set():
            print(f"serving node {node.node_id} ready on {node.url}/v2", file=sys.stderr, flush=True)
        try:
            await task
        except OSError as exc:
            print(f"modelcd: {exc}", file=sys.stderr)
            return 2
        return 0

    return run_main(main)
