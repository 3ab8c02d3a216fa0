"""Child processes kept running: the process side of `modelcd up`.

A `Component` is one child process: its command, its environment, how it says it is ready
(a line on a pipe it is handed, or a probe the supervisor runs), and where it listens.
`Supervisor` starts components in tiers, restarts any that dies with exponential backoff
(logged and counted), and stops them all in reverse tier order with a deadline.

Invariants:
- Every child is started from the event loop's thread with `preexec_die_with_parent()`: the
  kernel SIGKILLs it when this process dies, even by SIGKILL, so no child outlives `up`.
- Every child leads its own process group (`start_new_session`), so a terminal's Ctrl-C reaches
  only the supervisor, which stops children in order; a child that died, or that did not stop
  by the deadline, has its whole group SIGKILLed, which takes its own children with it.
- The supervisor is a child subreaper: what a dead child's own children leave behind (a sandbox
  in its own session) is reparented to it, and killed and reaped as soon as a child dies and
  every `SWEEP_S` seconds: nothing outlives the component that started it.
- Every child carries `MODELCD_UP_RUN=<run id>` in its environment; after a stop, and at the
  next start after a crash, a /proc scan kills whatever still carries the run's mark.
- `stop()` returns within the stop timeout plus `KILL_WAIT_S` whatever the children do; a
  cancelled stop (a second Ctrl-C) SIGKILLs every group at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcd.logs import get_logger
from modelcd.runner import become_subreaper, preexec_die_with_parent, proc_start_time, wait_for

log = get_logger("modelcd.supervisor")

Probe = Callable[[], Awaitable[bool]]  # True once the child serves; called until it is
RUN_MARK = "MODELCD_UP_RUN"
KILL_WAIT_S = 3.0  # after SIGKILL, how long a stop waits for the kernel to reap a group
SWEEP_S = 5.0  # how often orphans reparented to the supervisor are killed and reaped


@dataclass(frozen=True)
class Component:
    """One supervised child process; `modelcd up` is a list of these (adding one is one entry)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the supervisor's base environment
    ready_fd: bool = False  # True: the child is given `--ready-fd N` and writes a line there once it serves
    probe: Probe | None = None  # else: readiness by probing (external binaries); neither: ready once started
    url: str | None = None  # what the banner shows
    stop_timeout: float | None = None  # seconds from SIGTERM to SIGKILL; None: the supervisor's drain timeout
    log_file: Path | None = None  # stdout+stderr go there instead of the supervisor's stderr
    on_spawn: Callable[[int], None] | None = None  # called with the pid after each (re)start


@dataclass(frozen=True)
class Backoff:
    """Restart delays: `first`, doubling up to `cap`; a child that ran `stable_after` seconds starts over."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    stable_after: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows `failures` consecutive quick deaths (>= 1)."""
        return float(min(self.cap, self.first * self.factor ** max(0, failures - 1)))

    def failures_after(self, failures: int, ran_for: float) -> int:
        """Consecutive-failure count after a death following `ran_for` seconds of life."""
        return 1 if ran_for >= self.stable_after else failures + 1


def describe_exit(code: int) -> str:
    """'exit code 3' / 'killed by SIGSEGV' for a Popen returncode."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Child:
    """A component's live state (what `status()` reports)."""

    component: Component
    tier: int
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"  # starting | ready | backoff | stopping | stopped
    restarts: int = 0
    failures: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def status(self) -> dict[str, Any]:
        return {"name": self.component.name, "pid": self.pid,
                "start_time": proc_start_time(self.pid) if self.pid else None, "state": self.state,
                "restarts": self.restarts, "last_exit": self.last_exit, "url": self.component.url}


