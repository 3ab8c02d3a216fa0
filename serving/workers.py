"""The front's side of the model workers: the zygote that forks them, and one `Worker` per model.

Model code never runs in the front (HTTP, routing, telemetry, the state follower): each
loaded model lives in a worker process forked by the node's zygote (serving/zygote.py) and
confined there (serving/worker_main.py). The front talks to a worker over a unix socket pair
with the framing of serving/channel.py.

Invariants:
- a worker's calls are answered in order, so a worker that has answered nothing since a
  call was sent, for the whole prediction timeout, is stuck (not merely queued): `answered_at`;
- every call of a worker that ends (crash, kill, exit) fails with `WorkerDied` carrying the
  reason (the signal, the exit status, or why the front killed it), never hangs;
- `kill()` kills the worker's process group (what the model spawned too); `retire()`
  closes the channel once the calls in flight are answered, and kills after a grace period;
- `Zygote.close()` leaves no process behind: closing its control socket makes it kill every
  worker; it is killed itself if it does not exit in time;
- a spare worker (MODELCD_WORKER_SPARES) is an ordinary worker that holds no model yet: forked
  and confined the same way, in a private directory of its own; a load takes it whole (one
  worker, one model, as before), and every worker's directory is removed once it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modelcd.logs import get_logger

from .channel import FrameError, FrameReader, decode, encode
from .worker_main import _prctl
from .zygote import clean_env

log = get_logger("modelcd.serving.workers")

RETIRE_GRACE_S = 5.0
EXIT_STATUS_WAIT_S = 2.0


class WorkerDied(Exception):
    """The worker ended while calls were waiting on it; `reason` says how (signal, status, kill)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerError(Exception):
    """The model answered with an error: `kind` is invalid (the request's fault), predict or unavailable."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by signal {name}" + (" (out of memory, or killed from outside)" if sig == 9 else "")
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended (status {status})"


class Worker(asyncio.Protocol):
    """One worker process, seen from the front. Calls are pipelined; answers come in order."""

    def __init__(self, name: str, pid: int, zygote: Zygote, workdir: Path | None = None) -> None:
        self.name = name  # the model it holds; "(spare)" until a load takes it (Zygote.worker)
        self.pid = pid
        self.workdir = workdir  # its private directory, removed once it has ended
        self._zygote = zygote
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[tuple[Any, dict[str, Any]]]] = {}
        self._next = 0
        self.answered_at = 0.0  # monotonic time of its last answer
        self._killed: str | None = None  # why the front killed it, if it did
        self._retiring = False
        self._out: list[bytes | memoryview] = []  # frames written at the end of this loop iteration, in one call
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()  # -> the reason it ended
        self.on_death: Callable[[Worker, str], None] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            self.kill(f"sent an unreadable frame ({exc})")
            return
        pending = self._pending
        for header, payload in frames:
            try:
                op, ident, _key, meta, arrays, _rest = decode(header, payload)
            except FrameError as exc:
                self.kill(f"sent an unreadable frame ({exc})")
                return
            self.answered_at = time.monotonic()
            fut = pending.pop(ident, None)
            if fut is None or fut.done():
                continue
            if op == "ok":
                fut.set_result((meta, arrays))
            else:
                kind, reason = meta if isinstance(meta, list) and len(meta) == 2 else ("predict", str(meta))
                fut.set_exception(WorkerError(str(kind), str(reason)))
        if self._retiring and not pending:
            self._close_channel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._zygote.track(self._loop.create_task(self._ended(), name=f"worker-ended-{self.pid}"))

    async def _ended(self) -> None:
        # The channel ends first; the exit status follows from the zygote (bounded wait).
        status = await self._zygote.exit_status(self.pid, EXIT_STATUS_WAIT_S)
        if self._killed is not None:
            reason = f"was killed: {self._killed}"
        elif status is None:
            reason = "closed its channel"
        else:
            reason = describe_status(status)
        err = WorkerDied(f"worker {self.pid} of {self.name} {reason}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: the caller may have gone (timeout)
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(reason)
        self._report(reason)
        if self.workdir is not None:  # what the model wrote is its own: gone with its process
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)

    def _report(self, reason: str) -> None:
        """Tell the owner once (a worker being retired is no one's loss)."""
        callback, self.on_death = self.on_death, None
        if callback is not None and not self._retiring:
            callback(self, reason)

    # ------------------------------------------------------------------ calls

    @property
    def alive(self) -> bool:
        return self._transport is not None and self._killed is None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def call(self, op: str, key: str, meta: Any = None, arrays: Mapping[str, Any] | None = None,
             payload: bytes | None = None) -> asyncio.Future[tuple[Any, dict[str, Any]]]:
        """Send one call; the future gets (meta, arrays) or WorkerError / WorkerDied."""
        transport = self._transport
        fut: asyncio.Future[tuple[Any, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        if transport is None or self._killed is not None:
            how = f"was killed: {self._killed}" if self._killed is not None else "is not running"
            fut.set_exception(WorkerDied(f"worker {self.pid} of {self.name} {how}"))
            return fut
        self._next += 1
        ident = self._next
        self._pending[ident] = fut
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out += encode(op, ident, key, meta, arrays, payload)
        return fut

    def _flush(self) -> None:
        """One write for every call made in this loop iteration: one syscall, and the worker reads them as one
        batch (consecutive predictions of a model may run as one call there)."""
        out, self._out = self._out, []
        if out and self._transport is not None:
            self._transport.write(b"".join(out))

    # ------------------------------------------------------------------ ending

    def kill(self, why: str) -> None:
        """Kill the worker and what it spawned; its waiting calls fail with `why`."""
        if self._killed is None:
            self._killed = why
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self._close_channel()
        self._report(f"was killed: {why}")  # at once: its model is not ready from this moment

    def retire(self) -> None:
        """Stop the worker once its calls in flight are answered (it exits on end of channel)."""
        if self._retiring:
            return
        self._retiring = True
        if not self._pending:
            self._close_channel()
        asyncio.get_running_loop().call_later(RETIRE_GRACE_S, self._retire_deadline)

    def _retire_deadline(self) -> None:
        if not self.closed.done():
            self.kill(f"did not stop within {RETIRE_GRACE_S:g}s of being retired")

    def _close_channel(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Zygote:
    """The node's zygote process: started on first use (or `start`), restarted if it ever dies.

    It keeps up to `spares` idle workers forked and confined ahead of need (`worker` takes one and a
    background task forks its replacement), so a load does not wait for a fork. A spare is an ordinary
    worker: confined before it reads a frame, with its own private directory, holding no model yet.
    """

    def __init__(self, workdir: Path, *, threads: int = 1, limits: Mapping[str, Any] | None = None,
                 spares: int = 0) -> None:
        self.workdir = workdir
        self.threads = threads
        self.limits = dict(limits or {})  # every worker's spec but its directory (worker_main.confine)
        self.spares = max(0, spares)
        self._idle: list[Worker] = []
        self._filling: asyncio.Task[None] | None = None
        self._closing = False
        self.taken = 0  # loads that took a spare
        self._proc: asyncio.subprocess.Process | None = None
        self._ctl: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._replies: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, int] = {}
        self._exit_waiters: dict[int, asyncio.Future[int | None]] = {}
        self._ready: asyncio.Future[None] | None = None
        self._next = 0
        self.spawned = 0
        self._tasks: set[asyncio.Task[None]] = set()  # workers' endings being reported (bounded: a few seconds)

    def track(self, task: asyncio.Task[None]) -> None:
        """Hold a reference until the task is done (the loop keeps only weak ones); `close` waits for them."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ensure(self) -> socket.socket:
        async with self._lock:
            if self._ctl is not None and self._proc is not None and self._proc.returncode is None:
                return self._ctl
            await self._stop_process()
            # Non-dumpable: a worker (same user, no capabilities) cannot read this process's memory or
            # /proc/<pid>/environ, where the node's secrets are.
            _prctl(4, 0)  # PR_SET_DUMPABLE
            loop = asyncio.get_running_loop()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            config = {"fd": theirs.fileno(), "path": [p for p in sys.path if p], "parent": os.getpid()}
            self.workdir.mkdir(parents=True, exist_ok=True)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "modelcd.serving.zygote", json.dumps(config), pass_fds=[theirs.fileno()],
                    env=clean_env(self.threads), cwd=str(self.workdir), stdin=asyncio.subprocess.DEVNULL)
            finally:
                theirs.close()
            ours.setblocking(False)
            self._ctl = ours
            self._ready = loop.create_future()
            loop.add_reader(ours.fileno(), self._on_ctl)
            try:
                async with asyncio.timeout(120):  # interpreter + numpy + scikit-learn on a busy host
                    await self._ready
            except TimeoutError:
                await self._stop_process()
                raise RuntimeError("the model-worker zygote did not start within 120s") from None
            log.info("model-worker zygote started", pid=self._proc.pid)
            return ours

    def _on_ctl(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        while True:
            try:
                msg = ctl.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self._lost()
                return
            doc = json.loads(msg)
            op = doc.get("op")
            if op == "ready" and self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            elif op == "spawned":
                fut = self._replies.pop(doc["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(int(doc["pid"]))
            elif op == "exit":
                pid, status = int(doc["pid"]), int(doc["status"])
                waiter = self._exit_waiters.pop(pid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(status)
                else:
                    self._exits[pid] = status
                    if len(self._exits) > 1024:  # statuses nobody asked for: keep the newest
                        self._exits.pop(next(iter(self._exits)))

    def _lost(self) -> None:
        """The zygote is gone (its workers die with it: parent-death signal); the next spawn restarts it."""
        if self._ctl is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        self._no_more_statuses()
        err = RuntimeError("the model-worker zygote exited")
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(err)
        self._replies.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)

    async def start(self) -> None:
        """Start the zygote and its spares ahead of the first load (a node does it while it reads its state).
        A failure is logged, not raised: the first load starts the zygote again and reports why it cannot."""
        try:
            await self._ensure()
        except Exception as exc:
            log.warning("model-worker zygote did not start ahead of loads", reason=repr(exc))
            return
        self._replenish()

    async def worker(self, name: str, *, timeout: float = 30.0) -> Worker:
        """A worker for model `name`: a spare if one is idle (its replacement forks in the background), else
        a fresh fork."""
        while self._idle:
            spare = self._idle.pop(0)
            spare.on_death = None
            if spare.alive:
                spare.name = name
                self.taken += 1
                self._replenish()
                return spare
        worker = await self.spawn(name, timeout=timeout)
        self._replenish()
        return worker

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _replenish(self) -> None:
        if self.spares <= 0 or self._closing or (self._filling is not None and not self._filling.done()):
            return
        self._filling = asyncio.get_running_loop().create_task(self._fill(), name="spare-workers")
        self.track(self._filling)

    async def _fill(self) -> None:
        while len(self._idle) < self.spares and not self._closing:
            try:
                spare = await self.spawn("(spare)")
            except Exception as exc:  # the next load forks its own worker and reports why it cannot
                log.warning("could not fork a spare model worker", reason=repr(exc))
                return
            if self._closing:
                spare.kill("the node stopped")
                return
            spare.on_death = self._spare_died
            self._idle.append(spare)

    def _spare_died(self, worker: Worker, reason: str) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
            log.warning("spare model worker ended", pid=worker.pid, reason=reason)

    async def spawn(self, name: str, spec: Mapping[str, Any] | None = None, *, timeout: float = 30.0) -> Worker:
        """Fork a worker for `name` and connect to it: confined with `limits` updated by `spec`
        (worker_main.confine), in a private directory of its own unless `spec` names one."""
        ctl = await self._ensure()
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._next += 1
        ident = self._next
        spec = {**self.limits, **(spec or {})}
        if "workdir" not in spec:
            spec["workdir"] = str(self.workdir / f"w{ident}")
        workdir = Path(spec["workdir"])
        fut: asyncio.Future[int] = loop.create_future()
        self._replies[ident] = fut
        try:
            socket.send_fds(ctl, [json.dumps({"op": "spawn", "id": ident, "spec": spec}).encode()], [theirs.fileno()])
            async with asyncio.timeout(timeout):
                pid = await fut
        except BaseException:
            self._replies.pop(ident, None)
            ours.close()
            raise
        finally:
            theirs.close()
        self.spawned += 1
        ours.setblocking(False)
        _transport, worker = await loop.create_unix_connection(lambda: Worker(name, pid, self, workdir), sock=ours)
        return worker

    async def exit_status(self, pid: int, timeout: float) -> int | None:
        status = self._exits.pop(pid, None)
        if status is not None:
            return status
        if self._ctl is None:
            return None
        waiter = self._exit_waiters.setdefault(pid, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return None
        finally:
            self._exit_waiters.pop(pid, None)

    def _no_more_statuses(self) -> None:
        for waiter in self._exit_waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    async def _stop_process(self) -> None:
        self._no_more_statuses()
        proc, self._proc = self._proc, None
        if self._ctl is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._ctl.close()  # end of control socket: the zygote kills its workers and exits
            self._ctl = None
        if proc is None:
            return
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        self._closing = True
        if self._filling is not None:
            self._filling.cancel()
        idle, self._idle = self._idle, []
        for spare in idle:
            spare.kill("the node stopped")
        async with self._lock:
            await self._stop_process()
        if self._tasks:  # endings still waiting for an exit status: the zygote is gone, they end at once
            await asyncio.wait(list(self._tasks), timeout=EXIT_STATUS_WAIT_S + 1)
