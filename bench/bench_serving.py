"""Serving vs peers: a modelcd node, the fleet's front door, MLServer, KServe's model server and the floor.

Run:  python bench/bench_serving.py [--seconds 8] [--models logreg,gbt] [--batches 1,64] [--json out.json]

Needs `hey` (Debian: `apt-get install -y hey`). Peers get venvs of their own, created on first use:
bench/.venv-mlserver (`mlserver`, `mlserver-sklearn`, from PyPI) and bench/.venv-kserve (`kserve`,
`scikit-learn`); neither is a modelcd dependency.

The same models everywhere, trained identically in each venv from the same code (`TRAIN`):
scikit-learn's LogisticRegression and GradientBoostingClassifier(100 trees, depth 3) on
make_classification(2000 rows, 20 features, random_state=0); the same request, FP32 [B, 20] as OIP
JSON to /v2/models/<name>/infer, for B = 1 and 64 rows. Servers, one after the other:
- modelcd: `modelcd up` (one node), the models deployed through the deployment API as a user does
  (so ingest compiles them to ONNX where it can), telemetry on (usage, 1 % prediction logs, metrics);
- frontdoor: `modelcd up --nodes 2` (every node loads every model), requests through the front door;
- mlserver: `mlserver start` with its defaults (one parallel inference worker, metrics on);
- kserve: KServe's Python model server (`kserve.ModelServer`, one worker) with a kserve.Model that
  predicts with the scikit-learn model, OIP (v2) REST;
- floor: a raw ASGI app on the same uvicorn/uvloop/httptools that decodes with msgspec, calls the
  very runtime (and package, as ingest compiled it) the modelcd node serves, and encodes: nothing else.
Per server, model and batch: saturation (closed loop, `--concurrency` connections), then the p50 and
p99 at fixed offered loads of 25 % and 50 % of modelcd's saturation for the same model and batch
(hey -q; see bench/common.py for what that does and does not guarantee).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import System, free_port, hey, hey_fixed, machine, need_hey, wait_http

MLSERVER_VENV = HERE / ".venv-mlserver"
KSERVE_VENV = HERE / ".venv-kserve"
FEATURES = 20
TRAIN = ("import numpy as np\nfrom sklearn.datasets import make_classification\n"
         "from sklearn.linear_model import LogisticRegression\n"
         "from sklearn.ensemble import GradientBoostingClassifier\n"
         "x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, random_state=0)\n"
         "x = x.astype(np.float32)\n"
         "MODELS = {'logreg': LogisticRegression(max_iter=1000).fit(x, y),\n"
         "          'gbt': GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0).fit(x, y)}\n")


def body(batch: int) -> dict[str, Any]:
    import numpy as np

    rows = np.random.default_rng(batch).normal(size=(batch, FEATURES)).round(4).tolist()
    return {"inputs": [{"name": "input", "shape": [batch, FEATURES], "datatype": "FP32", "data": rows}]}


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_post(url: str, proc: subprocess.Popen[Any], payload: dict[str, Any], timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it answered {url}")
        try:
            if httpx.post(url, json=payload, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no 200 from {url} within {timeout:.0f} s")


# --------------------------------------------------------------------------- measuring one server


def measure(server: str, base: str, work: Path, args: argparse.Namespace, sat: dict[tuple[str, int], float],
            results: list[dict[str, Any]]) -> None:
    """Every model and batch on one running server: saturation, then 25 % and 50 % of modelcd's."""
    for model in args.models:
        for batch in args.batches:
            f = work / f"body-{batch}.json"
            url = f"{base}/v2/models/{model}/infer"
            hey(url, f, seconds=1, connections=8)  # warm-up
            peak = hey(url, f, seconds=args.seconds, connections=args.concurrency)
            if server == "modelcd":
                sat[(model, batch)] = peak["rps"]
            row: dict[str, Any] = {"server": server, "model": model, "batch": batch, "saturation": peak}
            for share in (0.25, 0.5):
                rate = share * sat.get((model, batch), peak["rps"])
                row[f"at{int(share * 100)}"] = hey_fixed(url, f, seconds=args.seconds, rate=rate)
            results.append(row)
            a, b = row["at25"], row["at50"]
            print(f"{server:9} {model:6} x{batch:<3} sat {peak['rps']:8,.0f} req/s | 25%: p50 {a['p50']:.2f} "
                  f"p99 {a['p99']:.2f} ms | 50%: p50 {b['p50']:.2f} p99 {b['p99']:.2f} ms | failed "
                  f"{peak['failed'] + a['failed'] + b['failed']}", flush=True)


# --------------------------------------------------------------------------- the servers


def packages(work: Path) -> dict[str, bytes]:
    """The models as modelcd packages (ingest compiles them on deploy)."""
    from modelcd.runtimes.build import build_package

    ns: dict[str, Any] = {}
    exec(TRAIN, ns)  # noqa: S102 - our own constant: the same training code every venv runs
    return {name: build_package(model, name=name, version="1", owner="bench", expiry="30d",
                                sample_inputs={"input": ns["x"][:8]}).data for name, model in ns["MODELS"].items()}