class Supervisor:
    """Start with `async with Supervisor(...) as sup: await sup.start([...])`; leaving stops every child."""

    def __init__(self, *, run_id: str, base_env: Mapping[str, str], stop_timeout: float,
                 backoff: Backoff | None = None, on_change: Callable[[], None] | None = None) -> None:
        self.run_id = run_id
        self.base_env = {**base_env, RUN_MARK: run_id}
        self.stop_timeout = stop_timeout
        self.backoff = backoff or Backoff()
        self.on_change = on_change or (lambda: None)
        self.children: list[Child] = []
        self._stopping = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._tiers = 0

    async def __aenter__(self) -> Supervisor:
        self._subreaper = become_subreaper()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        if self._subreaper:
            self._tg.create_task(self._sweeping(), name="orphan-sweeper")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.stop()
        finally:
            assert self._tg is not None
            await self._tg.__aexit__(*exc)

    # --- starting and keeping ------------------------------------------------------------------------

    def start(self, components: Sequence[Component]) -> list[Child]:
        """Start one tier of components (they start together; tiers stop in reverse order)."""
        assert self._tg is not None, "use `async with Supervisor(...)`"
        tier, self._tiers = self._tiers, self._tiers + 1
        started = []
        for comp in components:
            child = Child(comp, tier)
            self.children.append(child)
            started.append(child)
            self._tg.create_task(self._keep(child), name=f"keep-{comp.name}")
        return started

    async def wait_ready(self, children: Sequence[Child], stop: asyncio.Event) -> bool:
        """Wait until every child is ready (restarts included); False if `stop` came first."""
        for child in children:
            waiter = asyncio.ensure_future(child.ready.wait())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopped.cancel()
            if not child.ready.is_set():
                return False
        return True

    async def _keep(self, child: Child) -> None:
        """Run the child; while the supervisor is not stopping, restart it with backoff when it dies."""
        while not self._stopping.is_set():
            try:
                self._spawn(child)
            except OSError as exc:
                code_text = f"could not start: {exc}"
                log.error("component could not start", component=child.component.name, error=str(exc))
                ran_for = 0.0
            else:
                await self._watch(child)
                assert child.proc is not None
                code_text = describe_exit(child.proc.returncode)
                ran_for = time.monotonic() - child.started_at
                self._kill_group(child.proc.pid)  # whatever the dead child left in its group
                self.sweep()  # and whatever it left outside its group (reparented to us)
            child.ready.clear()
            if self._stopping.is_set():
                break
            child.restarts += 1
            child.failures = self.backoff.failures_after(child.failures, ran_for)
            delay = self.backoff.delay(child.failures)
            child.state, child.last_exit = "backoff", code_text
            log.warning("component died; restarting", component=child.component.name, reason=code_text,
                        ran_s=round(ran_for, 1), restarts=child.restarts, restart_in_s=delay)
            self.on_change()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._stopping.wait(), delay)
        child.state = "stopped"
        self.on_change()

    def _spawn(self, child: Child) -> None:
        comp = child.component
        argv = list(comp.argv)
        r = w = -1
        if comp.ready_fd:
            r, w = os.pipe()
            argv += ["--ready-fd", str(w)]
        out: Any = None
        try:
            if comp.log_file is not None:
                comp.log_file.parent.mkdir(parents=True, exist_ok=True)
                out = open(comp.log_file, "ab")  # noqa: SIM115 - closed right after the fork
            child.proc = subprocess.Popen(
                argv, env={**self.base_env, **comp.env}, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out is not None else None, pass_fds=(w,) if w >= 0 else (),
                start_new_session=True, preexec_fn=preexec_die_with_parent(), close_fds=True)
        except BaseException:
            if r >= 0:
                os.close(r)
            raise
        finally:
            if w >= 0:
                os.close(w)
            if out is not None:
                out.close()
        child.started_at = time.monotonic()
        child.state = "starting"
        child.exited.clear()
        log.info("component started", component=comp.name, pid=child.proc.pid)
        if comp.on_spawn is not None:
            comp.on_spawn(child.proc.pid)
        self.on_change()
        if r >= 0:
            self._read_ready(child, r)
        elif comp.probe is not None:
            assert self._tg is not None
            self._tg.create_task(self._probe(child, child.proc), name=f"probe-{comp.name}")
        else:
            self._mark_ready(child)

    def _mark_ready(self, child: Child) -> None:
        if child.state == "starting":
            child.state = "ready"
            child.ready.set()
            log.info("component ready", component=child.component.name, pid=child.pid)
            self.on_change()

    def _read_ready(self, child: Child, fd: int) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if b"ready" in data:
                self._mark_ready(child)
            if not data:  # the child closed it or died
                loop.remove_reader(fd)
                os.close(fd)

        loop.add_reader(fd, readable)

    async def _probe(self, child: Child, proc: subprocess.Popen[bytes]) -> None:
        probe = child.component.probe
        assert probe is not None
        while child.proc is proc and proc.poll() is None and not self._stopping.is_set():
            try:
                if await probe():
                    self._mark_ready(child)
                    return
            except Exception as exc:  # not ready yet
                log.debug("probe failed", component=child.component.name, error=str(exc))
            await asyncio.sleep(0.1)

    async def _watch(self, child: Child) -> None:
        """Return once the child has exited (a pidfd on the loop; polling where there is none)."""
        proc = child.proc
        assert proc is not None
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = -1
        if pidfd >= 0:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
            try:
                await done
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        while proc.poll() is None:  # the pidfd said it exited: reap it (or poll where there is no pidfd)
            await asyncio.sleep(0.05)
        child.exited.set()

    # --- orphans -------------------------------------------------------------------------------------

    async def _sweeping(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await wait_for(self._stopping.wait(), SWEEP_S)
            self.sweep()

    def sweep(self) -> list[int]:
        """Kill and reap our children that are not components (orphans reparented to us); their pids."""
        if not getattr(self, "_subreaper", False):
            return []
        ours = {c.proc.pid for c in self.children if c.proc is not None}
        me = os.getpid()
        killed = []
        for pid, state, ppid in _proc_table():
            if ppid != me or pid in ours:
                continue
            if state != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            _reap(pid)
        if killed:
            log.warning("killed processes a component left behind", pids=killed)
        return killed

    # --- stopping ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every child, last tier first; SIGKILL at the deadline; SIGKILL all at once if cancelled."""
        if self._stopping.is_set() and all(c.state == "stopped" for c in self.children):
            return
        self._stopping.set()
        try:
            for tier in reversed(range(self._tiers)):
                group = [c for c in self.children if c.tier == tier]
                await asyncio.gather(*(self._stop_child(c) for c in group))
        except asyncio.CancelledError:
            log.warning("forced stop: killing every component now")
            for c in self.children:
                if c.proc is not None:
                    self._kill_group(c.proc.pid)
            raise
        finally:
            leftovers = kill_marked(self.run_id)
            if leftovers:
                log.warning("killed processes the components left behind", pids=leftovers)
            self.sweep()

    async def _stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self._kill_group(proc.pid)
            return
        child.state = "stopping"
        self.on_change()
        timeout = child.component.stop_timeout if child.component.stop_timeout is not None else self.stop_timeout
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await wait_for(child.exited.wait(), timeout)
        except TimeoutError:
            log.warning("component did not stop in time; killing it", component=child.component.name,
                        timeout_s=timeout)
        self._kill_group(proc.pid)
        with contextlib.suppress(TimeoutError):
            await wait_for(child.exited.wait(), KILL_WAIT_S)
        log.info("component stopped", component=child.component.name, exit=describe_exit(proc.returncode)
                 if proc.returncode is not None else "unknown")

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def status(self) -> list[dict[str, Any]]:
        return [c.status() for c in self.children]


def _proc_table() -> list[tuple[int, str, int]]:
    """(pid, state letter, parent pid) of every process, from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        out.append((int(entry.name), fields[0].decode(), int(fields[1])))
    return out


def _reap(pid: int, timeout: float = 1.0) -> None:
    """Collect a killed orphan's exit status (it is our child now) so no zombie is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def marked_pids(run_id: str) -> list[int]:
    """Pids of live processes (not this one) whose environment carries `MODELCD_UP_RUN=run_id`."""
    needle = f"{RUN_MARK}={run_id}".encode()
    me = os.getpid()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and proc_start_time(int(entry.name)) is not None:
            out.append(int(entry.name))
    return out


def kill_marked(run_id: str) -> list[int]:
    """SIGKILL every live process marked with `run_id`; the pids it signalled."""
    pids = marked_pids(run_id) if os.path.isdir("/proc") else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids
