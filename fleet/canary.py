"""`modelcd release canary ENV`: every production model on a node from the candidate, compared with the current release.

Two throwaway nodes, side by side on this machine, each with every model the production target
state serves (MODELCD_REPLICAS=0), read from the production store (read only: a node never writes
the store) and a throwaway broker of their own (so neither joins the production fleet): one from
ENV (the candidate), one from the current installation (the reference; same machine, same moment,
so latencies compare). For each model: its package's sample inputs, plus up to `logged` of its
recent requests from the production `modelcd.predictions` topic, go to both nodes; outputs must
match within the package's tolerance (numpy isclose with rtol = atol = tolerance; integers and
strings exactly), and the candidate's p99 over `runs` repetitions must be within `margin` of the
reference's (plus `slack_ms`, for timer noise on tiny models). A model that fails to load on the
candidate, answers differently or regresses fails the release.

`compare` and `verdict` are pure; `canary` is the I/O around them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from modelcd.events import topics
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import KafkaConfig, read_topic
from modelcd.events.schemas import ModelState, PredictionLog
from modelcd.runner import wait_for
from modelcd.settings import Settings
from modelcd.store.blobs import get_package, open_store
from modelcd.store.package import Package, read_package
from modelcd.store.targets import TargetState

from .roll import Launched, ReleaseError, env_python, launch_node


@dataclass
class ModelCheck:
    model: str
    version: str
    requests: int = 0
    problem: str | None = None  # None: passed
    candidate_p99_ms: float = 0.0
    current_p99_ms: float = 0.0
    logged: int = 0  # of the requests, how many came from the prediction logs

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class CanaryReport:
    checks: list[ModelCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [f"{c.model}:{c.version}" for c in self.checks if not c.ok]

    def table(self) -> str:
        head = f"{'model':24} {'version':8} {'requests':>8} {'logged':>6} {'p99 cand ms':>11} {'p99 cur ms':>10}  result"
        rows = [head]
        for c in self.checks:
            rows.append(f"{c.model:24} {c.version:8} {c.requests:8d} {c.logged:6d} {c.candidate_p99_ms:11.2f} "
                        f"{c.current_p99_ms:10.2f}  {'ok' if c.ok else 'FAIL: ' + str(c.problem)}")
        rows.append("PASS" if self.ok else f"FAIL: {', '.join(self.failed) or 'no model to compare'}")
        return "\n".join(rows)


# ---------------------------------------------------------------------- pure


def request_body(inputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str]) -> dict[str, Any]:
    """An OIP request from named arrays, typed by the package's signature."""
    return {"inputs": [{"name": n, "datatype": datatypes.get(n, "FP64"), "shape": list(a.shape),
                        "data": a.reshape(-1).tolist()} for n, a in inputs.items()]}


def logged_body(log: PredictionLog) -> dict[str, Any]:
    return {"inputs": [{"name": n, **t} for n, t in log.inputs.items()]}


def outputs_of(body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body.get("outputs", [])}


def p99(values: Sequence[float]) -> float:
    return float(np.percentile(values, 99)) if values else 0.0


def verdict(candidate_ms: Sequence[float], current_ms: Sequence[float], margin: float, slack_ms: float) -> str | None:
    """None if the candidate's p99 is within `margin` (a share) of the current one's, plus `slack_ms`."""
    cand, cur = p99(candidate_ms), p99(current_ms)
    if cand > cur * (1 + margin) + slack_ms:
        return f"p99 {cand:.2f} ms vs {cur:.2f} ms on the current release (allowed: +{margin:.0%} + {slack_ms:g} ms)"
    return None


# ---------------------------------------------------------------------- I/O


