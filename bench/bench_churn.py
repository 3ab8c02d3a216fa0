"""Churn isolation: the p99 of a steady load on a model while other models are deployed to the same node.

Run: python bench/bench_churn.py [--rate 300] [--phase 20] [--large-mb 200] [--json out.json]

One `modelcd up` (one node: the deployments go to the very node that answers). The hot model
(iris LogisticRegression, "hot") serves a fixed offered load from one `hey -q -o csv` run that
spans every phase, so all phases share one load generator and one process state:
  quiet, churn, quiet, churn  (each `--phase` s; churn = a new version of another model "churn"
  deployed through the API once a second, each a whole pipeline run: validate, compile,
  sandboxed validation, publish, load on the node)
  large                        (with `--large-mb`: a random forest of about that size deployed once)
Per phase: p50/p99 of the requests sent in it (hey's per-request offsets), failures; the ratio
churn p99 / quiet p99 (the goal: < 1.1). A 1-s time series of p99 is kept for the plot.
Note: ingest runs on the same machine, so its CPU use (compile, validation) competes with the
node for the same cores; in production ingest runs elsewhere. The figure is the whole system's.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.common import System, machine, need_hey, wait_http
from bench.report import hey_connections, parse_hey_csv, phase_stats, windows


def iris_packages(name: str, versions: range) -> list[bytes]:
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from modelcd.runtimes.build import build_package

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    return [build_package(model, name=name, version=str(v), owner="bench", expiry="30d",
                          sample_inputs={"input": x[:8]}).data for v in versions]


def large_package(mb: int) -> bytes:
    """A random forest whose package is about `mb` MB (fully grown trees on noise)."""
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    from modelcd.runtimes.build import build_package

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 20)).astype(np.float32)
    y = rng.integers(0, 2, size=20000)
    trees = max(1, round(mb / 0.57))  # a package holds ~0.57 MB per fully grown tree on 20k noisy rows (measured)
    forest = RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=1).fit(x, y)
    return build_package(forest, name="large", version="1", owner="bench", expiry="30d",
                         sample_inputs={"input": x[:4]}).data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=300.0, help="offered req/s on the hot model")
    ap.add_argument("--phase", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--large-mb", type=int, default=0, help="also deploy a forest of about this many MB (0: skip)")
    ap.add_argument("--large-timeout", type=float, default=300.0, help="seconds the large phase may last")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    need_hey()
    t_start = time.monotonic()
    churn_n = int(2 * args.phase) + 5
    print("building packages...", flush=True)
    hot = iris_packages("hot", range(1, 2))[0]
    churn = iris_packages("churn", range(1, churn_n + 1))
    large = large_package(args.large_mb) if args.large_mb else None
    if large:
        print(f"large package: {len(large) / 1e6:.0f} MB", flush=True)
    events: list[dict[str, Any]] = []
    with System(1, env={"MODELCD_PREDICTION_LOG_RATE": "0.01"}) as system:
        system.wait_deployed(system.deploy(hot))
        wait_http(f"{system.front}/v2/models/hot/ready", timeout=60)
        body = system.home / "body.json"
        body.write_text(json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                "data": [[5.1, 3.5, 1.4, 0.2]]}]}))
        import subprocess

        phases = [("quiet", args.phase), ("churn", args.phase), ("quiet", args.phase), ("churn", args.phase)]
        total = sum(p[1] for p in phases) + (args.large_timeout if large else 0) + 2
        c = hey_connections(args.rate)
        # A warm-up at the rate, then the measured run spanning every phase.
        subprocess.run(["hey", "-z", "3s", "-c", str(c), "-q", f"{args.rate / c:.3f}", "-m", "POST", "-T",
                        "application/json", "-D", str(body), f"{system.front}/v2/models/hot/infer"],
                       capture_output=True, check=True, timeout=60)
        proc = subprocess.Popen(["hey", "-z", f"{total}s", "-c", str(c), "-q", f"{args.rate / c:.3f}", "-t", "20",
                                 "-o", "csv", "-m", "POST", "-T", "application/json", "-D", str(body),
                                 f"{system.front}/v2/models/hot/infer"], stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        bounds: list[dict[str, Any]] = []
        out_holder: dict[str, str] = {}
        reader = threading.Thread(target=lambda: out_holder.update(out=proc.communicate()[0]), daemon=True)
        reader.start()
        it = iter(churn)
        deployed_churn = []
        for name, seconds in phases:
            start = time.monotonic() - t0
            end_at = t0 + start + seconds
            while time.monotonic() < end_at:
                if name == "churn":
                    tick = time.monotonic()
                    dep = system.deploy(next(it))
                    deployed_churn.append(dep)
                    events.append({"t": tick - t0, "what": "deploy"})
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
                else:
                    time.sleep(min(0.2, max(0.0, end_at - time.monotonic())))
            bounds.append({"phase": name, "start": start, "end": time.monotonic() - t0})
        large_result: dict[str, Any] = {}
        if large:
            start = time.monotonic() - t0
            events.append({"t": start, "what": "deploy large"})
            try:
                dep = system.deploy(large)
                view = system.wait_deployed(dep, timeout=args.large_timeout)
                wait_http(f"{system.front}/v2/models/large/ready", timeout=max(5.0, args.large_timeout -
                                                                                 (time.monotonic() - t0 - start)))
                large_result = {"ok": True, "steps": view.get("steps"), "seconds": time.monotonic() - t0 - start}
            except SystemExit as e:
                large_result = {"ok": False, "error": str(e)[:500], "seconds": time.monotonic() - t0 - start}
            bounds.append({"phase": "large", "start": start, "end": time.monotonic() - t0})
        proc.send_signal(signal.SIGINT)  # hey reports what it has on SIGINT
        reader.join(60)
        rows = parse_hey_csv(out_holder.get("out", ""))
        # How many of the churn deployments had completed by the end (the rest were still queued).
        done = sum(1 for d in deployed_churn if system.deployment(d).get("status") == "completed")
    stats = [{**b, **phase_stats(rows, b["start"], b["end"])} for b in bounds]
    for s in stats:
        print(f"{s['phase']:6} {s['start']:6.1f}-{s['end']:6.1f}s n={s['n']:6} p50 {s['p50']:.2f} ms "
              f"p99 {s['p99']:.2f} ms failed {s['failed']}", flush=True)
    out = {"scenario": "churn", "rate": args.rate, "phase_s": args.phase, "phases": stats,
           "series": windows(rows, 1.0), "events": events, "large": large_result,
           "large_mb": (len(large) / 1e6) if large else 0, "churn_deployed": len(deployed_churn),
           "churn_completed": done, "elapsed_s": time.monotonic() - t_start, "machine": machine(),
           "command": "python bench/bench_churn.py " + " ".join(sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
