"""Deploy propagation: from the deploy request to the model serving on every node, for 1, 2 and 3 nodes.

Run: python bench/bench_propagation.py [--nodes 1,2,3] [--n 20] [--json out.json]

Per node count, one `modelcd up --nodes N` (embedded broker, every node loads every model:
MODELCD_REPLICAS=0). `--n` deployments one after another, each a new version of a small
LogisticRegression (iris), uploaded through the deployment API (`POST /deployments`). From the
upload, this process polls every 10 ms the deployment (`GET /deployments/ID`) and each node's
`/v2/models/prop/versions/V/ready`, and records when the deployment completed and when each node
first answered ready. Split by step: ingest's own step durations (validate, compile, serving
validation, publish, from the deployment record), "queue+api" (upload to completed minus those
steps: the API, the deploy-request topic, waiting for the pipeline) and "to nodes" (completed to
the last node ready: the ModelState through the broker, each node's fetch and load).
Resolution: the 10 ms poll (and its own CPU on a shared machine).
Anchor: TF Serving finds a new version by polling its file system, every 1 s by default
(`--file_system_poll_wait_seconds=1`): 0.5 s on average, up to 1 s, before it even starts loading.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.bench_churn import iris_packages
from bench.common import System, machine
from bench.report import quantile

STEPS = ["validate", "compile", "serving-validation", "publish"]


def one(system: System, data: bytes, version: str, client: Any, timeout: float = 120) -> dict[str, Any]:
    t0 = time.monotonic()
    dep = system.deploy(data)
    ready: dict[str, float] = {}
    completed = None
    view: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout:
        if completed is None:
            view = client.get(f"{system.api}/deployments/{dep}").json()
            if view.get("status") == "completed":
                completed = time.monotonic() - t0
            elif view.get("status") == "failed":
                raise SystemExit(f"deployment failed: {json.dumps(view)[:400]}")
        for url in system.node_urls:
            if url not in ready:
                try:
                    if client.get(f"{url}/v2/models/prop/versions/{version}/ready").status_code == 200:
                        ready[url] = time.monotonic() - t0
                except Exception:  # noqa: BLE001 - a node busy loading may reset; poll again
                    pass
        if completed is not None and len(ready) == len(system.node_urls):
            break
        time.sleep(0.01)
    else:
        raise SystemExit(f"version {version} not on every node within {timeout:.0f} s")
    steps = {s["step"]: (s.get("duration_ms") or 0) / 1000 for s in view.get("steps", [])}
    ingest = sum(steps.get(s, 0.0) for s in STEPS)
    last = max(ready.values())
    return {"total": last, "completed": completed, "first_node": min(ready.values()),
            "steps": {s: steps.get(s, 0.0) for s in STEPS}, "queue_api": max(0.0, completed - ingest),
            "to_nodes": max(0.0, last - completed)}


def main() -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,3")
    ap.add_argument("--n", type=int, default=20, help="deployments per node count")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t_start = time.monotonic()
    results = []
    pkgs = iris_packages("prop", range(1, args.n + 2))
    for nodes in [int(n) for n in args.nodes.split(",")]:
        with System(nodes) as system, httpx.Client(timeout=5) as client:
            one(system, pkgs[0], "1", client)  # warm-up: the first load of the runtime on each node
            runs = [one(system, pkgs[i], str(i + 1), client) for i in range(1, args.n + 1)]
        summary = {"nodes": nodes, "n": len(runs), "runs": runs}
        for key in ("total", "completed", "queue_api", "to_nodes", "first_node"):
            vals = [r[key] for r in runs]
            summary[key] = {"median": quantile(vals, 0.5), "p95": quantile(vals, 0.95)}
        summary["steps"] = {s: quantile([r["steps"][s] for r in runs], 0.5) for s in STEPS}
        results.append(summary)
        print(f"{nodes} node(s): request -> every node median {summary['total']['median'] * 1000:.0f} ms, "
              f"p95 {summary['total']['p95'] * 1000:.0f} ms; to nodes median "
              f"{summary['to_nodes']['median'] * 1000:.0f} ms; steps "
              + ", ".join(f"{s} {v * 1000:.0f} ms" for s, v in summary["steps"].items()), flush=True)
    out = {"scenario": "propagation", "results": results, "elapsed_s": time.monotonic() - t_start,
           "machine": machine(), "command": "python bench/bench_propagation.py " + " ".join(sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
