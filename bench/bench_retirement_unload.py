"""Delay from a model's expiry to its unload on a running serving node.

One process runs an embedded broker, the ingest service, one serving node and one retirement
worker (all real, as `modelcd up` does). N models are deployed with a short expiry and never
used, staggered so their expiries fall at evenly spread phases of the check period; for each,
the delay is the time from its expiry (deployed_at + expiry) until the node no longer holds it
(polled every 20 ms). The delay is split from the events on the bus:

    check   expiry → RetirementDecision.at     (the processor notices at its next check: 0..interval)
    ingest  decision → retired ModelState.at   (RetireRequested → ingest → target state → event)
    node    ModelState.at → gone from the node (the node consumes it and unloads)

Each --check-interval value runs in a fresh broker and stack.

    python bench/bench_retirement_unload.py [--models 5] [--expiry 6] [--check-interval 1 [3 ...]] [--append]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher, read_topic
from modelcd.events.schemas import ModelState, RetirementDecision
from modelcd.events.topics import MODEL_STATE, RETIREMENT
from modelcd.ingest.service import run_ingest
from modelcd.logs import configure
from modelcd.retirement.service import RetirementProcessor
from modelcd.serving.node import ServingNode
from modelcd.settings import Settings
from modelcd.store.blobs import open_store, put_package
from modelcd.store.targets import TargetState

HERE = Path(__file__).parent


def package(name: str) -> tuple[bytes, object]:
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    from modelcd.runtimes.build import build_package

    x, y = load_iris(return_X_y=True)
    built = build_package(DecisionTreeClassifier(max_depth=2).fit(x, y), name=name, version="1", owner="bench",
                          expiry="30d", sample_inputs=x[:4])
    return built.data, built.manifest


async def started(fn: object, settings: Settings, stop: asyncio.Event, tg: asyncio.TaskGroup, **kw: object) -> None:
    ready = asyncio.Event()
    tg.create_task(fn(settings, stop=stop, ready=ready, **kw))  # type: ignore[operator]
    await asyncio.wait_for(ready.wait(), 120)


Row = dict[str, float]  # total, check, ingest, node (seconds)


async def main(models: int, expiry: int, check_interval: float) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(port=free_port(), log_file=Path(tmp) / "tansu.log")
        await broker.start()
        settings = Settings(kafka_bootstrap=broker.bootstrap, kafka_idempotence=False, home=Path(tmp) / "home",
                            store_url=str(Path(tmp) / "store"), ingest_port=free_port(),
                            serving_port=free_port(), log_level="warning", usage_interval=1.0,
                            retirement_check_interval=check_interval, retirement_warn_share=0.5)
        stop = asyncio.Event()
        unloaded: dict[str, float] = {}
        try:
            async with asyncio.TaskGroup() as tg, Publisher(broker.config, "bench") as pub:
                node = ServingNode(settings, node_id="bench-node")
                tg.create_task(node.run(stop=stop, ready=(node_ready := asyncio.Event())))
                await asyncio.wait_for(node_ready.wait(), 120)
                await started(run_ingest, settings, stop, tg)
                async with RetirementProcessor(settings):
                    expires: dict[str, float] = {}
                    async with open_store(settings.resolved_store_url) as store:
                        for i in range(models):
                            name = f"m{i}"
                            data, manifest = package(name)
                            sha = await put_package(store, data)
                            state = ModelState(name=name, version="1", target="serving", package_uri=f"packages/{sha}",
                                               sha256=sha, runtime=manifest.runtime, flavor=manifest.flavor,  # type: ignore[attr-defined]
                                               owner="bench", expiry_seconds=expiry, deployed_at=time.time())
                            await TargetState(store).put_model(state)
                            await pub.publish(state)
                            expires[f"{name}:1"] = state.deployed_at + expiry
                            # staggered over one check period, so expiries fall at evenly spread phases
                            await asyncio.sleep(check_interval / models)
                    pending = dict(expires)
                    deadline = time.time() + expiry + 120
                    seen_loaded: set[str] = set()
                    while pending and time.time() < deadline:
                        entries = node.registry.entries if node.registry else {}
                        for key in list(pending):
                            if key in entries:
                                seen_loaded.add(key)
                            elif key in seen_loaded:
                                unloaded[key] = time.time()
                                del pending[key]
                        await asyncio.sleep(0.02)
                    if pending:
                        raise SystemExit(f"not unloaded within the deadline: {sorted(pending)}")
                decided = {f"{e.model}:{e.version}": e.at for e, _env, _r in await read_topic(broker.config, RETIREMENT)
                           if isinstance(e, RetirementDecision) and e.action == "retire"}
                retired = {f"{e.name}:{e.version}": e.at for e, _env, _r in await read_topic(broker.config, MODEL_STATE)
                           if isinstance(e, ModelState) and e.target == "retired"}
                stop.set()
        finally:
            stop.set()
            await broker.stop()
    return [{"total": unloaded[k] - expires[k], "check": decided[k] - expires[k], "ingest": retired[k] - decided[k],
             "node": unloaded[k] - retired[k]} for k in sorted(unloaded)]


def summary(rows: list[Row], check_interval: float, expiry: int) -> str:
    def part(name: str) -> str:
        xs = sorted(r[name] for r in rows)
        return f"median {statistics.median(xs):.2f} s, max {xs[-1]:.2f} s"

    total = sorted(r["total"] for r in rows)
    return (f"check interval {check_interval:g} s: expiry → unload median {statistics.median(total):.2f} s, "
            f"max {total[-1]:.2f} s, min {total[0]:.2f} s over {len(rows)} models (expiry {expiry} s); "
            f"of which check {part('check')}, ingest {part('ingest')}, node {part('node')}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--expiry", type=int, default=6, help="seconds")
    ap.add_argument("--check-interval", type=float, nargs="+", default=[1.0],
                    help="MODELCD_RETIREMENT_CHECK_INTERVAL (several: one run each)")
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    configure("warning", "console")
    lines = []
    for interval in args.check_interval:
        lines.append(summary(asyncio.run(main(args.models, args.expiry, interval)), interval, args.expiry))
        print(lines[-1], flush=True)
    if args.append:
        intervals = " ".join(f"{i:g}" for i in args.check_interval)
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"\n## retirement: expiry → unload on a running node (bench/bench_retirement_unload.py)\n\n"
                    f"{date.today()}, CPython {platform.python_version()}, {platform.machine()}, 2 shared cores; "
                    "embedded Tansu broker, ingest, one serving node and one retirement worker in one process "
                    "(warn share 0.5, usage interval 1 s).\n\n"
                    f"    python bench/bench_retirement_unload.py --models {args.models} --expiry {args.expiry} "
                    f"--check-interval {intervals} --append\n"
                    + "".join(f"    {line}\n" for line in lines))
