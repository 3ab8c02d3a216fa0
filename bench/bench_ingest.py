"""Ingest: time from `POST /deployments` of a small scikit-learn model to its ModelState, and throughput.

Run: python bench/bench_ingest.py [--n 20] [--append]   (--append adds the result to bench/RESULTS.md)

Runs twice in one go: with sandbox children forked by the zygote (the default, MODELCD_VALIDATION_WARM=true)
and with a cold sandbox process started per deployment, and reports both and their ratio.

Starts the embedded broker, a local store and one ingest instance in this process, then
1. latency: deploys N packages one after another (iris LogisticRegression, a new version each, so
   every deployment runs the whole pipeline: validate, ONNX compile, sandboxed serving validation,
   publish) and reports the median / p90 time from the HTTP upload to the ModelState event read back
   from Kafka, with the median of each step's duration as reported in DeploymentCompleted.timings_ms;
2. throughput: uploads N more at once and reports deployments per minute from the first upload to
   the last ModelState (one instance handles requests one at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.codec import decode
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, ModelState
from modelcd.events.topics import DEPLOYMENTS, MODEL_STATE
from modelcd.ingest.service import run_ingest
from modelcd.logs import configure
from modelcd.runtimes.build import build_package
from modelcd.settings import Settings

STEPS = ["validate", "compile", "serving-validation", "publish"]


def packages(n: int, offset: int) -> list[bytes]:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    return [build_package(model, name="bench", version=str(offset + i), owner="bench", expiry="30d",
                          sample_inputs=x[:8]).data for i in range(n)]


class Events:
    """ModelState arrival times by version and DeploymentCompleted by deployment id."""

    def __init__(self) -> None:
        self.state_at: dict[str, float] = {}
        self.completed: dict[str, DeploymentCompleted] = {}
        self.changed = asyncio.Event()

    async def run(self, bootstrap: str, partitions: int) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in (DEPLOYMENTS, MODEL_STATE) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                for tp, records in (await consumer.getmany(timeout_ms=50)).items():
                    for r in records:
                        event, _ = decode(tp.topic, r.value, r.headers)
                        if isinstance(event, ModelState):
                            self.state_at[event.version] = time.perf_counter()
                        elif isinstance(event, DeploymentCompleted):
                            self.completed[event.deployment_id] = event
                        elif isinstance(event, DeploymentFailed):
                            raise SystemExit(f"deployment failed: {event.reason}")
                        self.changed.set()
        finally:
            await consumer.stop()

    async def wait(self, versions: list[str]) -> None:
        while not all(v in self.state_at for v in versions):
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 120)


async def bench(n: int, warm: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(port=free_port(), log_file=Path(tmp) / "tansu.log")
        await broker.start()
        port = free_port()
        settings = Settings(kafka_bootstrap=broker.bootstrap, kafka_idempotence=False, store_url=f"{tmp}/store",
                            ingest_port=port, home=Path(tmp), log_level="warning", validation_warm=warm)
        stop, ready = asyncio.Event(), asyncio.Event()
        events = Events()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_ingest(settings, stop=stop, ready=ready))
                watching = tg.create_task(events.run(broker.bootstrap, settings.topic_partitions))
                await asyncio.wait_for(ready.wait(), 60)
                seq, burst = packages(n, 1), packages(n, 1 + n)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                    latencies, ids = [], []
                    for i, data in enumerate(seq):
                        t0 = time.perf_counter()
                        resp = await client.post("/deployments", content=data,
                                                 headers={"content-type": "application/x-tar"})
                        ids.append(resp.json()["deployment_id"])
                        await events.wait([str(1 + i)])
                        latencies.append(events.state_at[str(1 + i)] - t0)
                    t0 = time.perf_counter()
                    await asyncio.gather(*(client.post("/deployments", content=d,
                                                       headers={"content-type": "application/x-tar"}) for d in burst))
                    await events.wait([str(1 + n + i) for i in range(n)])
                    burst_s = max(events.state_at[str(1 + n + i)] for i in range(n)) - t0
                stop.set()
                watching.cancel()
        finally:
            await broker.stop()
    steps = {s: statistics.median(events.completed[i].timings_ms[s] for i in ids) for s in STEPS}
    return {"median_s": statistics.median(latencies), "p90_s": statistics.quantiles(latencies, n=10)[-1],
            **{f"{s}_ms": v for s, v in steps.items()}, "per_minute": n / burst_s * 60}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="deployments per phase (default 20)")
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    configure("warning", "console")
    lines = []
    results = {}
    for warm in (True, False):  # same run, same machine: the zygote's children vs a cold start per deployment
        r = results[warm] = asyncio.run(bench(args.n, warm))
        lines.append(f"{'warm sandbox' if warm else 'cold sandbox'}: deploy → ModelState median "
                     f"{r['median_s'] * 1000:.0f} ms, p90 {r['p90_s'] * 1000:.0f} ms (n={args.n}); "
                     + ", ".join(f"{s} {r[f'{s}_ms']:.0f} ms" for s in STEPS)
                     + f"; throughput {r['per_minute']:.0f} deployments/min (burst of {args.n}, one instance)")
    lines.append(f"warm / cold: median latency {results[True]['median_s'] / results[False]['median_s']:.2f}x, "
                 f"throughput {results[True]['per_minute'] / results[False]['per_minute']:.2f}x")
    line = "\n    ".join(lines)
    print(line)
    if args.append:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(f"\n\n## ingest: deploy → ModelState, per step, and deployments/minute (bench/bench_ingest.py)\n\n"
                    f"{datetime.date.today()}, CPython {platform.python_version()}, {platform.machine()}, 2 shared "
                    f"cores (other engineers' test runs on the box), embedded Tansu broker, local-directory store. "
                    f"Model: iris LogisticRegression (compiled to ONNX at ingest), a new version per deployment.\n\n"
                    f"    python bench/bench_ingest.py --n {args.n} --append\n    {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
