"""The sandbox zygote: one long-lived process per ingest that imports the model libraries once and forks one
sandbox child per deployment.

Both sides live here: `serve()` runs in the zygote (`python -m modelcd.ingest.sandbox --zygote`, started by
`SandboxZygote` with the sandbox's stripped environment, its own session and the parent-death signal), and
`SandboxZygote` is ingest's handle on it. What a child does once forked (its limits, the phase protocol) is
the sandbox's business (`sandbox._child`); this module only forks, passes file descriptors and reports exits.

Invariants:
- the zygote runs no model code and stays single-threaded (the BLAS/OpenMP pools are sized 1 in its
  environment, before numpy loads; it reports its thread count in `ready`), so `fork` is safe;
- it runs at the sandbox's niceness, which its children inherit: a serving node on the same cores wins;
- it dies with ingest (parent-death signal), and when ingest closes the control socket it SIGKILLs every
  child's process group, reaps them and exits: no sandbox process outlives `SandboxZygote.close()`;
- each child is forked for one job and exits after it (it never returns into the zygote's loop): it gets
  its own session (so a kill of its group takes what the model spawned), the parent-death signal (it
  dies with the zygote), the three pipes ingest handed over as its stdin, stdout and stderr, and the
  job's private working directory;
- the zygote reaps every child and reports its raw wait status, which is how ingest tells a native crash
  (a signal) from an exit; if the zygote goes away, every exit status still awaited resolves to unknown
  (`None`) at once, so nothing waits on a zygote that is gone.

Control socket (AF_UNIX SOCK_SEQPACKET), one JSON object per message:
ingest → zygote `{"op": "spawn", "id", "cwd"}` with the child's stdin, stdout and stderr attached (SCM_RIGHTS);
zygote → ingest `{"op": "ready", "pid", "threads"}`, `{"op": "spawned", "id", "pid"}` (pid 0: the fork
failed), `{"op": "exit", "pid", "status"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from modelcd.logs import get_logger
from modelcd.runner import die_with_parent, kill_and_reap, reap_exited, zygote_send

log = get_logger("modelcd.ingest.zygote")

#: Sized 1 in the zygote's environment, before numpy loads: a forked child must not inherit a thread pool.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
EXIT_STATUS_WAIT_S = 5.0  # a child whose pipes closed is reported by the zygote within this, or never
STOP_WAIT_S = 5.0  # the zygote exits this long after its control socket closed, or is killed


class ZygoteError(Exception):
    """The zygote could not start, or went away: the caller falls back to (or restarts) it."""


class ZygoteTimeout(ZygoteError):
    """The zygote did not say ready within the start-up deadline (it was stopped)."""


def thread_count() -> int:
    """Threads of this process (Linux; 1 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


# --- in the zygote -------------------------------------------------------------------------------------



def serve(ctl: socket.socket, parent: int, preload: Sequence[str], job: Callable[[], int]) -> int:
    """The zygote's loop: import `preload`, say ready, then fork a child running `job()` per spawn request.

    Returns when ingest closes the control socket, after killing and reaping every child still running.
    """
    die_with_parent(parent=parent or None)  # also set by the launcher's preexec_fn; checks we were not orphaned
    for module in preload:
        with contextlib.suppress(ImportError):  # a missing library is reported by the job that needs it
            __import__(module)
    rpipe, wpipe = os.pipe()
    os.set_blocking(wpipe, False)
    signal.set_wakeup_fd(wpipe)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches ingest, which stops us in order
    children: set[int] = set()
    zygote_send(ctl, {"op": "ready", "pid": os.getpid(), "threads": thread_count()})
    try:
        while True:
            readable, _, _ = select.select([ctl, rpipe], [], [])
            if rpipe in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(rpipe, 4096)
                reap_exited(ctl, children)
            if ctl not in readable:
                continue
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, 3)
            except OSError:
                return 0
            if not msg:
                return 0  # ingest closed the control socket (or died): kill every child (finally)
            try:
                doc = json.loads(msg)
                ident, cwd = doc["id"], str(doc["cwd"])
            except (ValueError, KeyError, TypeError):
                doc, ident, cwd = {}, None, ""
            if doc.get("op") != "spawn" or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                if ident is not None:
                    zygote_send(ctl, {"op": "spawned", "id": ident, "pid": 0})
                continue
            try:
                pid = os.fork()
            except OSError:
                pid = -1
            if pid == 0:
                _child(ctl, (rpipe, wpipe), fds, cwd, job)  # never returns
            for fd in fds:
                os.close(fd)  # the child's copies only: ingest sees EOF when the child exits
            if pid > 0:
                children.add(pid)
            zygote_send(ctl, {"op": "spawned", "id": ident, "pid": max(pid, 0)})
    finally:
        kill_and_reap(children)


def _child(ctl: socket.socket, wakeup: tuple[int, int], fds: list[int], cwd: str, job: Callable[[], int]) -> None:
    """In the forked child: become a sandbox child of the current shape, run the job, exit (never return)."""
    code = 1
    try:
        zygote = os.getppid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        for fd in wakeup:
            os.close(fd)
        ctl.close()
        os.setsid()  # its own session and process group: ingest's killpg takes what the model spawned too
        die_with_parent(parent=zygote)  # dies with the zygote, which dies with ingest
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # stdin, stdout, stderr: the phase protocol of a started child, unchanged
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(cwd)
        code = job()
    except BaseException as exc:  # noqa: BLE001 - a failed set-up or a job's bug: say why on stderr, exit
        with contextlib.suppress(Exception):
            sys.stderr.write(f"sandbox child {os.getpid()}: {exc!r}\n")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# --- in ingest -----------------------------------------------------------------------------------------