def run_modelcd(nodes: int, work: Path, pkgs: dict[str, bytes], args: argparse.Namespace,
                sat: dict[tuple[str, int], float], results: list[dict[str, Any]]) -> dict[str, Path]:
    """A `modelcd up` with `nodes` nodes; the models through the API. Returns the served packages' paths."""
    served: dict[str, Path] = {}
    with System(nodes) as system:
        for name, data in pkgs.items():
            system.wait_deployed(system.deploy(data))
            for url in system.node_urls:
                wait_http(f"{url}/v2/models/{name}/ready", timeout=120)
        # The packages as ingest stored them (compiled to ONNX where it could): what the floor serves too.
        from modelcd.store.package import read_package

        for f in sorted((system.home / "store").rglob("*")):
            if f.is_file() and "packages" in f.parts:
                try:
                    m = read_package(f.read_bytes()).manifest
                except Exception:  # noqa: BLE001, S112 - not a package (an upload, a record)
                    continue
                if m.name in pkgs:
                    served[m.name] = work / f"{m.name}.served.tar"
                    served[m.name].write_bytes(f.read_bytes())
        measure("modelcd" if nodes == 1 else "frontdoor", system.front, work, args, sat, results)
        if nodes == 1 and args.profile:
            profile(system, work, args)
    return served


def py_spy() -> str | None:
    """py-spy's binary: beside this interpreter, on PATH, or beside the site-packages that hold py_spy."""
    import shutil
    import sysconfig

    for cand in (Path(sys.executable).parent / "py-spy", Path(sysconfig.get_path("scripts")) / "py-spy"):
        if cand.exists():
            return str(cand)
    found = shutil.which("py-spy")
    if found:
        return found
    for entry in sys.path:
        if entry.endswith("site-packages") and (Path(entry).parents[2] / "bin" / "py-spy").exists():
            return str(Path(entry).parents[2] / "bin" / "py-spy")
    return None


