"""What the scenario scripts share: the machine's description, hey runs, ports, process-tree RSS,
and `System`, a whole `modelcd up --nodes N` started in a scratch home.

Load always comes from `hey` (another process, a public tool): closed loop (`-c`) for
saturation, paced (`-q` per connection) for fixed offered rates. hey -q is not a true open-loop
generator (wrk2 is, but Debian has no package for it): each connection waits for its answer
before the next request, so a fixed rate is only kept while a response is faster than the
pacing interval. `report.hey_connections` sizes connections so that interval is >= 20 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import hey_connections, parse_hey


def need_hey() -> None:
    if shutil.which("hey") is None:
        raise SystemExit("the benchmarks need `hey` (a Go load generator): apt-get install -y hey "
                         "(or: go install github.com/rakyll/hey@latest); `make bench` installs it when run as root")


def hey(url: str, body_file: Path, *, seconds: float, connections: int = 8, rate: float = 0.0,
        timeout: float = 20) -> dict[str, Any]:
    """One bounded hey run: closed loop when `rate` is 0, else `rate` req/s in all over `connections`."""
    need_hey()
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(connections), "-t", str(int(timeout)), "-m", "POST",
           "-T", "application/json", "-D", str(body_file)]
    if rate:
        cmd += ["-q", f"{rate / connections:.3f}"]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + timeout + 30, check=True)
    out = parse_hey(done.stdout)
    out.update(offered=rate, connections=connections, seconds=seconds)
    return out


def hey_fixed(url: str, body_file: Path, *, seconds: float, rate: float) -> dict[str, Any]:
    """A fixed offered rate with connections sized by `hey_connections` (see the module docstring)."""
    return hey(url, body_file, seconds=seconds, rate=rate, connections=hey_connections(rate))


def hey_async(url: str, body_file: Path, *, seconds: float, rate: float) -> subprocess.Popen[str]:
    """A fixed-rate hey run in the background; `finish` parses it."""
    need_hey()
    c = hey_connections(rate)
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(c), "-t", "20", "-q", f"{rate / c:.3f}", "-m", "POST",
           "-T", "application/json", "-D", str(body_file), url]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    return parse_hey(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_block(n: int) -> int:
    """The first of `n` consecutive free loopback ports."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit(f"no block of {n} free ports")


def machine() -> dict[str, Any]:
    """What the figures were measured on: versions, cores, memory, load average, commit."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    hey_version = "hey (Debian)" if shutil.which("hey") else "-"
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "loadavg": os.getloadavg(),
            "commit": commit, "kernel": platform.release(), "load_generator": hey_version,
            "versions": {p: version(p) for p in ("uvicorn", "httptools", "uvloop", "scikit-learn", "onnxruntime",
                                                 "msgspec", "aiokafka", "numpy", "matplotlib")}}


def tree_pids(root: int) -> list[int]:
    """`root` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss(pid: int) -> int:
    """Resident bytes of one process (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_tree(root: int) -> dict[str, int]:
    """RSS and PSS (shared pages split between sharers: forked workers share their parent's) of a tree."""
    total_rss = total_pss = 0
    pids = tree_pids(root)
    for p in pids:
        total_rss += rss(p)
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return {"rss": total_rss, "pss": total_pss, "processes": len(pids)}


def wait_http(url: str, *, timeout: float = 120.0, proc: subprocess.Popen[Any] | None = None,
              status: int = 200) -> float:
    """Poll GET `url` until it answers `status`; seconds waited. Fails if `proc` exits first."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).status_code == status:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer {status} within {timeout:.0f} s")


class System:
    """`modelcd up --nodes N` in a scratch home, on free ports, stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, nodes: int = 1, *, env: dict[str, str] | None = None, home: Path | None = None) -> None:
        self.nodes = nodes
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix="bench-up-")
        self.home = home or Path(self._tmp.name)  # type: ignore[union-attr]
        base = free_block(nodes + 1)
        self.ingest_port = free_port()
        self.serving_port = base
        self.env = {**os.environ, "MODELCD_HOME": str(self.home), "MODELCD_BROKER_PORT": str(free_port()),
                    "MODELCD_INGEST_PORT": str(self.ingest_port), "MODELCD_SERVING_PORT": str(base),
                    "MODELCD_FRONTDOOR_ADMIN_PORT": str(free_port()), "MODELCD_LOG_LEVEL": "warning",
                    "MODELCD_LOG_FORMAT": "json", "MODELCD_REPLICAS": "0", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def node_urls(self) -> list[str]:
        off = 1 if self.nodes > 1 else 0
        return [f"http://127.0.0.1:{self.serving_port + off + i}" for i in range(self.nodes)]

    @property
    def front(self) -> str:
        """Where clients send predictions: the front door with several nodes, else the lone node."""
        return f"http://127.0.0.1:{self.serving_port}"

    def start(self, timeout: float = 180) -> System:
        log = open(self.home / "up.log", "ab")  # noqa: SIM115 - kept open for the child's life
        self.proc = subprocess.Popen([sys.executable, "-m", "modelcd", "up", "--nodes", str(self.nodes)],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.home),
                                     start_new_session=True)
        wait_http(f"{self.api}/healthz", timeout=timeout, proc=self.proc)
        for url in self.node_urls:
            wait_http(f"{url}/v2/health/live", timeout=timeout, proc=self.proc)
        return self

    def node_pids(self) -> list[int]:
        """The serving children (`modelcd.child serving`), from the supervisor's tree."""
        out = []
        for p in tree_pids(self.proc.pid) if self.proc else []:
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"modelcd.child" in cmd and b"serving" in cmd:
                out.append(p)
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> System:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    # ---------------------------------------------------------------- deployments through the API

    def deploy(self, data: bytes) -> str:
        """POST /deployments (a tar); the deployment id."""
        import httpx

        r = httpx.post(f"{self.api}/deployments", content=data, headers={"content-type": "application/x-tar"},
                       timeout=60)
        if r.status_code != 202:
            raise SystemExit(f"deploy refused: {r.status_code} {r.text[:300]}")
        return str(r.json()["deployment_id"])

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(f"{self.api}/deployments/{deployment_id}", timeout=30).json())

    def wait_deployed(self, deployment_id: str, timeout: float = 300) -> dict[str, Any]:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            view = self.deployment(deployment_id)
            if view.get("status") == "completed":
                return view
            if view.get("status") == "failed":
                raise SystemExit(f"deployment {deployment_id} failed: {json.dumps(view)[:500]}")
            time.sleep(0.05)
        raise SystemExit(f"deployment {deployment_id} not done within {timeout:.0f} s")
