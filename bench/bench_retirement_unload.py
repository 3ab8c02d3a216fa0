"""Delay from a model's expiry to its unload on a running serving node.

One process runs an embedded broker, the ingest service, one serving node and one retirement
worker (all real, as `modelcd up` does). N models are deployed with a short expiry and never
used; for each, the delay is the time from its expiry (deployed_at + expiry) until the node
no longer holds it. The delay is the retirement check interval (when the expiry is noticed)
plus the RetireRequested → ingest → ModelState → node path.

    python bench/bench_retirement_unload.py [--models 5] [--expiry 6] [--check-interval 1] [--append]
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

import msgspec

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher
from modelcd.ingest.service import run_ingest
from modelcd.ingest.store import open_store, put_package
from modelcd.ingest.targets import TargetState
from modelcd.logs import configure
from modelcd.retirement.service import RetirementProcessor
from modelcd.serving.node import ServingNode
from modelcd.settings import Settings

HERE = Path(__file__).parent


def package(name: str) -> tuple[bytes, object]:
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    from modelcd.ingest.package import build_package

    x, y = load_iris(return_X_y=True)
    built = build_package(DecisionTreeClassifier(max_depth=2).fit(x, y), name=name, version="1", owner="bench",
                          expiry="30d", sample_inputs=x[:4])
    return built.data, built.manifest


async def started(fn: object, settings: Settings, stop: asyncio.Event, tg: asyncio.TaskGroup, **kw: object) -> None:
    ready = asyncio.Event()
    tg.create_task(fn(settings, stop=stop, ready=ready, **kw))  # type: ignore[operator]
    await asyncio.wait_for(ready.wait(), 120)


async def main(models: int, expiry: int, check_interval: float) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(port=free_port(), log_file=Path(tmp) / "tansu.log")
        await broker.start()
        settings = Settings(kafka_bootstrap=broker.bootstrap, kafka_idempotence=False, home=Path(tmp) / "home",
                            store_url=str(Path(tmp) / "store"), ingest_port=free_port(),
                            serving_port=free_port(), log_level="warning", usage_interval=1.0,
                            retirement_check_interval=check_interval, retirement_warn_share=0.5)
        stop = asyncio.Event()
        delays: list[float] = []
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
                            from modelcd.events.schemas import ModelState

                            state = ModelState(name=name, version="1", target="serving", package_uri=f"packages/{sha}",
                                               sha256=sha, runtime=manifest.runtime, flavor=manifest.flavor,  # type: ignore[attr-defined]
                                               owner="bench", expiry_seconds=expiry, deployed_at=time.time())
                            await TargetState(store).put_model(state)
                            await pub.publish(state)
                            expires[f"{name}:1"] = state.deployed_at + expiry
                            await asyncio.sleep(0.5)  # staggered, so expiries fall at different check phases
                    pending = dict(expires)
                    deadline = time.time() + expiry + 120
                    seen_loaded: set[str] = set()
                    while pending and time.time() < deadline:
                        entries = node.registry.entries if node.registry else {}
                        for key in list(pending):
                            if key in entries:
                                seen_loaded.add(key)
                            elif key in seen_loaded:
                                delays.append(time.time() - pending.pop(key))
                        await asyncio.sleep(0.02)
                    if pending:
                        raise SystemExit(f"not unloaded within the deadline: {sorted(pending)}")
                stop.set()
        finally:
            stop.set()
            await broker.stop()
    return delays


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--expiry", type=int, default=6, help="seconds")
    ap.add_argument("--check-interval", type=float, default=1.0, help="MODELCD_RETIREMENT_CHECK_INTERVAL")
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    configure("warning", "console")
    d = sorted(asyncio.run(main(args.models, args.expiry, args.check_interval)))
    line = (f"expiry → unload on the node: median {statistics.median(d):.2f} s, max {d[-1]:.2f} s, min {d[0]:.2f} s "
            f"over {len(d)} models (check interval {args.check_interval:g} s, expiry {args.expiry} s)")
    print(line)
    if args.append:
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"\n## retirement: expiry → unload on a running node (bench/bench_retirement_unload.py)\n\n"
                    f"{date.today()}, CPython {platform.python_version()}, {platform.machine()}, 2 shared cores; "
                    "embedded Tansu broker, ingest, one serving node and one retirement worker in one process.\n\n"
                    f"    python bench/bench_retirement_unload.py --models {args.models} --expiry {args.expiry} "
                    f"--check-interval {args.check_interval:g} --append\n    {line}\n")
