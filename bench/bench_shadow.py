"""Primary latency and throughput with no shadow vs one 100 % shadow, same run; and the load at which shadowing pauses.

Run: python bench/bench_shadow.py [--write] [--seconds 4] [--rounds 5] [--loads 0.25,0.35] [--heavy-trees 25]

Setup: the embedded broker, a local store, one serving node in its own process (`modelcd serve`),
iris models: iris:1 the primary (decision tree, depth 3), iris:2 a cheap shadow (tree, depth 2)
and, with `--heavy-trees N`, iris:3 a heavier shadow (random forest of N trees, slow enough to run
in the node's thread pool, as a bigger challenger would). Load comes from `hey` (a Go load
generator, another process) on loopback; without hey the bench falls back, saying so, to an
httpx client in this process, which saturates near 1,000 req/s, before the node.

1. Capacity: closed loop, `--concurrency` connections, no shadow, `--seconds`.
2. Comparison at loads the node sustains: `--loads` x capacity, offered by hey at a fixed rate
   (`--connections` connections, hey -q), in `--rounds` rounds of a "no shadow" and a "100 %
   shadow" phase of `--seconds` each, ABBA order (the TrafficPolicy is switched between phases
   and each phase waits until the node applied it), so drift on a shared machine hits both
   modes alike. p50 / p99 per phase as hey reports them (in 0.1-ms steps: 2-3 % of a 3-5 ms p99);
   per mode the median over rounds, and the ratio shadow / none.
   hey's rate-limited workers tick in step, so requests arrive in bursts of `--connections`:
   8 keeps the bursts small (at 1,500 req/s, p50 is 1.3 ms with 8 connections, 5 ms with 32,
   for the same node) while leaving each worker several ms of slack per request.
3. Pause ramp, per shadow: the offered rate rises in steps of 5 % of capacity (`--step-seconds`
   each, up to 120 %), then closed loop at 8, 32, 128 connections, until the node's
   `modelcd_shadow_pauses_total` moves. /metrics is scraped every 0.25 s during a step (loop
   busy share, shadow queue depth, paused gauge); the node's "shadowing paused" log line says
   which signal tripped (reason=queue | loop_lag | loop_busy | primary_p99). hey's status
   codes and transport errors count failed primary requests. The pausing load is then held
   for two steps' time (does it flap: pause, resume, pause?).
4. Resume: the offered load drops to half the pausing step's; we read the paused gauge
   (`modelcd_shadow_paused`) every 0.25 s, count shadow predictions completed and any pause
   after the resume, and pair the node's "shadowing paused" / "shadowing resumed" log lines
   into pause durations.

Every hey run is bounded (`-z`), every wait has a deadline; the default run takes about 3 minutes.
`--write` replaces the shadow section of bench/RESULTS.md (appends it if absent).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import hey
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher
from modelcd.events.schemas import Route, ShadowRelation, TrafficPolicy
from modelcd.store.blobs import open_store
from tests._serving import _iris, deploy, infer_body, iris_package, set_traffic

BODY = infer_body([[5.1, 3.5, 1.4, 0.2]])
HEADING = "## shadow: primary latency and throughput"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, -(-int(p * len(s)) // 100) - 1))]


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The node's /metrics, one value per metric name (labelled series summed)."""
    out: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def dropped(m: dict[str, float]) -> float:
    return m.get("modelcd_shadow_dropped_paused_total", 0.0) + m.get("modelcd_shadow_dropped_full_total", 0.0)


# --------------------------------------------------------------------------- load: hey, or httpx as a fallback


