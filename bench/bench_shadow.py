"""Primary latency and throughput with no shadow vs one 100 % shadow, same run; and the load at which shadowing pauses.

Run: python bench/bench_shadow.py [--append] [--seconds 5] [--rounds 3] [--concurrency 8]

Setup: the embedded broker, a local store, one serving node in its own process (`modelcd serve`),
two iris decision trees (iris:1 the primary, iris:2 the shadow). The client runs in this process
(httpx, `--concurrency` closed-loop workers, single-row requests to the `iris` endpoint).

Comparison at a load the node sustains: first the node's capacity without a shadow is measured
(closed loop, `--concurrency` workers); then requests are sent open-loop at `--load` x that
capacity (default 50 %), in rounds that alternate "no shadow" and "100 % shadow" phases of
`--seconds` each (the TrafficPolicy is switched between them, and each phase waits until the
node applied it), so drift on a shared machine hits both modes alike. Per mode: the median over
rounds of each phase's achieved throughput and client-side p50 / p99.

Pause load: with the 100 % shadow, closed-loop concurrency doubles (hey, a Go load generator,
from 4; httpx from 1 if hey is absent) until the node's `modelcd_shadow_pauses_total` moves (or
the ramp ends); we report the concurrency, the node's throughput there, the shadow jobs dropped,
and whether shadowing resumed by itself once the load fell.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelcd.events.broker import EmbeddedBroker, free_port  # noqa: E402
from modelcd.events.bus import Publisher  # noqa: E402
from modelcd.events.schemas import Route, ShadowRelation, TrafficPolicy  # noqa: E402
from modelcd.ingest.store import open_store  # noqa: E402
from bench.bench_serving import hey  # noqa: E402
from tests._serving import deploy, infer_body, iris_package, set_traffic  # noqa: E402

BODY = infer_body([[5.1, 3.5, 1.4, 0.2]])


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s))) - 1))]


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def load(client: httpx.AsyncClient, concurrency: int, seconds: float) -> tuple[int, int, list[float], float]:
    """(ok, failed, latencies in ms, elapsed s) of closed-loop workers for `seconds`."""
    latencies: list[float] = []
    failed = 0
    deadline = time.perf_counter() + seconds
    counter = 0

    async def worker(w: int) -> None:
        nonlocal failed, counter
        while time.perf_counter() < deadline:
            counter += 1
            t0 = time.perf_counter()
            r = await client.post("/v2/models/iris/infer", json=BODY, headers={"x-request-id": f"w{w}-{counter}"})
            if r.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(latencies), failed, latencies, time.perf_counter() - t0


async def paced(client: httpx.AsyncClient, rate: float, seconds: float) -> tuple[int, int, list[float], float]:
    """(ok, failed, latencies in ms, elapsed s) of requests started every 1/rate s (open loop)."""
    latencies: list[float] = []
    failed = 0
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        r = await client.post("/v2/models/iris/infer", json=BODY, headers={"x-request-id": f"p{i}"})
        if r.status_code == 200:
            latencies.append((time.perf_counter() - t0) * 1000)
        else:
            failed += 1

    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return len(latencies), failed, latencies, time.perf_counter() - start


async def apply_policy(store: object, pub: Publisher, client: httpx.AsyncClient, shadow: bool, revision: int) -> None:
    policy = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)], revision=revision,
                           shadows=[ShadowRelation(primary="iris", shadow="iris:2")] if shadow else [])
    await set_traffic(store, pub, policy)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # applied when a probe request is (or is not) matched
        before = await metric(client, "modelcd_shadow_matched_total")
        await client.post("/v2/models/iris/infer", json=BODY)
        after = await metric(client, "modelcd_shadow_matched_total")
        if (after > before) == shadow:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the node did not apply the traffic policy within 30 s")


async def run(args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    broker = EmbeddedBroker(port=free_port(), log_file=tmp / "broker.log")
    await broker.start()
    node: subprocess.Popen[bytes] | None = None
    try:
        store_url = str(tmp / "store")
        async with open_store(store_url) as store, Publisher(broker.config, "bench") as pub:
            await deploy(store, pub, iris_package("iris", "1", depth=3))
            await deploy(store, pub, iris_package("iris", "2", depth=2))
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
            env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="off",
                       MODELCD_STORE_URL=store_url, MODELCD_HOME=str(tmp / "home"), MODELCD_LOG_FORMAT="json",
                       MODELCD_PREDICTION_LOG_RATE="0.01")
            log_path = tmp / "node.log"
            with open(log_path, "wb") as log_file:
                node = subprocess.Popen([sys.executable, "-c", "import sys; from modelcd.cli import main; "
                                         "sys.exit(main())", "serve", "--port", str(port)],
                                        env=env, stderr=log_file, stdout=subprocess.DEVNULL)
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as client:
                for _ in range(600):
                    try:
                        if (await client.get("/v2/health/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"node not ready; see {log_path}")
                revision = 1
                await apply_policy(store, pub, client, False, revision)
                use_hey = shutil.which("hey") is not None
                body_file = tmp / "body.json"
                body_file.write_text(json.dumps(BODY))
                url = f"http://127.0.0.1:{port}/v2/models/iris/infer"

                async def drive(concurrency: int, rate: float = 0.0) -> tuple[float, float, float, int]:
                    """(req/s, p50 ms, p99 ms, failed): hey if present (a Go client does not saturate first)."""
                    if use_hey:
                        h = await asyncio.to_thread(hey, url, body_file, duration=args.seconds,
                                                    concurrency=concurrency, rate_per_worker=rate / concurrency)
                        bad = h["errors"] + sum(n for code, n in h["codes"].items() if code != 200)
                        return h["rps"], h["p50"], h["p99"], bad
                    if rate:
                        ok, failed, lat, elapsed = await paced(client, rate, args.seconds)
                    else:
                        ok, failed, lat, elapsed = await load(client, concurrency, args.seconds)
                    return ok / elapsed, pct(lat, 50), pct(lat, 99), failed

                await load(client, args.concurrency, 1.0)  # warm-up
                capacity, _p50, _p99, failures = await drive(args.concurrency)
                rate = args.load * capacity
                results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
                comparison_pauses = 0
                for _ in range(args.rounds):
                    for shadow in (False, True):
                        revision += 1
                        await apply_policy(store, pub, client, shadow, revision)
                        pauses0 = await metric(client, "modelcd_shadow_pauses_total")
                        rps, p50, p99, failed = await drive(args.concurrency, rate)
                        comparison_pauses += int(await metric(client, "modelcd_shadow_pauses_total") - pauses0)
                        failures += failed
                        results[shadow].append((rps, p50, p99))
                completed = await metric(client, "modelcd_shadow_completed_total")

                # Pause load: offered load rises step by step (a fixed rate per step) until the node pauses.
                pause_at = None
                ramp = []
                resumed = None
                revision += 1
                await apply_policy(store, pub, client, True, revision)
                steps = [capacity * f for f in (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)] + [0.0]  # 0: unlimited
                for offered in steps:
                    pauses0 = await metric(client, "modelcd_shadow_pauses_total")
                    dropped0 = await metric(client, "modelcd_shadow_dropped_paused_total") + await metric(
                        client, "modelcd_shadow_dropped_full_total")
                    completed0 = await metric(client, "modelcd_shadow_completed_total")
                    rps, _p50, p99, failed = await drive(args.concurrency, offered)
                    failures += failed
                    busy = await metric(client, "modelcd_shadow_loop_busy")
                    pauses = await metric(client, "modelcd_shadow_pauses_total") - pauses0
                    dropped = await metric(client, "modelcd_shadow_dropped_paused_total") + await metric(
                        client, "modelcd_shadow_dropped_full_total") - dropped0
                    done = await metric(client, "modelcd_shadow_completed_total") - completed0
                    ramp.append((offered, rps, p99, busy, int(pauses), int(dropped), int(done)))
                    if pauses > 0:
                        pause_at = offered
                        break
                if pause_at is not None:
                    # Load falls: shadowing must resume by itself (hysteresis), and shadow work complete again.
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        await client.post("/v2/models/iris/infer", json=BODY)
                        if await metric(client, "modelcd_shadow_paused") == 0:
                            before = await metric(client, "modelcd_shadow_completed_total")
                            await load(client, 1, 1.0)
                            resumed = await metric(client, "modelcd_shadow_completed_total") - before
                            break
                        await asyncio.sleep(0.2)
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        await broker.stop()
    node_log = (tmp / "node.log").read_text(errors="replace").splitlines()
    paused_lines = sum(1 for line in node_log if "shadowing paused" in line)
    reasons = ", ".join(sorted({m.group(1) for line in node_log if "shadowing paused" in line
                                for m in [re.search(r'"reason": ?"([^"]+)"', line)] if m}))

    client_name = "hey" if use_hey else "httpx"

    def med(shadow: bool, i: int) -> float:
        return statistics.median(r[i] for r in results[shadow])

    base_rps, base_p50, base_p99 = med(False, 0), med(False, 1), med(False, 2)
    sh_rps, sh_p50, sh_p99 = med(True, 0), med(True, 1), med(True, 2)
    today = datetime.date.today().isoformat()
    lines = [
        "",
        "## shadow: primary latency and throughput, no shadow vs one 100 % shadow (bench/bench_shadow.py)",
        "",
        f"{today}, CPython {platform.python_version()}, {platform.machine()}, 2 shared cores; embedded Tansu broker; "
        f"node in its own process, load from {client_name} in another; iris decision trees (primary depth 3, "
        "shadow depth 2).",
        f"Command: `python bench/bench_shadow.py --append --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--concurrency {args.concurrency} --load {args.load:g}`",
        "",
        f"Capacity without shadow (closed loop, {args.concurrency} connections): {capacity:,.0f} req/s. Comparison "
        f"at a fixed offered {rate:,.0f} req/s ({args.load:.0%} of it), alternating {args.seconds:g}-s phases, "
        f"median of {args.rounds} rounds (pauses during the shadow phases: {comparison_pauses}):",
        "",
        "| mode | throughput (req/s) | p50 (ms) | p99 (ms) |",
        "| --- | --- | --- | --- |",
        f"| no shadow | {base_rps:,.0f} | {base_p50:.2f} | {base_p99:.2f} |",
        f"| 100 % shadow | {sh_rps:,.0f} | {sh_p50:.2f} | {sh_p99:.2f} |",
        f"| difference | {100 * (sh_rps / base_rps - 1):+.1f} % | {100 * (sh_p50 / base_p50 - 1):+.1f} % | "
        f"{100 * (sh_p99 / base_p99 - 1):+.1f} % |",
        "",
        f"Failed primary requests over the whole run: {failures}. Shadow predictions completed in the comparison "
        f"phases: {int(completed)}.",
        "",
        f"Pause ramp (100 % shadow, {args.concurrency} connections of {client_name}, offered load rising "
        f"{args.seconds:g} s a step; default thresholds: queue 800, loop lag 100 ms, loop busy 90 %):",
        "",
        "| offered (req/s) | served (req/s) | p99 (ms) | node loop busy at the end | pauses | shadow jobs dropped "
        "| shadow predictions done |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {f'{o:,.0f}' if o else 'unlimited'} | {rps:,.0f} | {p99:.2f} | {b:.0%} | {p} | {d} | {n} |"
          for o, rps, p99, b, p, d, n in ramp],
        "",
        (f"Shadowing paused at an offered {f'{pause_at:,.0f} req/s' if pause_at else 'unlimited load'} "
         f"(served {ramp[-1][1]:,.0f} req/s, {ramp[-1][1] / capacity:.0%} of the no-shadow capacity) ({paused_lines} 'shadowing paused' "
         f"log lines; reasons: {reasons or '-'}); primary requests failed over the whole run: {failures}. "
         + (f"Once the load fell, shadowing resumed by itself and completed {int(resumed)} shadow predictions "
            "in the next second." if resumed is not None else "It had not resumed 30 s after the load fell.")
         if pause_at else f"Shadowing did not pause up to concurrency {ramp[-1][0] if ramp else '-'}: this client (one "
                          f"Python process) saturates before the node, whose loop stayed at most "
                          f"{max((r[3] for r in ramp), default=0):.0%} busy, with no shadow job queued or dropped."),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.5, help="comparison load, as a share of the measured capacity")
    args = ap.parse_args()
    try:
        import uvloop

        text = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        text = asyncio.run(run(args))
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
