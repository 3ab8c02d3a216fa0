"""`modelcd release staging ENV`: the candidate's whole system, thrown away after, checked through its public API.

A fleet of its own from ENV (`ENV/bin/python -m modelcd up --nodes N`: its own embedded broker,
local store, home and free ports, nothing shared with production) is started, then every check
runs against what a user sees: the deployment API and the front door.

Checks, each pass or fail with the reason: start; deploy and predict one model of every flavor
(scikit-learn, compiled to ONNX at ingest; a native ONNX model; XGBoost; LightGBM), outputs equal
to the package's expected sample outputs; shadow (a version shadowing the endpoint records shadow
predictions); rollout (started, promoted, the endpoint then answers with the new version);
retire (the retired version stops answering); stop (the fleet drains and exits 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from modelcd.events.broker import free_port, port_in_use
from modelcd.events.bus import KafkaConfig, read_topic
from modelcd.events.schemas import ShadowPrediction
from modelcd.store.package import BuiltPackage, read_package

from .canary import outputs_of, request_body
from .roll import env_python


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class StagingReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def table(self) -> str:
        rows = [f"{'check':22} {'result':6} {'s':>6}  detail"]
        rows += [f"{c.name:22} {'pass' if c.ok else 'FAIL':6} {c.seconds:6.1f}  {c.detail}" for c in self.checks]
        rows.append("PASS" if self.ok else "FAIL: " + ", ".join(c.name for c in self.checks if not c.ok))
        return "\n".join(rows)


class StagingFailed(Exception):
    pass


def sample_packages() -> dict[str, BuiltPackage]:
    """One small model of every flavor, on iris (bundled with scikit-learn)."""
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    from modelcd.runtimes.build import build_package

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    out: dict[str, BuiltPackage] = {}

    def add(flavor: str, model: Any, version: str = "1") -> None:
        out[f"{flavor}:{version}"] = build_package(model, name=f"staging-{flavor}", version=version, owner="release",
                                                   expiry="1d", sample_inputs=x[:8])

    add("sklearn", DecisionTreeClassifier(max_depth=2, random_state=0).fit(x, y))
    add("sklearn", DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y), "2")
    try:
        from skl2onnx import to_onnx

        add("onnx", to_onnx(DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y), x[:1],
                            options={"zipmap": False}))
    except ImportError:
        pass
    try:
        import xgboost as xgb

        add("xgboost", xgb.XGBClassifier(n_estimators=3, max_depth=3, random_state=0).fit(x, y))
    except ImportError:
        pass
    try:
        import lightgbm as lgb

        add("lightgbm", lgb.LGBMClassifier(n_estimators=3, num_leaves=4, min_child_samples=5, verbose=-1).fit(x, y))
    except ImportError:
        pass
    return out


def _ports(nodes: int) -> dict[str, int]:
    for _ in range(50):
        base = free_port()
        if all(not port_in_use(base + i) for i in range(1, nodes + 1)):
            return {"MODELCD_SERVING_PORT": base, "MODELCD_INGEST_PORT": free_port(),
                    "MODELCD_BROKER_PORT": free_port(), "MODELCD_FRONTDOOR_ADMIN_PORT": free_port()}
    raise StagingFailed("no free run of ports for the staging fleet")


async def staging(env: Path, *, workdir: Path, nodes: int = 2, keep: bool = False, start_timeout: float = 180.0,
                  say: Callable[[str], None] = lambda line: None) -> StagingReport:
    python = env_python(env)
    workdir.mkdir(parents=True, exist_ok=True)
    ports = _ports(nodes)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    environ.update({k: str(v) for k, v in ports.items()})
    environ.update(MODELCD_HOME=str(workdir / "home"), MODELCD_LOG_FORMAT="json", MODELCD_HEARTBEAT_INTERVAL="1",
                   MODELCD_VALIDATION_WARM="false", MODELCD_ROLLOUT_TICK="0.5", MODELCD_USAGE_INTERVAL="1")
    api = f"http://127.0.0.1:{ports['MODELCD_INGEST_PORT']}"
    front = f"http://127.0.0.1:{ports['MODELCD_SERVING_PORT']}"
    bootstrap = f"127.0.0.1:{ports['MODELCD_BROKER_PORT']}"
    report = StagingReport()
    log_path = workdir / "up.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([str(python), "-m", "modelcd", "up", "--nodes", str(nodes)], env=environ,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=workdir)
    say(f"staging fleet from {env}: pid {proc.pid}, API {api}, front door {front}, log {log_path}")

    async def run(name: str, fn: Callable[[], Awaitable[str]]) -> bool:
        t0 = time.monotonic()
        try:
            detail, ok = await fn(), True
        except (StagingFailed, httpx.HTTPError, AssertionError, KeyError, ValueError) as exc:
            detail, ok = f"{type(exc).__name__}: {exc}" if not isinstance(exc, StagingFailed) else str(exc), False
        report.checks.append(Check(name, ok, detail, time.monotonic() - t0))
        say(f"  {name}: {'pass' if ok else 'FAIL'} {detail}")
        return ok

    packages = sample_packages()
    try:
        async with httpx.AsyncClient(timeout=30.0) as client:
            async def started() -> str:
                deadline = time.monotonic() + start_timeout
                while True:
                    if proc.poll() is not None:
                        raise StagingFailed(f"modelcd up exited with code {proc.returncode}: "
                                            f"{log_path.read_text(errors='replace')[-600:]}")
                    status = _status(workdir / "home")
                    comps = status.get("components") or []
                    if comps and all(c.get("state") == "ready" for c in comps):
                        r = await client.get(f"{front}/v2/health/ready")
                        if r.status_code == 200:
                            return f"{len(comps)} components ready"
                    if time.monotonic() > deadline:
                        raise StagingFailed(f"not ready within {start_timeout:g}s: {comps}")
                    await asyncio.sleep(0.5)

            if not await run("start", started):
                return report
            for key, pkg in packages.items():
                flavor = key.split(":")[0]

                async def deploy_and_predict(pkg: BuiltPackage = pkg) -> str:
                    m = pkg.manifest
                    r = await client.post(f"{api}/deployments", content=pkg.data,
                                          headers={"content-type": "application/x-tar"})
                    if r.status_code != 202:
                        raise StagingFailed(f"deploy refused: {r.status_code} {r.text[:300]}")
                    dep = r.json().get("deployment_id") or r.headers.get("location", "").rsplit("/", 1)[-1]
                    await _until(lambda: _deployment_done(client, api, dep), 120, f"deployment {dep}")
                    samples = read_package(pkg.data).samples()
                    body = request_body(samples.inputs, {s.name: s.datatype for s in m.inputs})
                    from modelcd.runtimes.flavors import outputs_match

                    async def answers() -> bool:
                        r = await client.post(f"{front}/v2/models/{m.name}/versions/{m.version}/infer", json=body)
                        if r.status_code != 200:
                            return False
                        problem = outputs_match(samples.outputs, outputs_of(r.json()), m.tolerance)
                        if problem is not None:
                            raise StagingFailed(f"outputs differ from the package's: {problem}")
                        return True

                    await _until(answers, 60, f"{m.name}:{m.version} answering through the front door")
                    return f"{m.name}:{m.version} deployed ({dep}) and predicted through the front door"

                await run(f"deploy+predict {flavor}" + ("" if key.endswith(":1") else " v2"), deploy_and_predict)

            ep = "staging-sklearn"

            async def shadow() -> str:
                r = await client.put(f"{api}/endpoints/{ep}/traffic",
                                     json={"routes": [{"model": ep, "version": "1", "weight": 100}]})
                if r.status_code not in (200, 201):
                    raise StagingFailed(f"traffic refused: {r.status_code} {r.text[:300]}")
                r = await client.post(f"{api}/endpoints/{ep}/shadows",
                                      json={"primary": ep, "shadow": f"{ep}:2", "sample_rate": 1.0, "until": "1h"})
                if r.status_code != 201:
                    raise StagingFailed(f"shadow refused: {r.status_code} {r.text[:300]}")
                primary = read_package(packages["sklearn:1"].data)
                body = request_body(primary.samples().inputs, {s.name: s.datatype for s in primary.manifest.inputs})

                async def recorded() -> bool:
                    for _ in range(10):
                        await client.post(f"{front}/v2/models/{ep}/infer", json=body)
                    cfg = KafkaConfig(bootstrap=bootstrap, idempotence=False)
                    events = await read_topic(cfg, "modelcd.shadow-predictions")
                    return any(isinstance(e, ShadowPrediction) and e.shadow_model == ep and e.shadow_version == "2"
                               and e.shadow_error is None for e, _, _ in events)

                await _until(recorded, 60, "shadow predictions on modelcd.shadow-predictions")
                return f"{ep}:2 shadows {ep}; shadow predictions recorded"

            await run("shadow", shadow)

            async def rollout() -> str:
                r = await client.post(f"{api}/endpoints/{ep}/rollout", json={"to": f"{ep}:2", "plan": "fast"})
                if r.status_code != 202:
                    raise StagingFailed(f"rollout refused: {r.status_code} {r.text[:300]}")
                await asyncio.sleep(1.0)
                r = await client.post(f"{api}/endpoints/{ep}/rollout/promote", json={"reason": "staging"})
                if r.status_code != 202:
                    raise StagingFailed(f"promote refused: {r.status_code} {r.text[:300]}")

                async def on_v2() -> bool:
                    r = await client.get(f"{api}/endpoints/{ep}/traffic")
                    routes = r.json().get("routes", []) if r.status_code == 200 else []
                    return [(x["version"], x["weight"]) for x in routes if x["weight"] > 0] == [("2", 100.0)]

                await _until(on_v2, 90, "the endpoint at 100 % on version 2")
                return f"{ep} rolled out to version 2"

            await run("rollout", rollout)

            async def retire() -> str:
                r = await client.request("DELETE", f"{api}/models/{ep}/versions/1", json={"force": True,
                                                                                       "reason": "staging"})
                if r.status_code not in (200, 202):
                    raise StagingFailed(f"retire refused: {r.status_code} {r.text[:300]}")

                async def gone() -> bool:
                    r = await client.get(f"{front}/v2/models/{ep}/versions/1/ready")
                    return r.status_code == 404

                await _until(gone, 60, f"{ep}:1 no longer served")
                return f"{ep}:1 retired and unloaded"

            await run("retire", retire)
    finally:
        async def stopped() -> str:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StagingFailed("did not stop within 60 s (killed)") from None
            if code != 0:
                raise StagingFailed(f"exit code {code}")
            return "drained and exited 0"

        await run("stop", stopped)
        if not keep and report.ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _status(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / "up.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def _deployment_done(client: httpx.AsyncClient, api: str, dep: str) -> bool:
    r = await client.get(f"{api}/deployments/{dep}")
    if r.status_code != 200:
        return False
    body = r.json()
    if body.get("status") == "failed":
        raise StagingFailed(f"deployment {dep} failed: {json.dumps(body)[:400]}")
    return body.get("status") == "completed"


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise StagingFailed(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.3)