async def httpx_load(client: httpx.AsyncClient, connections: int, seconds: float, rate: float) -> dict[str, Any]:
    """The fallback: `connections` workers in this process, closed loop, or paced to `rate` req/s in all."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors = 0
    start = time.perf_counter()
    deadline = start + seconds
    interval = connections / rate if rate else 0.0

    async def worker(w: int) -> None:
        nonlocal errors
        i = 0
        while True:
            due = start + w * interval / connections + i * interval
            if due >= deadline or time.perf_counter() >= deadline:
                return
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            i += 1
            t0 = time.perf_counter()
            try:
                r = await client.post("/v2/models/iris/infer", json=BODY)
            except httpx.TransportError:
                errors += 1
                continue
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                lat.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker(w) for w in range(connections)))
    return {"rps": len(lat) / (time.perf_counter() - start), "p50": pct(lat, 50), "p99": pct(lat, 99),
            "codes": codes, "errors": errors}


def failed(h: dict[str, Any]) -> int:
    return int(h["errors"] + sum(n for code, n in h["codes"].items() if not 200 <= code < 300))


# --------------------------------------------------------------------------- the node's log


class NodeLog:
    """Reads the node's JSON log as it grows: pause reasons and resume lines since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_events(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and d.get("event") in ("shadowing paused", "shadowing resumed"):
                events.append(d)
        return events


@dataclass
class Step:
    label: str
    connections: int
    offered: float  # req/s; 0: closed loop
    rps: float = 0.0
    p99: float = 0.0
    failed: int = 0
    busy_max: float = 0.0
    queue_max: float = 0.0
    pauses: int = 0
    dropped: int = 0
    completed: int = 0
    reasons: list[str] = field(default_factory=list)
    pause_lines: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Ramp:
    shadow: str
    steps: list[Step] = field(default_factory=list)
    paused_at: Step | None = None
    hold: Step | None = None  # the pausing load held on: how often it pauses and resumes there
    resume_offered: float = 0.0
    paused_at_drop: bool = False
    resume_after_s: float | None = None
    resume_completed: int = 0
    resume_matched: int = 0
    resume_failed: int = 0
    repauses: int = 0
    pauses_total: int = 0
    paused_at_end: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)  # the node's pause / resume log lines

    @property
    def resumes(self) -> int:
        return sum(1 for e in self.events if e["event"] == "shadowing resumed")

    def pause_durations(self) -> list[float]:
        """Seconds from each logged pause to the next logged resume."""
        out, since = [], None
        for e in self.events:
            t = datetime.datetime.fromisoformat(str(e.get("timestamp", ""))).timestamp()
            if e["event"] == "shadowing paused":
                since = t
            elif since is not None:
                out.append(t - since)
                since = None
        return out


# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    broker = EmbeddedBroker(port=free_port(), log_file=tmp / "broker.log")
    await broker.start()
    node: subprocess.Popen[bytes] | None = None
    use_hey = shutil.which("hey") is not None
    if not use_hey:
        print("bench_shadow: `hey` not found (apt-get install -y hey): falling back to an httpx client in this "
              "process, which saturates near 1,000 req/s before the node does; the pause ramp will likely not "
              "reach the pause, and latencies include this client's own queueing.", file=sys.stderr, flush=True)
    t_start = time.monotonic()
    try:
        store_url = str(tmp / "store")
        async with open_store(store_url) as store, Publisher(broker.config, "bench") as pub:
            await deploy(store, pub, iris_package("iris", "1", depth=3))
            await deploy(store, pub, iris_package("iris", "2", depth=2))
            # More cheap shadows for the 3-shadow mode (`--modes`): trees as cheap as the primary.
            await deploy(store, pub, iris_package("iris", "4", depth=1))
            await deploy(store, pub, iris_package("iris", "5", depth=4))
            if args.heavy_trees:
                from sklearn.ensemble import RandomForestClassifier

                from modelcd.runtimes.build import build_package

                x, y = _iris()
                forest = RandomForestClassifier(n_estimators=args.heavy_trees, random_state=0).fit(x, y)
                await deploy(store, pub, build_package(forest, name="iris", version="3", owner="bench",
                                                       expiry="30d", sample_inputs={"input": x[:5]}))
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
            env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="off",
                       MODELCD_STORE_URL=store_url, MODELCD_HOME=str(tmp / "home"), MODELCD_LOG_FORMAT="json",
                       MODELCD_PREDICTION_LOG_RATE="0.01")
            log_path = tmp / "node.log"
            with open(log_path, "wb") as log_file:
                node = subprocess.Popen([sys.executable, "-c", ("import sys; from modelcd.cli import main; "
                                         "sys.exit(main())"), "serve", "--port", str(port)],
                                        env=env, stderr=log_file, stdout=subprocess.DEVNULL)
            node_log = NodeLog(log_path)
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as client:
                for _ in range(600):
                    if node.poll() is not None:
                        raise RuntimeError(f"node exited with {node.returncode}; see {log_path}")
                    try:
                        if (await client.get("/v2/health/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"node not ready; see {log_path}")
                # Every model loaded before any timing (the shadows load on first use otherwise).
                for version in ("1", "2", "4", "5") + (("3",) if args.heavy_trees else ()):
                    r = await client.post(f"/v2/models/iris/versions/{version}/infer", json=BODY)
                    if r.status_code != 200:
                        raise RuntimeError(f"iris:{version} answered {r.status_code}: {r.text[:200]}")
                revision = 0

                async def policy(shadow: str | list[str] | None) -> None:
                    """Apply the TrafficPolicy (iris:1 primary, each shadow at 100 %) and wait until the node uses it."""
                    nonlocal revision
                    revision += 1
                    shadows = [shadow] if isinstance(shadow, str) else list(shadow or [])
                    await set_traffic(store, pub, TrafficPolicy(  # type: ignore[arg-type]
                        endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)], revision=revision,
                        shadows=[ShadowRelation(primary="iris", shadow=s) for s in shadows]))
                    shadow = shadows or None
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:  # applied when a probe request is (or is not) matched
                        before = (await scrape(client)).get("modelcd_shadow_matched_total", 0.0)
                        await client.post("/v2/models/iris/infer", json=BODY)
                        after = (await scrape(client)).get("modelcd_shadow_matched_total", 0.0)
                        if (after > before) == (shadow is not None):
                            return
                        await asyncio.sleep(0.1)
                    raise RuntimeError("the node did not apply the traffic policy within 30 s")

                body_file = tmp / "body.json"
                body_file.write_text(json.dumps(BODY))
                url = f"http://127.0.0.1:{port}/v2/models/iris/infer"

                async def drive(connections: int, seconds: float, rate: float = 0.0) -> dict[str, Any]:
                    """One bounded load run: hey, else the httpx fallback."""
                    if not use_hey:
                        return await httpx_load(client, connections, seconds, rate)
                    return await asyncio.to_thread(hey, url, body_file, seconds=seconds, connections=connections,
                                                   rate=rate)

                async def watched(connections: int, seconds: float, rate: float = 0.0
                                  ) -> tuple[dict[str, Any], list[dict[str, float]]]:
                    """A load run with /metrics scraped every 0.25 s while it lasts."""
                    samples: list[dict[str, float]] = []
                    task = asyncio.create_task(drive(connections, seconds, rate))
                    while not task.done():
                        samples.append(await scrape(client) | {"t": time.monotonic()})
                        await asyncio.wait({task}, timeout=0.25)
                    return task.result(), samples

                # ---- 1. capacity without a shadow
                await policy(None)
                await drive(args.concurrency, 2.0)  # warm-up
                cap = await drive(args.concurrency, args.seconds)
                capacity = cap["rps"]
                total_failed = failed(cap)
                node_log.new_events()

                # ---- 2. comparison: ABBA rounds per load
                loads = [float(x) for x in args.loads.split(",") if x.strip()]
                comparison: dict[float, dict[int, list[dict[str, Any]]]] = {}
                comparison_pauses: dict[float, int] = {}
                modes = [int(m) for m in args.modes.split(",")]
                cheap = ["iris:2", "iris:4", "iris:5"]
                for share in loads:
                    rate = share * capacity
                    comparison[share] = {m: [] for m in modes}
                    comparison_pauses[share] = 0
                    for rnd in range(args.rounds):
                        for shadow in (modes if rnd % 2 == 0 else modes[::-1]):
                            await policy(cheap[:shadow])
                            m0 = await scrape(client)
                            h = await drive(args.connections, args.seconds, rate)
                            m1 = await scrape(client)
                            comparison_pauses[share] += int(m1.get("modelcd_shadow_pauses_total", 0)
                                                            - m0.get("modelcd_shadow_pauses_total", 0))
                            h["shadow_done"] = int(m1.get("modelcd_shadow_completed_total", 0)
                                                   - m0.get("modelcd_shadow_completed_total", 0))
                            total_failed += failed(h)
                            comparison[share][shadow].append(h)
                node_log.new_events()

                # ---- 3 and 4. pause ramp and resume, per shadow
                async def step_at(label: str, connections: int, offered: float, seconds: float,
                                  result: Ramp) -> Step:
                    """One bounded step with the shadow on: hey's figures, /metrics maxima and deltas, log lines."""
                    nonlocal total_failed
                    m0 = await scrape(client)
                    h, samples = await watched(connections, seconds, offered)
                    m1 = await scrape(client)
                    events = node_log.new_events()
                    result.events += events

                    def delta(name: str) -> int:
                        return int(m1.get(name, 0) - m0.get(name, 0))

                    paused_lines = [e for e in events if e["event"] == "shadowing paused"]
                    step = Step(
                        label=label, connections=connections, offered=offered, rps=h["rps"], p99=h["p99"],
                        failed=failed(h),
                        busy_max=max((s.get("modelcd_shadow_loop_busy", 0) for s in samples), default=0),
                        queue_max=max((s.get("modelcd_shadow_queue_depth", 0) for s in samples), default=0),
                        pauses=delta("modelcd_shadow_pauses_total"), dropped=int(dropped(m1) - dropped(m0)),
                        completed=delta("modelcd_shadow_completed_total"),
                        reasons=sorted({str(e.get("reason")) for e in paused_lines}), pause_lines=paused_lines)
                    total_failed += step.failed
                    print(f"  {result.shadow} {label:>6} c={connections:<3} offered {offered:7,.0f} served "
                          f"{step.rps:7,.0f} req/s p99 {step.p99:6.2f} ms busy<={step.busy_max:.0%} "
                          f"queue<={step.queue_max:.0f} pauses {step.pauses} {','.join(step.reasons)}", flush=True)
                    return step

                async def ramp(shadow: str) -> Ramp:
                    nonlocal total_failed
                    await policy(shadow)
                    result = Ramp(shadow)
                    deadline = time.monotonic() + 10  # a pause left by the comparison ends first (>= 1 s)
                    while (await scrape(client)).get("modelcd_shadow_paused", 0) and time.monotonic() < deadline:
                        await asyncio.sleep(0.25)
                    pauses_before = int((await scrape(client)).get("modelcd_shadow_pauses_total", 0))
                    node_log.new_events()
                    plan = [(f"{f:.0%}", args.connections, f * capacity) for f in
                            [i / 20 for i in range(1, 25)]] + [("closed", c, 0.0) for c in (8, 32, 128)]
                    for label, connections, offered in plan:
                        step = await step_at(label, connections, offered, args.step_seconds, result)
                        result.steps.append(step)
                        if step.pauses:
                            result.paused_at = step
                            break
                    if result.paused_at is not None:
                        at = result.paused_at
                        # Held on at the pausing load: does it flap (pause, resume, pause) or stay paused?
                        result.hold = await step_at("hold", at.connections, at.offered, 2 * args.step_seconds, result)
                        # The load falls to half the pausing step's: shadowing must resume by itself.
                        low = (at.offered or at.rps) / 2
                        result.resume_offered = low
                        m0 = await scrape(client)
                        result.paused_at_drop = m0.get("modelcd_shadow_paused", 0) > 0
                        t0 = time.monotonic()
                        h, samples = await watched(args.connections, 2 * args.step_seconds, low)
                        m1 = await scrape(client)
                        result.events += node_log.new_events()
                        total_failed += failed(h)
                        result.resume_failed = failed(h)
                        first_running = next((s["t"] for s in samples if s.get("modelcd_shadow_paused", 1) == 0),
                                             None)
                        if first_running is not None:
                            result.resume_after_s = max(0.0, first_running - t0)
                            after = [s for s in samples if s["t"] >= first_running]
                            result.repauses = int(after[-1].get("modelcd_shadow_pauses_total", 0)
                                                  - after[0].get("modelcd_shadow_pauses_total", 0))
                        result.resume_completed = int(m1.get("modelcd_shadow_completed_total", 0)
                                                      - m0.get("modelcd_shadow_completed_total", 0))
                        result.resume_matched = int(m1.get("modelcd_shadow_matched_total", 0)
                                                    - m0.get("modelcd_shadow_matched_total", 0))
                    await asyncio.sleep(1.5)  # a pause (at least 1 s) ends before the totals are read
                    end = await scrape(client)
                    result.events += node_log.new_events()
                    result.pauses_total = int(end.get("modelcd_shadow_pauses_total", 0)) - pauses_before
                    result.paused_at_end = end.get("modelcd_shadow_paused", 0)
                    return result

                ramps = [await ramp("iris:2")]
                if args.heavy_trees:
                    ramps.append(await ramp("iris:3"))
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        await broker.stop()
    elapsed = time.monotonic() - t_start
    args.data = {"scenario": "shadow", "capacity": capacity, "elapsed_s": elapsed,
                 "comparison": {str(share): {str(m): runs for m, runs in res.items()} for share, res in comparison.items()},
                 "pauses": {str(k): v for k, v in comparison_pauses.items()}, "failed": total_failed,
                 "ramps": [{"shadow": r.shadow, "paused_at": r.paused_at.offered if r.paused_at else None,
                            "pause_reason": r.paused_at.reasons if r.paused_at else None} for r in ramps]}
    return report(args, use_hey, capacity, comparison, comparison_pauses, ramps, total_failed,
                  elapsed, tmp / "node.log")


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, use_hey: bool, capacity: float,
           comparison: dict[float, dict[int, list[dict[str, Any]]]], comparison_pauses: dict[float, int],
           ramps: list[Ramp], total_failed: int, elapsed: float,
           log_path: Path) -> str:
    client = "hey" if use_hey else "httpx (fallback: hey absent)"
    command = "python bench/bench_shadow.py " + " ".join(sys.argv[1:])
    lines = [
        f"{HEADING}, no shadow vs one 100 % shadow; the load at which shadowing pauses (bench/bench_shadow.py)",
        "",
        f"{datetime.date.today().isoformat()}, CPython {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} shared cores (other engineers' runs on the box); embedded Tansu broker; node in its own "
        f"process, load from {client} in another, loopback. Primary iris:1 (decision tree, depth 3); shadows "
        "iris:2 (decision tree, depth 2: as cheap as the primary, predicts inline on the loop)"
        + (f" and iris:3 (random forest of {args.heavy_trees} trees: about 1 ms a row, so it runs in the node's "
           "thread pool)" if args.heavy_trees else "") + f". Whole run {elapsed:.0f} s; {provenance()}.",
        "",
        f"    {command.strip()}",
        "",
        (f"Capacity without shadow (closed loop, {args.concurrency} connections, {args.seconds:g} s): "
        f"{capacity:,.0f} req/s."),
        "",
        (f"Comparison, 100 % shadows vs none (1: iris:2; 3: iris:2, iris:4 (depth 1), iris:5 (depth 4), all cheap "
        f"trees), at fixed offered loads ({args.connections} connections, hey -q), "
        f"{args.rounds} rounds of alternating {args.seconds:g}-s phases (ABBA), latencies as hey reports them "
        "(0.1-ms steps); per mode the median over rounds, ratio = shadow / none:"),
        "",
        "| offered | mode | served (req/s) | p50 (ms) | p99 (ms) | p99 per round (ms) | shadow predictions |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for share, res in comparison.items():
        rate = share * capacity
        med = {s: {k: statistics.median(r[k] for r in res[s]) for k in ("rps", "p50", "p99")} for s in res}
        for s in res:
            lines.append(f"| {rate:,.0f} req/s ({share:.0%}) | {mode_name(s)} | "
                         f"{med[s]['rps']:,.0f} | {med[s]['p50']:.2f} | {med[s]['p99']:.2f} | "
                         f"{' '.join(format(r['p99'], '.2f') for r in res[s])} | "
                         f"{sum(r['shadow_done'] for r in res[s]):,} |")
        for s in res:
            if s:
                lines.append(f"| | ratio {mode_name(s)} / none | {med[s]['rps'] / med[0]['rps']:.3f} | "
                             f"{med[s]['p50'] / med[0]['p50']:.3f} | {med[s]['p99'] / med[0]['p99']:.3f} | "
                             f"pauses in all phases at this load: {comparison_pauses[share]} | |")
    lines += ["", (f"Failed primary requests over the whole run (non-2xx and transport errors from {client}): "
              f"{total_failed}."), ""]
    limits = "default thresholds: queue 800, loop lag 100 ms, loop busy 90 % (resume at 72 %), primary p99 off"
    for rp in ramps:
        lines += [(f"Pause ramp, 100 % shadow {rp.shadow} ({limits}); offered load in steps of 5 % of capacity, "
                  f"{args.step_seconds:g} s each, then closed loop; busy and queue are the maxima of /metrics scraped "
                  "every 0.25 s:"), "",
                  ("| step | connections | offered (req/s) | served (req/s) | p99 (ms) | failed | loop busy max | "
                  "shadow queue max | pauses | shadow dropped | shadow done |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        # Every 20 % of capacity, and the last four steps in full (all steps are printed while it runs).
        shown = [st for i, st in enumerate(rp.steps) if i % 4 == 3 or i >= len(rp.steps) - 4]
        for st in shown + ([rp.hold] if rp.hold else []):
            label = f"{st.label} ({2 * args.step_seconds:g} s)" if st is rp.hold else st.label
            lines.append(f"| {label} | {st.connections} | {f'{st.offered:,.0f}' if st.offered else 'unlimited'} | "
                         f"{st.rps:,.0f} | {st.p99:.2f} | {st.failed} | {st.busy_max:.0%} | {st.queue_max:.0f} | "
                         f"{st.pauses} | {st.dropped:,} | {st.completed:,} |")
        lines.append("")
        if rp.paused_at is None:
            last = rp.steps[-1]
            lines += [(f"- Shadowing with {rp.shadow} did not pause up to {last.rps:,.0f} req/s served (closed loop, "
                      f"{last.connections} connections; loop at most {max(s.busy_max for s in rp.steps):.0%} busy)")
                      + ("; the httpx client in this process saturated before the node: install hey." if not use_hey
                         else "."), ""]
            continue
        st = rp.paused_at
        prev = rp.steps[-2] if len(rp.steps) > 1 else None
        first = st.pause_lines[0] if st.pause_lines else {}
        where = (f"an offered {st.offered:,.0f} req/s ({st.offered / capacity:.0%} of the no-shadow capacity), "
                 f"{st.connections} connections, served {st.rps:,.0f} req/s" if st.offered else
                 f"closed loop at {st.connections} connections, served {st.rps:,.0f} req/s "
                 f"({st.rps / capacity:.0%} of the no-shadow capacity)")
        before = (f"; the step before ({prev.offered:,.0f} req/s offered) ran without a pause"
                  if prev and prev.offered else "")
        signal = (f"`{first.get('reason')}` (at that moment: loop busy {float(first.get('loop_busy') or 0):.0%}, "
                  f"loop lag {first.get('loop_lag_ms')} ms, shadow queue {first.get('queue')}; "
                  f"{first.get('shed')} queued shadow jobs shed)") if first else "no pause line in the log"
        durations = rp.pause_durations()
        lines += [(f"- With {rp.shadow}, shadowing first paused at {where}{before}. Signal, from the node's "
                  f"\"shadowing paused\" log line: {signal}. Primary requests failed in that step: {st.failed}.")]
        if rp.hold:
            h = rp.hold
            lines.append(f"- Held at that load for {2 * args.step_seconds:g} s: {h.pauses} more pauses, "
                         f"{h.completed:,} shadow predictions done and {h.dropped:,} dropped "
                         f"({h.completed / max(1, h.completed + h.dropped):.0%} of the shadow work done), "
                         f"primary p99 {h.p99:.2f} ms, primary failures {h.failed}.")
        if rp.resume_after_s is not None:
            when = (f"resumed {rp.resume_after_s:.1f} s after the drop" if rp.paused_at_drop else
                    "was already running again when the load fell (it resumed by itself at the pausing load)")
            lines.append(f"- Load dropped to {rp.resume_offered:,.0f} req/s: shadowing {when}; then "
                         f"{rp.resume_completed:,} shadow predictions for {rp.resume_matched:,} matched requests in "
                         f"{2 * args.step_seconds:g} s, {rp.repauses} pauses after resuming, primary failures "
                         f"{rp.resume_failed}.")
        else:
            lines.append(f"- Load dropped to {rp.resume_offered:,.0f} req/s: shadowing had not resumed within "
                         f"{2 * args.step_seconds:g} s.")
        lines += [f"- Over the ramp: modelcd_shadow_pauses_total +{rp.pauses_total}, {rp.resumes} \"shadowing "
                  "resumed\" log lines" + (f", pauses lasting {min(durations):.1f}–{max(durations):.1f} s "
                                             f"(median {statistics.median(durations):.1f} s)" if durations else "")
                  + f"; modelcd_shadow_paused at the end: {rp.paused_at_end:.0f}.", ""]
    print(f"node log: {log_path}", file=sys.stderr)
    return "\n".join(lines).rstrip() + "\n"


def mode_name(shadows: int) -> str:
    return "no shadow" if shadows == 0 else f"{shadows} x 100 % shadow"


def provenance() -> str:
    """The commit measured, and any uncommitted change to the code a node runs (other work in progress)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "modelcd", "serving",
                                "shadow", "events"], capture_output=True, text=True, timeout=10,
                               check=False).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "code: unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"code: commit {head}" + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def write_section(text: str) -> None:
    """Replace the shadow section of bench/RESULTS.md (from its heading to the next '## '), or append it."""
    path = ROOT / "bench" / "RESULTS.md"
    doc = path.read_text()
    start = doc.find(HEADING)
    if start < 0:
        path.write_text(doc.rstrip("\n") + "\n\n" + text)
        return
    nxt = doc.find("\n## ", start + len(HEADING))
    tail = doc[nxt + 1:] if nxt >= 0 else ""
    path.write_text(doc[:start] + text + ("\n" + tail if tail else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the shadow section of bench/RESULTS.md")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per capacity and comparison phase")
    ap.add_argument("--rounds", type=int, default=5, help="comparison rounds (each: one phase per mode)")
    ap.add_argument("--concurrency", type=int, default=8, help="connections for the capacity run")
    ap.add_argument("--connections", type=int, default=8, help="connections for the rate-limited runs (hey -q)")
    ap.add_argument("--modes", default="0,1,3", help="shadows per comparison phase (comma list; 0 first)")
    ap.add_argument("--json", type=Path, help="write the figures and the section here (bench/run.py reads them)")
    ap.add_argument("--loads", default="0.25,0.35", help="comparison loads, shares of the capacity (comma list)")
    ap.add_argument("--step-seconds", type=float, default=3.0, help="seconds per ramp step")
    ap.add_argument("--heavy-trees", type=int, default=25,
                    help="trees of the heavy shadow's random forest, ramped after the cheap one (0: skip)")
    args = ap.parse_args()
    try:
        import uvloop

        text = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        text = asyncio.run(run(args))
    print(text)
    if args.write:
        write_section(text)
    if args.json:
        from bench.common import machine

        args.json.write_text(json.dumps({**args.data, "markdown": text, "machine": machine(),
                                         "command": "python bench/bench_shadow.py " + " ".join(sys.argv[1:])},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
