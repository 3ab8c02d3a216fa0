"""What isolating model code costs: the worker-process node vs the previous in-process node vs MLServer,
and how a crash-looping neighbour moves a healthy model's p99.

Run:  python bench/bench_isolation.py [--duration 10] [--concurrency 32] [--rate 400] [--baseline REV] [--append]

Needs `hey` (Debian: `apt-get install -y hey`) and, for MLServer, bench/.venv-mlserver (created on first
use by bench_serving.py's `ensure_mlserver`). All in one run, one server at a time, same model and load
as bench/bench_serving.py (sklearn DecisionTreeClassifier(max_depth=3) on iris, one FP64 [1, 4] row per
JSON request to /v2/models/iris/infer):

1. the isolated node: `modelcd serve` of this checkout (each model in its own worker process);
2. the in-process node: `modelcd serve` of `--baseline` (default: the commit before model workers),
   checked out into a temporary git worktree and run from it;
3. MLServer with its defaults (one parallel inference worker);
4. the channel alone: sequential calls front → worker → front on the loaded model, vs `predict` alone;
5. neighbour crash loop: the isolated node with iris and a tree that segfaults on some inputs (a skops tree
   with an out-of-range child index, tests/_models.py) whose crash limit is lifted so it crash-loops;
   iris's p99 at `--rate` with a driver hitting the crashing input as fast as the node answers, vs the
   same run without the driver, alternated quiet/noisy/quiet/noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import bench_serving as bs  # noqa: E402

PARTS = ("events", "store", "runtimes", "ingest", "serving", "shadow", "rollout", "retirement")


def baseline_rev() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "serving/workers.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def checkout_baseline(rev: str, work: Path) -> Path:
    """The baseline's source tree, importable as `modelcd` (the parts linked under modelcd/ like the install)."""
    tree = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
    for part in PARTS:
        if (tree / part).is_dir() and not (tree / "modelcd" / part).exists():
            (tree / "modelcd" / part).symlink_to(f"../{part}")
    return tree


class Node:
    """`modelcd serve` (this checkout, or `source` on PYTHONPATH) against an embedded broker and a local store."""

    def __init__(self, work: Path, name: str, packages: list[Path], source: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.work, self.name, self.packages, self.source, self.extra = work / name, name, packages, source, env or {}
        self.work.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Node:
        from modelcd.events.broker import EmbeddedBroker

        self.loop = asyncio.new_event_loop()

        async def start() -> EmbeddedBroker:
            b = EmbeddedBroker(port=bs.free_port(), log_file=self.work / "tansu.log")
            await b.start()
            for p in self.packages:
                await bs.deploy_modelcd(p, b.bootstrap, str(self.work / "store"))
            return b

        self.broker = self.loop.run_until_complete(start())
        self.port = bs.free_port()
        env = {**os.environ, "MODELCD_KAFKA_BOOTSTRAP": self.broker.bootstrap, "MODELCD_KAFKA_IDEMPOTENCE": "false",
               "MODELCD_HOME": str(self.work / "home"), "MODELCD_STORE_URL": str(self.work / "store"),
               "MODELCD_LOG_LEVEL": "warning", "MODELCD_LOG_FORMAT": "json", **self.extra}
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        self.proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve", "--port", str(self.port)], env=env,
                                     cwd=self.source or ROOT, stderr=open(self.work / "node.log", "wb"))  # noqa: SIM115
        for p in self.packages:
            from modelcd.store.package import read_package

            name = read_package(p.read_bytes()).manifest.name
            bs.wait_ready(f"{self.url}/v2/models/{name}/ready", self.proc)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        bs.stop(self.proc)
        self.loop.run_until_complete(self.broker.stop())
        self.loop.close()


