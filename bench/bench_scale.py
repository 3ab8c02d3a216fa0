"""Scale in models: N small models on one node; memory, load rate, restart-to-ready, a cold first request.

Run: python bench/bench_scale.py [--counts 10,100,1000] [--budget 4GiB] [--ingest-n 20] [--json out.json]

Per N, a fresh `modelcd up` (one node, MODELCD_MEMORY_BUDGET=`--budget`):
1. a hot model ("hot", iris LogisticRegression) deployed and serving a fixed load (`--rate`, hey -q)
   for the whole step; its p50/p99 over the step is "the hot model's p99 meanwhile";
2. N small models (iris LogisticRegression, one name each) through the Kafka door in bulk: the
   packages written to the store and a ModelState per model published on `modelcd.model-state`
   (what ingest's publish step does, without its per-model validation: ingest's own rate is
   measured apart, in step 6); time until the node's loads counter says all are loaded (or the
   budget stopped it), hence models loaded per minute by the node;
3. the node's resident memory: RSS and PSS (shared pages split among sharers) of the serving
   process and all its model workers, before and after; per-model overhead = PSS delta / N;
4. the first request of a model not loaded (evicted under the budget, or never loaded), timed
   from this process (one request, connection already open);
5. restart-to-ready: the serving child SIGKILLed (the supervisor restarts it) until the node
   answers /v2/health/ready (what its requests used loads before ready, serving/recent.py), and
   until the rest of its hot set (the newest models that fit the budget) has loaded after;
6. once (first N only): `--ingest-n` deployments through the API at once, deployments per minute
   on one ingest (each one validated, compiled and checked in a sandbox).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.bench_churn import iris_packages
from bench.common import System, finish, hey_async, machine, need_hey, pss_tree, wait_http


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise SystemExit(f"bad size {text!r}")
    unit = (m.group(2) or "").upper()[:1]
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit])


def metrics(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$', line)
        if m:
            key = m.group(1) + ("{ok}" if m.group(2) and 'outcome="ok"' in m.group(2) else "")
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def loaded(url: str) -> tuple[int, int]:
    m = metrics(url)
    return int(m.get("modelcd_model_loads_total{ok}", 0)), int(m.get("modelcd_model_evictions_total", 0))


def _build(names: list[str]) -> list[bytes]:
    """Packages of one small model under each name (run in a pool: ~25 ms each)."""
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from modelcd.runtimes.build import build_package

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    return [build_package(model, name=name, version="1", owner="bench", expiry="30d",
                          sample_inputs={"input": x[:4]}, verify=False).data for name in names]


def build_packages(n: int) -> list[bytes]:
    """N small packages (m00000, m00001, ...), built on every core before the clock starts."""
    from concurrent.futures import ProcessPoolExecutor

    names = [f"m{i:05d}" for i in range(n)]
    cores = max(1, os.cpu_count() or 1)
    chunks = [names[i::cores] for i in range(cores)]
    with ProcessPoolExecutor(cores) as pool:
        parts = list(pool.map(_build, chunks))
    by_name = dict(zip([nm for chunk in chunks for nm in chunk], [d for part in parts for d in part], strict=True))
    return [by_name[nm] for nm in names]


async def publish_models(system: System, packages: list[bytes]) -> None:
    """The packages into the store and their ModelStates on the topic: the Kafka door, in bulk."""
    from modelcd.events.bus import KafkaConfig, Publisher
    from modelcd.events.schemas import ModelState
    from modelcd.store.blobs import open_store, put_package
    from modelcd.store.package import read_package
    from modelcd.store.targets import TargetState

    bootstrap = f"127.0.0.1:{system.env['MODELCD_BROKER_PORT']}"
    async with open_store(str(system.home / "store")) as store, \
            Publisher(KafkaConfig(bootstrap=bootstrap, idempotence=False), "bench") as pub:
        targets = TargetState(store)
        acks = []
        for data in packages:  # what ingest's publish step writes: the package, the target, the ModelState
            sha = await put_package(store, data)
            m = read_package(data).manifest
            state = ModelState(name=m.name, version=m.version, target="serving", package_uri=f"packages/{sha}",
                               sha256=sha, runtime=m.runtime, flavor=m.flavor, owner=m.owner,
                               expiry_seconds=m.expiry_seconds, deployed_at=time.time())
            await targets.put_model(state)
            acks.append(await pub.publish_nowait(state))  # in bulk: acknowledged together below
        await asyncio.gather(*acks)


def first_request(url: str, name: str) -> float:
    import httpx

    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]}
    with httpx.Client(timeout=60) as client:
        client.get(f"{url}/v2/health/live")  # the connection open before the clock starts
        t0 = time.perf_counter()
        r = client.post(f"{url}/v2/models/{name}/infer", json=body)
        took = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise SystemExit(f"{name} answered {r.status_code}: {r.text[:300]}")
    return took


def step(n: int, args: argparse.Namespace, hot: bytes, ingest_pkgs: list[bytes] | None) -> dict[str, Any]:
    env = {"MODELCD_MEMORY_BUDGET": str(args.budget)}
    out: dict[str, Any] = {"n": n, "budget": args.budget}
    packages = build_packages(n)
    with System(1, env=env) as system:
        node = system.front
        system.wait_deployed(system.deploy(hot))
        wait_http(f"{node}/v2/models/hot/ready", timeout=60)
        body = system.home / "body.json"
        body.write_text(json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                "data": [[5.1, 3.5, 1.4, 0.2]]}]}))
        pids = system.node_pids()
        before = pss_tree(pids[0]) if pids else {}
        loads0, ev0 = loaded(node)
        load = hey_async(f"{node}/v2/models/hot/infer", body, seconds=args.timeout, rate=args.rate)
        t0 = time.monotonic()
        asyncio.run(publish_models(system, packages))
        published = time.monotonic() - t0
        stalled_since, last = time.monotonic(), (loads0, ev0)
        while time.monotonic() - t0 < args.timeout:
            loads, ev = loaded(node)
            if loads - loads0 >= n:
                break
            if (loads, ev) != last:
                last, stalled_since = (loads, ev), time.monotonic()
            elif time.monotonic() - stalled_since > 20:
                break  # nothing loaded for 20 s: what is left waits for its first request (budget)
            time.sleep(0.25)
        load_s = time.monotonic() - t0
        loads, ev = loaded(node)
        load.send_signal(signal.SIGINT)
        hot_stats = finish(load)
        after = pss_tree(pids[0]) if pids else {}
        out.update(published_s=published, load_s=load_s, loaded=loads - loads0, evicted=ev - ev0,
                   per_minute=(loads - loads0) / load_s * 60 if load_s else 0.0, hot=hot_stats,
                   before=before, after=after,
                   per_model_pss=(after.get("pss", 0) - before.get("pss", 0)) / max(1, n),
                   per_model_rss=(after.get("rss", 0) - before.get("rss", 0)) / max(1, n))
        print(f"N={n}: published in {published:.1f} s, {loads - loads0} loaded ({ev - ev0} evicted) in "
              f"{load_s:.1f} s; PSS {before.get('pss', 0) / 2**20:.0f} -> {after.get('pss', 0) / 2**20:.0f} MiB "
              f"({out['per_model_pss'] / 2**20:.1f} MiB/model, {after.get('processes')} processes); hot p99 "
              f"{hot_stats['p99']:.2f} ms", flush=True)
        # 4. the first request of the model least recently loaded (evicted if anything was)
        try:
            out["first_request_ms"] = first_request(node, "m00000")
            out["first_request_model_state"] = "evicted" if ev - ev0 else (
                "never loaded" if loads - loads0 < n else "loaded, first request")
        except SystemExit as e:
            out["first_request_error"] = str(e)
        # 5. restart-to-ready
        pids = system.node_pids()
        if pids:
            t1 = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(0.05)
            try:
                out["restart_to_ready_s"] = wait_http(f"{node}/v2/health/ready", timeout=args.timeout) + 0.05
                out["restart_loaded"] = loaded(node)[0]
                last, still_since = out["restart_loaded"], time.monotonic()
                while time.monotonic() - still_since < 3 and time.monotonic() - t1 < args.timeout:
                    time.sleep(0.25)
                    if (now := loaded(node)[0]) != last:
                        last, still_since = now, time.monotonic()
                out["restart_hot_set_loaded"] = last
                out["restart_hot_set_s"] = still_since - t1
            except SystemExit as e:
                out["restart_error"] = str(e)
            out["restart_wall_s"] = time.monotonic() - t1
            print(f"N={n}: restart-to-ready {out.get('restart_to_ready_s', float('nan')):.2f} s "
                  f"({out.get('restart_loaded')} loaded; {out.get('restart_hot_set_loaded')} after "
                  f"{out.get('restart_hot_set_s', float('nan')):.1f} s); first request of m00000 "
                  f"({out.get('first_request_model_state')}) {out.get('first_request_ms', float('nan')):.1f} ms",
                  flush=True)
        # 6. deployments/min on one ingest
        if ingest_pkgs:
            t2 = time.monotonic()
            ids = [system.deploy(p) for p in ingest_pkgs]
            for d in ids:
                system.wait_deployed(d, timeout=args.timeout)
            took = time.monotonic() - t2
            out["ingest"] = {"n": len(ids), "seconds": took, "per_minute": len(ids) / took * 60}
            print(f"ingest: {len(ids)} deployments through the API in {took:.1f} s = "
                  f"{len(ids) / took * 60:.0f}/min", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,100,1000")
    ap.add_argument("--budget", type=parse_size, default=parse_size("4GiB"))
    ap.add_argument("--rate", type=float, default=200.0, help="offered req/s on the hot model")
    ap.add_argument("--ingest-n", type=int, default=20, help="deployments through the API (0: skip)")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound of each wait (s)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    need_hey()
    t_start = time.monotonic()
    hot = iris_packages("hot", range(1, 2))[0]
    ingest_pkgs = iris_packages("viaapi", range(1, args.ingest_n + 1)) if args.ingest_n else None
    results = []
    for i, n in enumerate(int(c) for c in args.counts.split(",")):
        results.append(step(n, args, hot, ingest_pkgs if i == 0 else None))
    out = {"scenario": "scale", "results": results, "elapsed_s": time.monotonic() - t_start, "machine": machine(),
           "command": "python bench/bench_scale.py " + " ".join(sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
