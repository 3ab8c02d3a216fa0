"""Bus: prediction logs per second one node publishes, and what logging every prediction costs the predictions.

Run: python bench/bench_bus.py [--rate 800] [--phase 8] [--json out.json]

One `modelcd up` (one node), the hot model (iris LogisticRegression) behind an endpoint of the same
name whose route's `log_rate` is switched between 0 and 1 (a TrafficPolicy, as a rollout does).
Phases, same process: fixed offered load (`--rate`, hey -q) with log rate 0, 1, 0, 1; then closed
loop (32 connections) with 0 and 1. Per phase: served req/s and p50/p99 from hey, prediction logs
published per second (the growth of `modelcd.predictions`' end offsets over the phase), telemetry
events the node dropped (its buffer full) from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.bench_churn import iris_packages
from bench.bench_scale import metrics
from bench.common import System, hey, hey_fixed, machine, need_hey, wait_http


async def set_log_rate(system: System, rate: float, revision: int) -> None:
    from modelcd.events.bus import KafkaConfig, Publisher
    from modelcd.events.schemas import Route, TrafficPolicy
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    policy = TrafficPolicy(endpoint="hot", routes=[Route(model="hot", version="1", weight=100.0, log_rate=rate)],
                           revision=revision)
    async with open_store(str(system.home / "store")) as store, \
            Publisher(KafkaConfig(bootstrap=bootstrap(system), idempotence=False), "bench") as pub:
        await TargetState(store).put_traffic(policy)
        await pub.publish(policy)


def bootstrap(system: System) -> str:
    return f"127.0.0.1:{system.env['MODELCD_BROKER_PORT']}"


async def logged(system: System) -> int:
    """Records ever written to modelcd.predictions (the sum of its end offsets)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from modelcd.events.topics import PREDICTIONS

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap(system))
    await c.start()
    try:
        parts = c.partitions_for_topic(PREDICTIONS) or set()
        if not parts:
            await c.topics()
            parts = c.partitions_for_topic(PREDICTIONS) or set()
        ends = await c.end_offsets([TopicPartition(PREDICTIONS, p) for p in parts])
        return int(sum(ends.values()))
    finally:
        await c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=800.0)
    ap.add_argument("--phase", type=float, default=8.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    need_hey()
    t_start = time.monotonic()
    phases: list[dict[str, Any]] = []
    with System(1) as system:
        system.wait_deployed(system.deploy(iris_packages("hot", range(1, 2))[0]))
        wait_http(f"{system.front}/v2/models/hot/ready", timeout=60)
        body = system.home / "body.json"
        body.write_text(json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                "data": [[5.1, 3.5, 1.4, 0.2]]}]}))
        url = f"{system.front}/v2/models/hot/infer"
        hey(url, body, seconds=2, connections=8)
        plan = [(args.rate, 0.0), (args.rate, 1.0), (args.rate, 0.0), (args.rate, 1.0), (0.0, 0.0), (0.0, 1.0)]
        for revision, (rate, log_rate) in enumerate(plan, start=1):
            asyncio.run(set_log_rate(system, log_rate, revision))
            time.sleep(1.5)  # the node applies the policy
            m0, l0 = metrics(system.front), asyncio.run(logged(system))
            h = hey_fixed(url, body, seconds=args.phase, rate=rate) if rate else \
                hey(url, body, seconds=args.phase, connections=32)
            time.sleep(1.0)  # the last logs reach the broker (the node batches them)
            m1, l1 = metrics(system.front), asyncio.run(logged(system))
            row = {"phase": f"{'fixed' if rate else 'closed loop'}, log {log_rate:.0%}", "offered": rate,
                   "log_rate": log_rate, "rps": h["rps"], "p50": h["p50"], "p99": h["p99"], "failed": h["failed"],
                   "logs_per_s": (l1 - l0) / args.phase, "logs": l1 - l0,
                   "dropped": m1.get("modelcd_telemetry_dropped_total", m1.get("modelcd_telemetry_dropped", 0))
                   - m0.get("modelcd_telemetry_dropped_total", m0.get("modelcd_telemetry_dropped", 0))}
            phases.append(row)
            print(f"{row['phase']:22} served {h['rps']:7,.0f} req/s p50 {h['p50']:.2f} p99 {h['p99']:.2f} ms; "
                  f"{row['logs_per_s']:7,.0f} logs/s published, {row['dropped']:.0f} dropped", flush=True)
    out = {"scenario": "bus", "phases": phases, "elapsed_s": time.monotonic() - t_start, "machine": machine(),
           "command": "python bench/bench_bus.py " + " ".join(sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