def channel_cost(package: Path, calls: int = 3000) -> dict[str, float]:
    """µs per sequential call: predict alone, in this process, vs through a worker (front → worker → front)."""
    import numpy as np

    from modelcd.runtimes.flavors import load_runtime
    from modelcd.serving.workers import Zygote
    from modelcd.store.package import read_package

    data = package.read_bytes()
    pkg = read_package(data)
    x = {"input": np.array([[5.1, 3.5, 1.4, 0.2]])}
    runtime = load_runtime(pkg.manifest, pkg.contents)
    for _ in range(200):
        runtime.predict(x)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            runtime.predict(x)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    direct = min(times)

    async def through_worker() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            zygote = Zygote(Path(tmp))
            try:
                worker = await zygote.spawn("iris", {"workdir": f"{tmp}/w", "memory": 4 << 30, "nice": 0})
                await worker.call("load", "iris", {"loader": "modelcd.serving.worker_main:default_loader"},
                                  payload=data)
                for _ in range(200):
                    await worker.call("predict", "iris", None, x)
                best = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        await worker.call("predict", "iris", None, x)
                    best.append((time.perf_counter() - t0) / calls * 1e6)
                worker.kill("bench done")
                return min(best)
            finally:
                await zygote.close()

    import uvloop

    via = uvloop.run(through_worker())
    return {"direct_us": direct, "worker_us": via, "channel_us": via - direct}


