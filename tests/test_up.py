"""`modelcd up` as a supervisor, run as a user runs it (a real process tree, real broker, /proc scans).

Findings covered: after a SIGKILL of `modelcd up` the orphaned embedded broker held the port and
the next start failed; a crash of one part took every part down; a stuck part kept SIGINT from
stopping the whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from modelcd.events.broker import EmbeddedBroker, free_port, port_in_use
from modelcd.runner import proc_start_time
from modelcd.supervisor import Backoff, describe_exit, marked_pids

MODELCD = [sys.executable, "-m", "modelcd"]
START_TIMEOUT = 120.0  # generous: five interpreters import model libraries on a shared 2-core machine
STOP_TIMEOUT = 60.0


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    """Restart delays double up to the cap; a child that ran long enough counts as a first failure again."""
    b = Backoff(first=0.5, factor=2, cap=4, stable_after=60)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.failures_after(3, ran_for=1.0) == 4
    assert b.failures_after(3, ran_for=61.0) == 1
    assert describe_exit(-6) == "killed by SIGABRT" and describe_exit(2) == "exit code 2"


class Up:
    """One `modelcd up` process with its own home and ports."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.home = tmp / "home"
        self.ports = {"MODELCD_BROKER_PORT": free_port(), "MODELCD_INGEST_PORT": free_port(),
                      "MODELCD_SERVING_PORT": free_port(), "MODELCD_FRONTDOOR_ADMIN_PORT": free_port()}
        self.args: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
        self.env.update({k: str(v) for k, v in self.ports.items()})
        self.env.update(MODELCD_HOME=str(self.home), MODELCD_LOG_FORMAT="json", MODELCD_VALIDATION_WARM="false",
                        MODELCD_DRAIN_TIMEOUT="2", **env)
        self.log = tmp / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*MODELCD, "up", *self.args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.home / "up.json").read_text())
        except (OSError, ValueError):
            return {}

    async def wait(self, check: Any, what: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"modelcd up exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log.read_text()[-3000:])
            st = self.status()
            if st.get("pid") == self.proc.pid and check(st):
                return st
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log.read_text()[-3000:])

    async def ready(self) -> dict[str, Any]:
        return await self.wait(lambda st: st.get("components") and all(c["state"] == "ready"
                                                                       for c in st["components"]), "every component ready")

    def url(self, name: str) -> str:
        port = self.ports["MODELCD_INGEST_PORT"] if name == "ingest" else self.ports["MODELCD_SERVING_PORT"]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def _gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids of `pids` still alive after `timeout` seconds."""
    starts = {p: proc_start_time(p) for p in pids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if starts[p] is not None and proc_start_time(p) == starts[p]]
        if not alive:
            return []
        await asyncio.sleep(0.1)
    return alive


@pytest.mark.faults
async def test_up_starts_again_after_a_sigkill_and_leaves_no_orphan(tmp_path: Path) -> None:
    """SIGKILL `modelcd up` (two nodes and the front door): every process it started dies with it, and the
    next start works with no manual step."""
    up = Up(tmp_path)
    up.args = ["--nodes", "2"]
    up.start()
    try:
        st = await up.ready()
        run_id, children = st["run_id"], [c["pid"] for c in st["components"]]
        everything = marked_pids(run_id)  # the children and theirs (Caddy, sandboxes, model workers)
        assert set(children) <= set(everything)
        up.kill()
        assert await _gone(everything) == [], "processes outlived a SIGKILLed modelcd up"
        assert marked_pids(run_id) == [], "processes of the killed run are left"
        assert not port_in_use(up.ports["MODELCD_BROKER_PORT"])
        up.start()
        await up.ready()
        assert _get(up.url("serving") + "/v2/health/live") == 200
        assert await up.stop() == 0
    finally:
        up.kill()


@pytest.mark.faults
async def test_up_stops_a_stale_broker_of_its_home_and_goes_on(tmp_path: Path) -> None:
    """A broker recorded in <home>/broker.pid (a crashed run's, on our port) is stopped, not a start failure."""
    up = Up(tmp_path)
    up.home.mkdir(parents=True)
    port = up.ports["MODELCD_BROKER_PORT"]
    stale = subprocess.Popen(EmbeddedBroker(port=port).command(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)  # an orphan: nobody's child
    try:
        deadline = time.monotonic() + 30
        while not port_in_use(port) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        (up.home / "broker.pid").write_text(json.dumps({"pid": stale.pid, "port": port,
                                                        "start_time": proc_start_time(stale.pid)}))
        up.start()
        st = await up.ready()
        assert stale.poll() is not None, "the stale broker still runs"
        assert [c for c in st["components"] if c["name"] == "broker"][0]["pid"] != stale.pid
        assert await up.stop() == 0
    finally:
        up.kill()
        if stale.poll() is None:
            stale.kill()
        stale.wait()


@pytest.mark.faults
async def test_a_crashed_component_is_restarted_and_a_stuck_one_cannot_hold_the_stop(tmp_path: Path) -> None:
    """A node that aborts is restarted (what it started dies too) while ingest keeps answering; SIGINT ends all,
    SIGKILLing a stuck part."""
    crash_file = tmp_path / "crashed-once"
    up = Up(tmp_path, MODELCD_TEST_CRASH=f"serving-0@{crash_file}", MODELCD_TEST_STUCK="retirement")
    up.start()
    try:
        st = await up.wait(lambda st: any(c["name"] == "serving-0" and c["restarts"] >= 1 and c["state"] == "ready"
                                          for c in st.get("components", [])) and all(
            c["state"] == "ready" for c in st["components"]), "serving-0 restarted and everything ready")
        node = [c for c in st["components"] if c["name"] == "serving-0"][0]
        crashed = json.loads(crash_file.read_text())
        assert node["last_exit"] == "killed by SIGABRT"
        assert node["pid"] != crashed["pid"]
        assert await _gone([crashed["orphan"]]) == [], "what the crashed node started outlived it"
        assert all(c["restarts"] == 0 for c in st["components"] if c["name"] != "serving-0")
        assert _get(up.url("ingest") + "/healthz") == 200
        assert _get(up.url("serving") + "/v2/health/live") == 200
        status = await asyncio.to_thread(subprocess.run, [*MODELCD, "status"], env=up.env, capture_output=True,
                                         text=True, timeout=60)
        assert status.returncode == 0 and "killed by SIGABRT" in status.stdout, status.stdout
        children = [c["pid"] for c in st["components"]]
        assert await up.stop() == 0  # within STOP_TIMEOUT although retirement ignores SIGTERM
        assert await _gone(children) == []
        assert marked_pids(st["run_id"]) == []
        log = up.log.read_text()
        assert "component did not stop in time; killing it" in log and '"component":"retirement"' in log
    finally:
        up.kill()


@pytest.mark.faults
async def test_a_second_up_on_a_live_home_refuses_with_a_reason(tmp_path: Path) -> None:
    """Two `modelcd up` on one home: the second exits 2 naming the first's pid; the first is untouched."""
    up = Up(tmp_path)
    up.start()
    try:
        st = await up.wait(lambda st: True, "up.json written")
        second = await asyncio.to_thread(subprocess.run, [*MODELCD, "up"], env=up.env, capture_output=True,
                                         text=True, timeout=60)
        assert second.returncode == 2
        assert "already running" in second.stderr and str(st["pid"]) in second.stderr
        assert up.proc is not None and up.proc.poll() is None
        await up.ready()
        assert await up.stop() == 0
    finally:
        up.kill()


STUCK_THREAD = """
import asyncio, sys, time
from modelcd.runner import run_main

async def main(stop):
    asyncio.get_running_loop().run_in_executor(None, time.sleep, 600)  # a thread stuck in "model code"
    print("started", flush=True)
    await stop.wait()
    return 0

sys.exit(run_main(main))
"""


async def test_sigint_ends_a_command_whose_worker_thread_is_stuck(tmp_path: Path) -> None:
    """A command with a thread stuck in native code still exits on SIGINT (the thread is not joined)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", STUCK_THREAD, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"started\n"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), STOP_TIMEOUT) == 0
        assert proc.stderr is not None
        said = await proc.stdout.read() + await proc.stderr.read()  # structlog unconfigured: stdout
        assert b"exiting without waiting for it" in said
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_batch_services_yield_the_cpu_to_serving_nodes() -> None:
    """On one machine, deployments raised a steady load's p99: ingest and the stream processors run at
    MODELCD_BATCH_NICE, serving nodes and the front door at the priority `up` has."""
    import subprocess
    import sys

    code = ("import os, sys; from modelcd.child import yield_to_serving; from modelcd.settings import Settings; "
            "base = os.nice(0); s = Settings(batch_nice=7); "
            "print(yield_to_serving(sys.argv[1], s) - base)")
    got = {kind: int(subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True,
                                    check=True).stdout) for kind in ("ingest", "retirement", "serving", "frontdoor")}
    assert got == {"ingest": 7, "retirement": 7, "serving": 0, "frontdoor": 0}
