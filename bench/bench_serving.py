"""Serving throughput and latency: a modelcd node vs MLServer vs a bare ASGI handler (the floor).

Run:  python bench/bench_serving.py [--duration 10] [--concurrency 32] [--rate 400] [--append]

Needs `hey` (the load generator, Debian: `apt-get install -y hey`). The first run creates
bench/.venv-mlserver with `mlserver` and `mlserver-sklearn` from PyPI (not a modelcd dependency).

The same model everywhere: scikit-learn's DecisionTreeClassifier(max_depth=3, random_state=0) on iris,
trained identically in each venv; the same request (one row, FP64 [1, 4], JSON) to
/v2/models/iris/infer; the same `hey` runs, one server at a time on this machine:
- throughput: closed loop, `--concurrency` connections for `--duration` seconds;
- latency: a fixed offered load of `--rate` requests/s (10 connections, hey -q), p50 and p99.

Servers:
- modelcd: `modelcd serve` (uvloop, httptools), with an embedded broker and a local store, the model
  deployed as ingest does (skops package); telemetry on (usage, 1% prediction logs, metrics);
- MLServer: `mlserver start` with its defaults (one parallel inference worker, metrics on), with
  uvloop < 0.22 in its venv (its workers do not start with newer uvloop);
- floor: a raw ASGI app on the same uvicorn/uvloop/httptools that decodes with msgspec, calls the
  model runtime modelcd uses (the same loaded package) and encodes the response: nothing else.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MLSERVER_VENV = HERE / ".venv-mlserver"
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [[5.1, 3.5, 1.4, 0.2]]}]}
TRAIN = ("from sklearn.datasets import load_iris\nfrom sklearn.tree import DecisionTreeClassifier\n"
         "x, y = load_iris(return_X_y=True)\nmodel = DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y)\n")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready ({url})")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"not ready within {timeout}s: {url}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- load generation


def hey(url: str, body_file: Path, *, duration: float, concurrency: int, rate_per_worker: float = 0) -> dict[str, Any]:
    cmd = ["hey", "-z", f"{duration}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
           "-D", str(body_file)]
    if rate_per_worker:
        cmd += ["-q", str(rate_per_worker)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {int(p): float(s) * 1000 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", out)}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    # hey lists transport errors (refused, reset, timeouts) under "Error distribution".
    errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", out.split("Error distribution:")[1], re.M)) \
        if "Error distribution:" in out else 0
    return {"rps": rps, "p50": pct.get(50, float("nan")), "p99": pct.get(99, float("nan")), "codes": codes,
            "errors": errors}


def measure(name: str, url: str, body_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    hey(url, body_file, duration=2, concurrency=8)  # warm-up
    peak = hey(url, body_file, duration=args.duration, concurrency=args.concurrency)
    fixed = hey(url, body_file, duration=args.duration, concurrency=10, rate_per_worker=args.rate / 10)
    print(f"{name:8} max {peak['rps']:8.0f} req/s (p50 {peak['p50']:.2f} ms, p99 {peak['p99']:.2f} ms) | "
          f"at {args.rate}/s: {fixed['rps']:.0f} req/s, p50 {fixed['p50']:.2f} ms, p99 {fixed['p99']:.2f} ms | "
          f"codes {peak['codes']} {fixed['codes']}", flush=True)
    return {"peak": peak, "fixed": fixed}


# --------------------------------------------------------------------------- the three servers


class _Input(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any


class _Request(msgspec.Struct):
    inputs: list[_Input]


def floor_app(package: Path) -> Any:
    """The floor: decode, call the model, encode. Only what any OIP server must do."""
    import msgspec
    import numpy as np

    from modelcd.runtimes.flavors import load_runtime
    from modelcd.store.package import read_package

    pkg = read_package(package.read_bytes())
    runtime = load_runtime(pkg.manifest, pkg.contents)

    decoder = msgspec.json.Decoder(_Request)
    encoder = msgspec.json.Encoder()
    headers = [(b"content-type", b"application/json")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        msg = await receive()
        body = msg.get("body", b"")
        while msg.get("more_body"):
            msg = await receive()
            body += msg.get("body", b"")
        t = decoder.decode(body).inputs[0]
        out = runtime.predict({"input": np.asarray(t.data, dtype=np.float64).reshape(t.shape)})
        resp = {"model_name": "iris", "outputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64",
                                                   "data": v.ravel().tolist()} for k, v in out.items()]}
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": encoder.encode(resp)})

    return app


def run_floor(port: int, package: Path) -> None:
    import uvicorn

    uvicorn.run(floor_app(package), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                lifespan="off", access_log=False, log_level="warning")


def build_package(work: Path) -> Path:
    import numpy as np

    from modelcd.runtimes.build import build_package as build

    ns: dict[str, Any] = {}
    exec(TRAIN, ns)  # noqa: S102 - our own constant: the same training code the MLServer venv runs
    x = ns["x"].astype(np.float64)
    built = build(ns["model"], name="iris", version="1", owner="bench", expiry="30d", sample_inputs={"input": x[:5]})
    path = work / "iris.tar"
    path.write_bytes(built.data)
    return path


async def deploy_modelcd(package: Path, bootstrap: str, store_url: str) -> None:
    from modelcd.events.bus import KafkaConfig, Publisher
    from modelcd.events.schemas import ModelState
    from modelcd.store.blobs import open_store, put_package
    from modelcd.store.package import read_package
    from modelcd.store.targets import TargetState

    data = package.read_bytes()
    m = read_package(data).manifest
    async with open_store(store_url) as store:
        sha = await put_package(store, data)
        state = ModelState(name=m.name, version=m.version, target="serving", sha256=sha, runtime=m.runtime,
                           flavor=m.flavor, owner=m.owner, expiry_seconds=m.expiry_seconds, deployed_at=time.time())
        await TargetState(store).put_model(state)
    async with Publisher(KafkaConfig(bootstrap=bootstrap), "bench") as pub:
        await pub.publish(state)


def bench_modelcd(work: Path, package: Path, body: Path, args: argparse.Namespace) -> dict[str, Any]:
    from modelcd.events.broker import EmbeddedBroker

    async def start() -> EmbeddedBroker:
        b = EmbeddedBroker(port=free_port(), log_file=work / "tansu.log")
        await b.start()
        await deploy_modelcd(package, b.bootstrap, str(work / "store"))
        return b

    loop = asyncio.new_event_loop()
    broker = loop.run_until_complete(start())
    port = free_port()
    env = {**os.environ, "MODELCD_KAFKA_BOOTSTRAP": broker.bootstrap, "MODELCD_KAFKA_IDEMPOTENCE": "false",
           "MODELCD_HOME": str(work / "home"), "MODELCD_STORE_URL": str(work / "store"),
           "MODELCD_LOG_LEVEL": "warning", "MODELCD_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve", "--port", str(port)], env=env,
                            stderr=open(work / "modelcd.log", "wb"))  # noqa: SIM115
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        return measure("modelcd", f"http://127.0.0.1:{port}/v2/models/iris/infer", body, args)
    finally:
        stop(proc)
        loop.run_until_complete(broker.stop())
        loop.close()


def bench_floor(work: Path, package: Path, body: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port), "--package", str(package)],
                            stderr=open(work / "floor.log", "wb"))  # noqa: SIM115
    try:
        _wait_post(f"http://127.0.0.1:{port}/v2/models/iris/infer", proc)
        return measure("floor", f"http://127.0.0.1:{port}/v2/models/iris/infer", body, args)
    finally:
        stop(proc)


def _wait_post(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"floor server exited with {proc.returncode}")
        try:
            if httpx.post(url, json=BODY, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("floor server not ready")


def ensure_mlserver() -> Path:
    py = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        print("creating bench/.venv-mlserver (mlserver, mlserver-sklearn from PyPI)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        # MLServer 1.7's inference workers call asyncio.get_event_loop() outside a loop, which uvloop
        # 0.22+ refuses ("no current event loop"): the model never loads. uvloop < 0.22 still allows it.
        subprocess.run([str(py), "-m", "pip", "install", "-q", "mlserver", "mlserver-sklearn", "uvloop<0.22"],
                       check=True)
    return py


def bench_mlserver(work: Path, body: Path, args: argparse.Namespace) -> dict[str, Any]:
    py = ensure_mlserver()
    models = work / "mlserver" / "iris"
    models.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(py), "-c", TRAIN + f"import joblib; joblib.dump(model, {str(models / 'model.joblib')!r})"],
                   check=True)
    (models / "model-settings.json").write_text(json.dumps({
        "name": "iris", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"}}))
    port = free_port()
    (work / "mlserver" / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1"}))
    proc = subprocess.Popen([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(work / "mlserver")],
                            cwd=work / "mlserver", stdout=open(work / "mlserver.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/models/iris/ready", proc)
        return measure("mlserver", f"http://127.0.0.1:{port}/v2/models/iris/infer", body, args)
    finally:
        stop(proc)


# --------------------------------------------------------------------------- report


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    import httptools
    import uvicorn

    m, f, ml = results["modelcd"], results["floor"], results.get("mlserver")
    lines = [
        "## serving: modelcd node vs MLServer vs bare ASGI floor (bench/bench_serving.py)",
        "",
        f"{datetime.date.today()}, CPython {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} shared cores (other engineers' test runs on the box), uvicorn {uvicorn.__version__}, "
        f"httptools {httptools.__version__}, load generator hey (same machine). Model: sklearn "
        "DecisionTreeClassifier(max_depth=3) on iris, one FP64 [1, 4] row per JSON request.",
        "",
        f"    {command}",
        "",
        f"| server | max req/s (c={args.concurrency}) | p50 ms | p99 ms | at {args.rate:g} req/s: p50 ms | p99 ms | "
        "failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        bad = sum(n for run in (r["peak"], r["fixed"]) for c, n in run["codes"].items() if c != 200) + sum(
            run["errors"] for run in (r["peak"], r["fixed"]))
        lines.append(f"| {name} | {r['peak']['rps']:,.0f} | {r['peak']['p50']:.2f} | {r['peak']['p99']:.2f} | "
                     f"{r['fixed']['p50']:.2f} | {r['fixed']['p99']:.2f} | {bad} |")
    lines.append("")
    per_req = (1 / m["peak"]["rps"]) / (1 / f["peak"]["rps"])
    lines.append(f"- per-request cost vs the floor: {per_req:.2f}x (goal ≤ 1.3x)")
    if ml is not None:
        lines.append(f"- throughput vs MLServer: {m['peak']['rps'] / ml['peak']['rps']:.2f}x (goal ≥ 3x); "
                     f"p99 at {args.rate:g} req/s: {m['fixed']['p99']:.2f} ms vs {ml['fixed']['p99']:.2f} ms "
                     f"({ml['fixed']['p99'] / m['fixed']['p99']:.2f}x lower)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per hey run")
    ap.add_argument("--concurrency", type=int, default=32, help="connections for the throughput run")
    ap.add_argument("--rate", type=float, default=400.0, help="offered requests/s for the latency run")
    ap.add_argument("--skip-mlserver", action="store_true", help="only modelcd and the floor")
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    ap.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--package", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_server:
        run_floor(args.floor_server, args.package)
        return 0
    if shutil.which("hey") is None:
        print("bench_serving needs the `hey` load generator: apt-get install -y hey "
              "(or: go install github.com/rakyll/hey@latest)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        package = build_package(work)
        body = work / "body.json"
        body.write_text(json.dumps(BODY))
        results: dict[str, dict[str, Any]] = {}
        results["modelcd"] = bench_modelcd(work, package, body, args)
        results["floor"] = bench_floor(work, package, body, args)
        if not args.skip_mlserver:
            results["mlserver"] = bench_mlserver(work, body, args)
    command = "python bench/bench_serving.py " + " ".join(sys.argv[1:])
    text = report(results, args, command.strip())
    print("\n" + text)
    if args.append:
        with open(HERE / "RESULTS.md", "a") as fh:
            fh.write("\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
