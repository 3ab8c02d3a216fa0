"""The router's added cost per request: keyed split over 3 models vs calling the model directly.

Run: python bench/bench_router.py [--append]   (--append adds the result to bench/RESULTS.md)

"Direct" is one prediction of a small in-process model (a 4-feature, 3-class linear model in
numpy, i.e. about the cheapest real model a node serves). "Routed" is the same call behind
`CompiledPolicy.pick` with a sticky key over a 3-route policy (A 80 / B 15 / C 5), each request
with a different key, as the request path does it. Both are timed in the same run with timeit
(best of several repeats), so the ratio compares like with like on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import timeit
from pathlib import Path

import numpy as np

from modelcd.events.schemas import Route, TrafficPolicy
from modelcd.serving.router import compile_policy

N = 20_000
REPEAT = 5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    models = {v: (weights + i, bias) for i, v in enumerate(("1", "2", "3"))}
    x = rng.normal(size=(1, 4))

    def predict(version: str) -> int:
        w, b = models[version]
        return int(np.argmax(x @ w + b))

    policy = compile_policy(TrafficPolicy(endpoint="iris", routes=[
        Route(model="iris", version="1", weight=80.0), Route(model="iris", version="2", weight=15.0),
        Route(model="iris", version="3", weight=5.0)]))
    assert policy is not None
    keys = [f"user-{i}" for i in range(N)]

    def direct() -> None:
        for _ in keys:
            predict("1")

    def routed() -> None:
        for k in keys:
            predict(policy.pick(k, 0.5).version)

    def pick_only() -> None:
        for k in keys:
            policy.pick(k, 0.5)

    t_direct = min(timeit.repeat(direct, number=1, repeat=REPEAT)) / N
    t_routed = min(timeit.repeat(routed, number=1, repeat=REPEAT)) / N
    t_pick = min(timeit.repeat(pick_only, number=1, repeat=REPEAT)) / N
    ratio = t_routed / t_direct
    line = (f"| {datetime.date.today()} | {platform.python_implementation()} {platform.python_version()} | "
            f"{t_direct * 1e6:.2f} µs | {t_routed * 1e6:.2f} µs | {t_pick * 1e6:.2f} µs | {ratio:.2f}× |")
    print("direct model call    %.2f µs" % (t_direct * 1e6))
    print("routed (3 models)    %.2f µs" % (t_routed * 1e6))
    print("router pick alone    %.2f µs" % (t_pick * 1e6))
    print("ratio routed/direct  %.2fx" % ratio)
    if args.append:
        results = Path(__file__).with_name("RESULTS.md")
        if not results.exists():
            results.write_text("# Benchmark results\n")
        text = results.read_text()
        header = "## Router: keyed split of 3 models vs direct model call"
        if header not in text:
            text += (f"\n{header}\n\nCommand: `python bench/bench_router.py --append` (timeit, best of {REPEAT}, "
                     f"{N} requests with distinct keys; the model is a 4×3 numpy linear classifier)\n\n"
                     "| date | python | direct | routed | pick alone | routed / direct |\n"
                     "| --- | --- | --- | --- | --- | --- |\n")
        results.write_text(text + line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