async def _ready(client: httpx.AsyncClient, node: Launched, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if node.proc.poll() is not None:
            raise ReleaseError(f"node {node.node_id} from {node.python} exited with code {node.proc.returncode} at "
                               f"start; its log: {node.log}")
        try:
            if (await client.get(f"{node.url}/v2/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ReleaseError(f"node {node.node_id} was not ready within {timeout:g}s; its log: {node.log}")
        await asyncio.sleep(0.2)


async def _model_ready(client: httpx.AsyncClient, node: Launched, state: ModelState, timeout: float) -> str | None:
    """None once the node answers the model ready; else why not (the node's own words)."""
    url = f"{node.url}/v2/models/{state.name}/versions/{state.version}"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = await client.get(f"{url}/ready")
        if r.status_code == 200:
            return None
        last = r.text
        if "fail" in last.lower():
            break
        await asyncio.sleep(0.2)
    return f"did not load: {last[:300] or 'no answer'}"


async def _timed(client: httpx.AsyncClient, url: str, body: Mapping[str, Any]) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = await client.post(url, json=body)
    return r, (time.perf_counter() - t0) * 1000


async def check_model(client: httpx.AsyncClient, cand: Launched, cur: Launched, state: ModelState, pkg: Package,
                      logs: list[PredictionLog], *, runs: int, margin: float, slack_ms: float,
                      load_timeout: float) -> ModelCheck:
    from modelcd.runtimes.flavors import outputs_match

    check = ModelCheck(state.name, state.version)
    for node, who in ((cand, "candidate"), (cur, "current release")):
        why = await _model_ready(client, node, state, load_timeout)
        if why is not None:
            check.problem = f"{who}: {why}"
            return check
    m = pkg.manifest
    types = {s.name: s.datatype for s in m.inputs}
    bodies = [request_body(pkg.samples().inputs, types)] + [logged_body(log) for log in logs]
    check.logged = len(logs)
    path = f"/v2/models/{state.name}/versions/{state.version}/infer"
    cand_ms: list[float] = []
    cur_ms: list[float] = []
    for i, body in enumerate(bodies):
        r_cand, t_cand = await _timed(client, cand.url + path, body)
        r_cur, t_cur = await _timed(client, cur.url + path, body)
        check.requests += 1
        if r_cand.status_code != r_cur.status_code:
            check.problem = (f"request {i}: candidate answered {r_cand.status_code} ({r_cand.text[:200]}), current "
                             f"release {r_cur.status_code}")
            return check
        if r_cand.status_code != 200:
            continue  # both refuse it the same way (a logged bad request): same behaviour
        problem = outputs_match(outputs_of(r_cur.json()), outputs_of(r_cand.json()), m.tolerance)
        if problem is not None:
            check.problem = f"request {i}{' (logged)' if i else ' (samples)'}: {problem}"
            return check
        cand_ms.append(t_cand)
        cur_ms.append(t_cur)
    # Latency: the sample request, alternating candidate and current so both see the same machine.
    for _ in range(runs):
        cand_ms.append((await _timed(client, cand.url + path, bodies[0]))[1])
        cur_ms.append((await _timed(client, cur.url + path, bodies[0]))[1])
    check.candidate_p99_ms, check.current_p99_ms = p99(cand_ms), p99(cur_ms)
    check.problem = verdict(cand_ms, cur_ms, margin, slack_ms)
    return check


async def _recent_logs(settings: Settings, logged: int) -> dict[str, list[PredictionLog]]:
    """Up to `logged` recent successful requests per model name from the production prediction logs."""
    if logged <= 0:
        return {}
    try:
        records = await wait_for(read_topic(KafkaConfig.from_settings(settings), topics.PREDICTIONS), 30)
    except Exception:  # no logs to replay (broker unreachable or topic empty): samples still run
        return {}
    out: dict[str, list[PredictionLog]] = {}
    for event, _env, _rec in reversed(records):
        if isinstance(event, PredictionLog) and event.error is None and event.inputs:
            bucket = out.setdefault(f"{event.model}:{event.version}", [])
            if len(bucket) < logged:
                bucket.append(event)
    return out


async def canary(settings: Settings, env: Path, *, workdir: Path, runs: int = 30, margin: float = 0.5,
                 slack_ms: float = 5.0, logged: int = 20, load_timeout: float = 120.0,
                 current_python: str | None = None, say: Callable[[str], None] = lambda line: None) -> CanaryReport:
    import sys

    python = env_python(env)
    workdir.mkdir(parents=True, exist_ok=True)
    async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
        serving = sorted((await TargetState(store).serving()).values(), key=lambda s: s.key())
        if not serving:
            raise ReleaseError(f"the production target state ({settings.resolved_store_url}) serves no model: "
                               "nothing to compare")
        packages = {s.key(): read_package(await get_package(store, s.sha256)) for s in serving}
    logs = await _recent_logs(settings, logged)
    say(f"canary of {env}: {len(serving)} model(s) from {settings.resolved_store_url}, "
        f"{sum(len(v) for v in logs.values())} logged request(s) to replay")
    broker = EmbeddedBroker(port=free_port(), log_file=workdir / "broker.log")
    await broker.start()
    nodes: list[Launched] = []
    try:
        isolated = {"MODELCD_KAFKA_BOOTSTRAP": broker.bootstrap, "MODELCD_KAFKA_IDEMPOTENCE": "false",
                    "MODELCD_REPLICAS": "0", "MODELCD_RECONCILE_INTERVAL": "3600"}
        cand = launch_node(settings, python, "canary-candidate", workdir, isolated)
        nodes.append(cand)
        cur = launch_node(settings, current_python or sys.executable, "canary-current", workdir, isolated)
        nodes.append(cur)
        report = CanaryReport()
        async with httpx.AsyncClient(timeout=60.0) as client:
            await asyncio.gather(_ready(client, cand, load_timeout), _ready(client, cur, load_timeout))
            for state in serving:
                check = await check_model(client, cand, cur, state, packages[state.key()], logs.get(state.key(), []),
                                          runs=runs, margin=margin, slack_ms=slack_ms, load_timeout=load_timeout)
                say(f"  {state.key()}: {'ok' if check.ok else 'FAIL: ' + str(check.problem)}")
                report.checks.append(check)
        return report
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.terminate()
        for n in nodes:
            try:
                await asyncio.to_thread(n.proc.wait, 30)
            except Exception:
                n.proc.kill()
        await broker.stop()
