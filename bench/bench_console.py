"""The console's cost on the API's event loop: rendering each section from a large state, and the fan-out.

Run: python bench/bench_console.py

The state folds 12,850 events: 200 model versions with 30 usage reports each, 300 deployments of five
steps, 10 nodes holding 40 models, 20 endpoints with a rollout, 20 shadow pairs with 240 windows each
(the per-pair maximum the console keeps). Each section is rendered 20 times (mean per rendering);
the fan-out pushes 1,000 frames to 100 browsers that keep up, then 1,000 to one that never reads
(its queue stays at its bound, the rest is dropped and counted, the section marked missed).
"""

from __future__ import annotations

import asyncio
import time

from modelcd.console import render
from modelcd.console.fanout import Hub, frame
from modelcd.console.state import SECTIONS, ConsoleState
from modelcd.events.schemas import *

now = time.time()
s = ConsoleState()
for i in range(200):
    s.apply(ModelState(name=f"m{i%50}", version=str(i//50), target="serving", expiry_seconds=86400, deployed_at=now-1000))
    for k in range(30):
        s.apply(UsageReport(model=f"m{i%50}", version=str(i//50), node=f"n{k%5}", interval_start=now-300+10*k, interval_end=now-290+10*k, count=100, errors=1, last_used=now-290+10*k))
for d in range(300):
    for st in ("accepted","validate","compile","serving-validation","publish"):
        s.apply(DeploymentProgress(deployment_id=f"d{d}", model=f"m{d%50}", version="1", step=st, status="succeeded", duration_ms=12.0))
    s.apply(DeploymentCompleted(deployment_id=f"d{d}", model=f"m{d%50}", version="1"))
for n in range(10):
    s.apply(NodeStatus(node=f"n{n}", ready=True, models=[LoadedModel(name=f"m{j}", version="0", sha256="x", memory_bytes=1<<20) for j in range(40)], memory_bytes=40<<20, memory_budget=1<<30))
for e in range(20):
    s.apply(TrafficPolicy(endpoint=f"e{e}", routes=[Route(model=f"m{e}", version="0", weight=90), Route(model=f"m{e}", version="1", weight=10)]))
    s.apply(RolloutStep(endpoint=f"e{e}", rollout_id="r", action="start", canary=f"m{e}:1", baseline=f"m{e}:0", weight=10, plan=RolloutPlan()))
for p in range(20):
    for w in range(240):
        s.apply(ShadowComparison(primary=f"m{p}:0", shadow=f"m{p}:1", window_start=now-14400+60*w, window_end=now-14340+60*w, count=100, agreement=0.95, primary_latency_ms={"p99":3}, shadow_latency_ms={"p99":4}))
print("events folded", s.counters.events)
v = render.View()
for name in SECTIONS:
    t = time.perf_counter(); n = 20
    for _ in range(n): html = render.RENDERERS[name](s, now, v)
    print(f"render {name:12} {(time.perf_counter()-t)/n*1000:7.2f} ms  {len(html)/1024:7.1f} KiB")
async def fan():
    hub = Hub(maxsize=32)
    clients = [hub.connect() for _ in range(100)]
    data = frame("models", render.models(s, now, v))
    t = time.perf_counter()
    for i in range(1000):
        hub.publish("models", data)
        for c in clients:
            while not c.queue.empty(): c.queue.get_nowait()
    dt = time.perf_counter()-t
    print(f"fan-out: 1000 frames x 100 browsers in {dt*1000:.1f} ms ({1000*100/dt:,.0f} frame deliveries/s), dropped {hub.dropped}")
    slow = Hub(maxsize=32); c = slow.connect()
    for i in range(1000): slow.publish("models", data)
    print(f"one browser never reading: queue {c.queue.qsize()} frames, dropped {slow.dropped}, missed {sorted(c.missed)}")
asyncio.run(fan())