def profile(system: System, work: Path, args: argparse.Namespace) -> None:
    """py-spy on the node (and its model workers) during an extra saturation run of the first model, 1 row."""
    exe = py_spy()
    pids = system.node_pids()
    if exe is None or not pids:
        print("no profile: py-spy not found (pip install py-spy) or no node process", flush=True)
        return
    out = args.profile
    seconds = max(3, int(args.seconds))
    spy = subprocess.Popen([exe, "record", "--subprocesses", "-r", "200", "-d", str(seconds), "-f", "raw", "-o",
                            str(out), "-p", str(pids[0])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    hey(f"{system.front}/v2/models/{args.models[0]}/infer", work / "body-1.json", seconds=seconds,
        connections=args.concurrency)
    try:
        spy.wait(seconds + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
    print(f"profile of the node under saturation: {out} (py-spy raw stacks)", flush=True)


class _Input(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any


class _Request(msgspec.Struct):
    inputs: list[_Input]


def floor_app(packages: dict[str, Path]) -> Any:
    """The floor: decode, call the model's runtime, encode. Only what any OIP server must do."""
    import numpy as np

    from modelcd.runtimes.flavors import load_runtime
    from modelcd.store.package import read_package

    runtimes = {}
    for name, path in packages.items():
        pkg = read_package(path.read_bytes())
        runtimes[name.encode()] = (load_runtime(pkg.manifest, pkg.contents), pkg.manifest.inputs[0].name)
    decoder = msgspec.json.Decoder(_Request)
    encoder = msgspec.json.Encoder()
    headers = [(b"content-type", b"application/json")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        msg = await receive()
        data = msg.get("body", b"")
        while msg.get("more_body"):
            msg = await receive()
            data += msg.get("body", b"")
        name = scope["path"].encode().split(b"/")[3]
        runtime, input_name = runtimes[name]
        t = decoder.decode(data).inputs[0]
        out = runtime.predict({input_name: np.asarray(t.data, dtype=np.float32).reshape(t.shape)})
        resp = {"model_name": name.decode(), "outputs": [
            {"name": k, "shape": list(v.shape), "datatype": "FP32" if v.dtype.kind == "f" else "INT64",
             "data": v.ravel().tolist()} for k, v in out.items()]}
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": encoder.encode(resp)})

    return app


def run_floor_server(port: int, spec: str) -> None:
    import uvicorn

    pkgs = {k: Path(v) for k, v in json.loads(spec).items()}
    uvicorn.run(floor_app(pkgs), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                lifespan="off", access_log=False, log_level="warning")


def run_floor(work: Path, served: dict[str, Path], args: argparse.Namespace, sat: dict[tuple[str, int], float],
              results: list[dict[str, Any]]) -> None:
    if set(served) != set(args.models):
        raise SystemExit(f"the floor needs the served packages of {args.models}; found {sorted(served)}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port), "--packages",
                             json.dumps({k: str(v) for k, v in served.items()})],
                            stderr=open(work / "floor.log", "wb"))  # noqa: SIM115
    try:
        for name in args.models:
            _wait_post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", proc, body(1))
        measure("floor", f"http://127.0.0.1:{port}", work, args, sat, results)
    finally:
        stop(proc)


def ensure_venv(venv: Path, packages: list[str]) -> Path:
    py = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        print(f"creating {venv.relative_to(ROOT)} ({', '.join(packages)} from PyPI)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
        (venv / ".installed").touch()
    return py


def train_into(py: Path, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(py), "-c", TRAIN + "import joblib\nfor k, m in MODELS.items():\n"
                    f"    joblib.dump(m, {str(where)!r} + f'/{{k}}.joblib')\n"], check=True)


def run_mlserver(work: Path, args: argparse.Namespace, sat: dict[tuple[str, int], float],
                 results: list[dict[str, Any]]) -> None:
    # MLServer 1.7's inference workers call asyncio.get_event_loop() outside a loop, which uvloop
    # 0.22+ refuses ("no current event loop"): the model never loads. uvloop < 0.22 still allows it.
    py = ensure_venv(MLSERVER_VENV, ["mlserver", "mlserver-sklearn", "uvloop<0.22"])
    root = work / "mlserver"
    train_into(py, root / "joblib")
    for name in args.models:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(root / "joblib" / f"{name}.joblib"), "version": "1"}}))
    port = free_port()
    (root / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1"}))
    proc = subprocess.Popen([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(root)], cwd=root,
                            stdout=open(work / "mlserver.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        for name in args.models:
            wait_http(f"http://127.0.0.1:{port}/v2/models/{name}/ready", proc=proc, timeout=180)
        measure("mlserver", f"http://127.0.0.1:{port}", work, args, sat, results)
    finally:
        stop(proc)


KSERVE_SERVER = '''
import sys, joblib, numpy as np, kserve
from kserve import InferRequest, InferResponse, InferOutput

class SK(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.model = joblib.load(path)
        self.ready = True

    def predict(self, payload, headers=None):
        x = payload.inputs[0].as_numpy()
        y = self.model.predict(x)
        out = InferOutput(name="predict", shape=list(y.shape), datatype="INT64", data=y.astype(np.int64).tolist())
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "bench")

port, root, names = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
sys.argv = sys.argv[:1]
kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start(
    [SK(n, f"{root}/{n}.joblib") for n in names])
'''


def run_kserve(work: Path, args: argparse.Namespace, sat: dict[tuple[str, int], float],
               results: list[dict[str, Any]]) -> None:
    py = ensure_venv(KSERVE_VENV, ["kserve", "scikit-learn"])
    root = work / "kserve"
    train_into(py, root)
    (root / "server.py").write_text(KSERVE_SERVER)
    port = free_port()
    proc = subprocess.Popen([str(py), str(root / "server.py"), str(port), str(root), ",".join(args.models)],
                            cwd=root, stdout=open(work / "kserve.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        for name in args.models:
            _wait_post(f"http://127.0.0.1:{port}/v2/models/{name}/infer", proc, body(1), timeout=180)
        measure("kserve", f"http://127.0.0.1:{port}", work, args, sat, results)
    finally:
        stop(proc)


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per hey run")
    ap.add_argument("--concurrency", type=int, default=32, help="connections for the saturation run")
    ap.add_argument("--models", default="logreg,gbt", help="comma list of logreg, gbt")
    ap.add_argument("--batches", default="1,64", help="rows per request (comma list)")
    ap.add_argument("--servers", default="modelcd,frontdoor,mlserver,kserve,floor", help="comma list")
    ap.add_argument("--json", type=Path, help="write the figures here (bench/run.py reads them)")
    ap.add_argument("--profile", type=Path, help="py-spy raw stacks of the modelcd node at saturation, here")
    ap.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--packages", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_server:
        run_floor_server(args.floor_server, args.packages)
        return 0
    need_hey()
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    servers = args.servers.split(",")
    sat: dict[tuple[str, int], float] = {}
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        for b in args.batches:
            (work / f"body-{b}.json").write_text(json.dumps(body(b)))
        pkgs = {k: v for k, v in packages(work).items() if k in args.models}
        served = run_modelcd(1, work, pkgs, args, sat, results)  # first: the others' rates come from it
        if "frontdoor" in servers:
            run_modelcd(2, work, pkgs, args, sat, results)
        if "mlserver" in servers:
            run_mlserver(work, args, sat, results)
        if "kserve" in servers:
            run_kserve(work, args, sat, results)
        if "floor" in servers:
            run_floor(work, served, args, sat, results)
    out = {"scenario": "serving", "command": "python bench/bench_serving.py " + " ".join(sys.argv[1:]),
           "seconds": args.seconds, "concurrency": args.concurrency, "results": results,
           "elapsed_s": time.monotonic() - t0, "machine": machine(),
           "profile": str(args.profile) if args.profile and args.profile.exists() else None}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