class SandboxZygote:
    """Ingest's handle on one zygote process: `start()`, `spawn()` children, their `exit_status()`, `close()`.

    Not restarted here: once `alive` is False the owner makes a new one (`Sandbox` does, on the next job).
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], preexec: Callable[[], None]) -> None:
        self.argv = list(argv)  # the command, to which `--ctl-fd N` is appended
        self.env = env
        self.preexec = preexec  # run between fork and exec: at least the parent-death signal
        self.pid = 0
        self.threads = 0  # the zygote's thread count when it said ready (1: fork is safe)
        self._proc: asyncio.subprocess.Process | None = None
        self._ctl: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._replies: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}  # pid -> its wait status (None: unknown)
        self._next = 0
        self._lost = False
        self.spawned = 0

    @property
    def alive(self) -> bool:
        return not self._lost and self._proc is not None and self._proc.returncode is None

    async def start(self, deadline_s: float) -> None:
        """Start the zygote and wait until it imported its libraries; `ZygoteError` if it died or timed out
        (it is stopped then)."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, "--ctl-fd", str(theirs.fileno()), pass_fds=[theirs.fileno()], env=self.env, cwd="/",
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=self.preexec)
        except OSError as exc:
            ours.close()
            self._lost = True
            raise ZygoteError(f"the sandbox zygote did not start: {exc}") from None
        finally:
            theirs.close()
        self.pid = self._proc.pid
        ours.setblocking(False)
        self._ctl = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_ctl)
        try:
            async with asyncio.timeout(deadline_s):
                await self._ready
        except TimeoutError:
            await self.close()
            raise ZygoteTimeout(f"the sandbox zygote did not start within {deadline_s:g} s") from None
        except BaseException:  # it died before ready, or the start was cancelled: leave nothing running
            await self.close()
            raise
        if self.threads != 1:  # something it imported started a thread: forking it is not safe
            await self.close()
            raise ZygoteError(f"the sandbox zygote has {self.threads} threads after its imports, not 1")
        log.info("sandbox zygote started", pid=self.pid)

    async def spawn(self, stdin: int, stdout: int, stderr: int, cwd: str, *, timeout: float = 30.0) -> int:
        """Fork a child with these three fds as its 0, 1, 2 and `cwd` as its working directory; its pid.

        The fds are the caller's to close. `ZygoteError` if the zygote is gone or does not answer in time.
        """
        ctl = self._ctl
        if ctl is None or not self.alive:
            raise ZygoteError("the sandbox zygote is not running")
        self._next += 1
        ident = self._next
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._replies[ident] = fut
        try:
            # A few hundred bytes on a socket only we write to: it does not block.
            socket.send_fds(ctl, [json.dumps({"op": "spawn", "id": ident, "cwd": cwd}).encode()],
                            [stdin, stdout, stderr])
            async with asyncio.timeout(timeout):
                pid = await fut
        except TimeoutError:
            raise ZygoteError(f"the sandbox zygote did not fork within {timeout:g} s") from None
        except OSError as exc:
            raise ZygoteError(f"the sandbox zygote is gone: {exc}") from None
        finally:
            self._replies.pop(ident, None)
        if pid <= 0:
            raise ZygoteError("the sandbox zygote could not fork")
        self.spawned += 1
        self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return pid

    async def exit_status(self, pid: int, timeout: float = EXIT_STATUS_WAIT_S) -> int | None:
        """The child's raw wait status as the zygote reported it; None if unknown (zygote gone, or timeout)."""
        fut = self._exits.get(pid)
        if fut is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            return None

    def exited(self, pid: int) -> bool:
        """The zygote reported the child's end (or is gone): its pid is no longer the child's to signal."""
        fut = self._exits.get(pid)
        return fut is None or fut.done()

    def forget(self, pid: int) -> None:
        """The child's status is no longer wanted (its job closed)."""
        self._exits.pop(pid, None)

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
                self._gone("the sandbox zygote exited")
                return
            try:
                doc = json.loads(msg)
            except ValueError:
                continue
            op = doc.get("op")
            if op == "ready" and self._ready is not None and not self._ready.done():
                self.threads = int(doc.get("threads", 0))
                self._ready.set_result(None)
            elif op == "spawned":
                fut = self._replies.get(doc.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(int(doc["pid"]))
            elif op == "exit":
                pid = int(doc["pid"])
                fut = self._exits.get(pid)
                if fut is not None and not fut.done():
                    fut.set_result(int(doc["status"]))

    def _gone(self, why: str) -> None:
        """The control socket ended: the zygote is gone, and its children with it (their parent-death signal)."""
        self._lost = True
        if self._ctl is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        err = ZygoteError(why)
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(err)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
        for status in self._exits.values():
            if not status.done():
                status.set_result(None)

    async def close(self) -> None:
        """Close the control socket (the zygote kills its children and exits), wait for it, kill it past
        `STOP_WAIT_S`. Idempotent."""
        self._gone("the sandbox zygote was stopped")
        proc = self._proc
        if proc is None:
            return
        try:
            async with asyncio.timeout(STOP_WAIT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
