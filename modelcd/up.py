"""`modelcd up`: the whole system on one machine, started and stopped as one unit.

Order: broker (embedded unless MODELCD_KAFKA_BOOTSTRAP is set) → topics → store →
ingest → serving nodes → stream processors. Each service signals readiness; on
stop they drain in reverse order inside one TaskGroup, so no task is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from modelcd.events.broker import BrokerError, EmbeddedBroker
from modelcd.events.bus import KafkaConfig, ensure_topics
from modelcd.logs import get_logger
from modelcd.settings import Settings

log = get_logger("modelcd.up")

ServiceFn = Callable[..., Awaitable[None]]


def components(settings: Settings, nodes: int) -> list[tuple[str, ServiceFn, dict[str, Any]]]:
    """(name, run function, extra kwargs) of every service `up` starts, in start order."""
    from modelcd.ingest.service import run_ingest
    from modelcd.retirement.service import run_retirement
    from modelcd.rollout.service import run_controller
    from modelcd.serving.node import run_node
    from modelcd.shadow.comparison import run_comparison
    from modelcd.wiring import api_routes, node_shadow

    out: list[tuple[str, ServiceFn, dict[str, Any]]] = [("ingest", run_ingest, {"routes": api_routes(settings)})]
    for i in range(nodes):
        port = settings.serving_port + i
        out.append((f"serving-{i}", run_node, {"port": port, "node_id": f"node-{i}", "shadow": node_shadow()}))
    out += [
        ("shadow-comparison", run_comparison, {}),
        ("rollout-controller", run_controller, {}),
        ("retirement", run_retirement, {}),
    ]
    return out


async def run_up(settings: Settings, *, stop: asyncio.Event, nodes: int = 1) -> int:
    async with AsyncExitStack() as stack:
        if settings.kafka_bootstrap is None:
            broker = EmbeddedBroker(port=settings.broker_port, storage=settings.broker_storage,
                                    log_file=settings.home / "broker.log", partitions=settings.topic_partitions)
            try:
                await broker.start()
            except BrokerError as exc:
                print(f"modelcd: {exc}", file=sys.stderr)
                return 2
            stack.push_async_callback(broker.stop)
        else:
            await ensure_topics(KafkaConfig.from_settings(settings))
        settings = dataclasses.replace(settings, home=settings.home.resolve())
        settings.home.mkdir(parents=True, exist_ok=True)

        comps = components(settings, nodes)
        async with asyncio.TaskGroup() as tg:
            readies = []
            for name, fn, kwargs in comps:
                ready = asyncio.Event()
                readies.append((name, ready))
                tg.create_task(fn(settings, stop=stop, ready=ready, **kwargs), name=name)
            waiter = asyncio.ensure_future(stop.wait())
            for name, ready in readies:
                r = asyncio.ensure_future(ready.wait())
                done, _ = await asyncio.wait({r, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    r.cancel()
                    break
                log.info("component ready", component=name)
            else:
                print(_banner(settings, nodes), file=sys.stderr, flush=True)
            await waiter
    return 0


def _banner(settings: Settings, nodes: int) -> str:
    lines = [
        "modelcd is up:",
        f"  broker          {settings.bootstrap}" + ("" if settings.kafka_bootstrap else " (embedded)"),
        f"  store           {settings.resolved_store_url}",
        f"  deployment API  {settings.resolved_ingest_url}",
    ]
    for i in range(nodes):
        lines.append(f"  serving node    http://{settings.serving_host}:{settings.serving_port + i}/v2")
    lines.append("Try: modelcd demo && modelcd deploy demo-packages/iris-1.tar  (README: Walkthrough). Ctrl-C to stop.")
    return "\n".join(lines)