def crash_driver(url: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Hit the crashing input as fast as the node answers (503 while it restarts, a crash when it is up)."""
    import httpx

    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [[6.3, 3.3, 6.0, 2.5]]}]}
    with httpx.Client(base_url=url, timeout=10.0) as client:
        while not stop.is_set():
            try:
                r = client.post("/v2/models/segv-tree/infer", json=body)
                counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
            except httpx.HTTPError:
                counts["error"] = counts.get("error", 0) + 1
            time.sleep(0.01)


def crash_loop(work: Path, package: Path, body: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tests._models import segv_tree

    bad = work / "segv.tar"
    bad.write_bytes(segv_tree().data)
    env = {"MODELCD_WORKER_CRASH_LIMIT": "1000000", "MODELCD_WORKER_RESTART_BACKOFF": "0.05",
           "MODELCD_WORKER_RESTART_BACKOFF_MAX": "0.2"}
    runs: dict[str, list[float]] = {"quiet": [], "noisy": []}
    codes: dict[str, int] = {}
    healthy_bad = 0
    with Node(work, "crashloop", [package, bad], env=env) as node:
        url = f"{node.url}/v2/models/iris/infer"
        bs.hey(url, body, duration=2, concurrency=8)  # warm-up
        for mode in ("quiet", "noisy", "quiet", "noisy"):
            stop = threading.Event()
            driver = threading.Thread(target=crash_driver, args=(node.url, stop, codes), daemon=True)
            if mode == "noisy":
                driver.start()
                time.sleep(1.0)
            r = bs.hey(url, body, duration=args.duration, concurrency=10, rate_per_worker=args.rate / 10)
            stop.set()
            if mode == "noisy":
                driver.join(15)
            healthy_bad += sum(n for c, n in r["codes"].items() if c != 200) + r["errors"]
            runs[mode].append(r["p99"])
            print(f"crash loop {mode:5}: iris at {args.rate:g}/s p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms "
                  f"codes {r['codes']}", flush=True)
        metrics = subprocess.run(["curl", "-s", f"{node.url}/metrics"], capture_output=True, text=True).stdout
    deaths = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("modelcd_worker_deaths_total{"))
    return {"quiet": runs["quiet"], "noisy": runs["noisy"], "driver_codes": codes, "deaths": deaths,
            "healthy_failed": healthy_bad,
            "ratio": statistics.median(runs["noisy"]) / statistics.median(runs["quiet"])}


def report(results: dict[str, Any], args: argparse.Namespace, command: str, rev: str) -> str:
    import uvicorn

    iso, old, ml = results["isolated"], results["in-process"], results.get("mlserver")
    ch, cl = results["channel"], results["crash"]
    load = os.getloadavg()
    lines = [
        "## isolation: worker-process node vs in-process node vs MLServer; a crash-looping neighbour "
        "(bench/bench_isolation.py)",
        "",
        f"{datetime.date.today()}, CPython {platform.python_version()}, {platform.machine()}, {os.cpu_count()} "
        f"shared cores, loaded by other agents' work (load average {load[0]:.1f} at the end of the run): compare "
        f"the ratios within this run, not the absolute figures. uvicorn {uvicorn.__version__}, hey on the same "
        f"machine. Baseline (in-process) = `{rev}`. Model: sklearn DecisionTreeClassifier(max_depth=3) on iris, "
        "one FP64 [1, 4] row per JSON request.",
        "",
        f"    {command}",
        "",
        f"| server | max req/s (c={args.concurrency}) | p50 ms | p99 ms | at {args.rate:g} req/s: p50 ms | p99 ms | "
        "failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("isolated", "in-process", "mlserver"):
        r = results.get(name)
        if r is None:
            continue
        bad = sum(n for run in (r["peak"], r["fixed"]) for c, n in run["codes"].items() if c != 200) + sum(
            run["errors"] for run in (r["peak"], r["fixed"]))
        lines.append(f"| {name} | {r['peak']['rps']:,.0f} | {r['peak']['p50']:.2f} | {r['peak']['p99']:.2f} | "
                     f"{r['fixed']['p50']:.2f} | {r['fixed']['p99']:.2f} | {bad} |")
    lines.append("")
    per_req = (1 / iso["peak"]["rps"] - 1 / old["peak"]["rps"]) * 1e6
    lines.append(f"- isolated vs in-process throughput: {iso['peak']['rps'] / old['peak']['rps']:.2f}x; per-request "
                 f"cost of isolation at saturation: {per_req:+.0f} µs (1/rps difference)")
    lines.append(f"- the channel alone (sequential, one caller): predict {ch['direct_us']:.0f} µs in-process vs "
                 f"{ch['worker_us']:.0f} µs through the worker: {ch['channel_us']:.0f} µs per call")
    if ml is not None:
        lines.append(f"- isolated vs MLServer: throughput {iso['peak']['rps'] / ml['peak']['rps']:.2f}x (goal ≥ 5x); "
                     f"p99 at {args.rate:g} req/s {iso['fixed']['p99']:.2f} ms vs {ml['fixed']['p99']:.2f} ms; "
                     f"in-process vs MLServer {old['peak']['rps'] / ml['peak']['rps']:.2f}x")
    lines.append(f"- neighbour crash loop: iris p99 at {args.rate:g} req/s quiet {cl['quiet']} ms, while segv-tree "
                 f"crash-loops {cl['noisy']} ms: ratio of medians {cl['ratio']:.2f} (goal < 1.5); the neighbour's "
                 f"worker died {cl['deaths']:.0f} times (driver saw {cl['driver_codes']}); iris failed "
                 f"{cl['healthy_failed']} requests")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per hey run")
    ap.add_argument("--concurrency", type=int, default=32, help="connections for the throughput run")
    ap.add_argument("--rate", type=float, default=400.0, help="offered requests/s for the latency runs")
    ap.add_argument("--baseline", help="git revision of the in-process node (default: before model workers)")
    ap.add_argument("--skip-mlserver", action="store_true")
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    if shutil.which("hey") is None:
        print("bench_isolation needs `hey`: apt-get install -y hey", file=sys.stderr)
        return 2
    rev = args.baseline or baseline_rev()
    rev = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        work = Path(tmp)
        package = bs.build_package(work)
        body = work / "body.json"
        body.write_text(json.dumps(bs.BODY))
        url = "/v2/models/iris/infer"
        results: dict[str, Any] = {}
        try:
            tree = checkout_baseline(rev, work)
            with Node(work, "isolated", [package]) as node:
                results["isolated"] = bs.measure("isolated", node.url + url, body, args)
            with Node(work, "in-process", [package], source=tree) as node:
                results["in-process"] = bs.measure("in-proc", node.url + url, body, args)
            if not args.skip_mlserver:
                results["mlserver"] = bs.bench_mlserver(work, body, args)
            results["channel"] = channel_cost(package)
            print(f"channel: {results['channel']}", flush=True)
            results["crash"] = crash_loop(work, package, body, args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "baseline")], cwd=ROOT,
                           capture_output=True)
    command = "python bench/bench_isolation.py " + " ".join(sys.argv[1:])
    text = report(results, args, command.strip(), rev)
    print("\n" + text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "isolation.json").write_text(json.dumps(results, indent=1, default=str))
    if args.append:
        with open(HERE / "RESULTS.md", "a") as fh:
            fh.write("\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
