"""Running services until a signal: the one place that turns SIGINT/SIGTERM into a stop event.

Every long-lived service has the shape
`async def run(settings, *, stop: asyncio.Event, ready: asyncio.Event) -> None`:
it sets `ready` once it serves, returns after draining once `stop` is set, and
raises if it fails. A second signal cancels whatever is still draining.

Also the process-tree helpers every part that starts a child uses (`modelcd up`'s supervisor,
ingest's sandbox, serving's model workers): `die_with_parent()` / `preexec_die_with_parent()`
ask the kernel to SIGKILL a child when its parent dies, however the parent dies (SIGKILL,
segfault), so no child outlives the process that started it; `proc_start_time()` tells a live
process from a recycled pid; the two zygotes (serving's model workers, ingest's sandboxes) share
`zygote_send`, `reap_exited` and `kill_and_reap`. `wait_for` replaces asyncio's (see there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from modelcd.logs import get_logger

T = TypeVar("T")

log = get_logger("modelcd.runner")

Service = Callable[[asyncio.Event], Awaitable[None]]


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for` without Python 3.11's flaw: it returns `aw`'s result when a cancellation arrives just
    as `aw` completes, losing the cancellation, so a loop around it never ends (ingest's drain hung on the
    console's render loop that way). `asyncio.timeout` never loses one. Raises TimeoutError past `timeout`."""
    async with asyncio.timeout(timeout):
        return await aw


def install_stop_signals(stop: asyncio.Event, main_task: asyncio.Task[object] | None = None) -> None:
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signame: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("stopping: draining (send the signal again to force)", signal=signame)
            stop.set()
        elif main_task is not None:
            log.warning("forced stop", signal=signame)
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass


EXECUTOR_EXIT_S = 5.0  # how long a finished command waits for its worker threads before exiting without them


def run_main(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop)` on a fresh loop (uvloop when available) until it returns.

    Like `asyncio.run`, except that worker threads (`to_thread`, `run_in_executor`) get
    `EXECUTOR_EXIT_S` to finish once `main` has returned: a thread stuck in native code
    cannot be cancelled, and waiting for it (as `asyncio.run` and the interpreter's exit do)
    is how a stuck model used to make SIGINT useless. Past the deadline the process says so
    and exits with `os._exit`, without waiting for the thread.
    """

    async def wrapper() -> int | None:
        stop = asyncio.Event()
        task = asyncio.current_task()
        install_stop_signals(stop, task)
        try:
            return await main(stop)
        except asyncio.CancelledError:
            return 130

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="modelcd-worker")
    loop.set_default_executor(executor)
    try:
        asyncio.set_event_loop(loop)
        result = loop.run_until_complete(wrapper())
        _cancel_leftovers(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        executor.shutdown(wait=False, cancel_futures=True)
        loop.close()
    code = int(result or 0)
    deadline = time.monotonic() + EXECUTOR_EXIT_S
    stuck = []
    for t in threading.enumerate():  # the interpreter would join these at exit, without a deadline
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                stuck.append(t.name)
    if stuck:
        log.error("a worker thread is still running (stuck in model code?): exiting without waiting for it",
                  threads=stuck, waited_s=EXECUTOR_EXIT_S)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks `main` left behind and let them finish (as asyncio.run does)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


# --- process tree ------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl: Any = None


def _load_prctl() -> Any:
    global _prctl
    if _prctl is None:
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            _prctl = False
    return _prctl


def die_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (Linux; False elsewhere).

    The signal is tied to the parent *thread* that forked us, and survives `exec`, so a child
    started from an event loop's thread by `Popen(preexec_fn=preexec_die_with_parent())` gets it
    even as a native binary. `parent`: the pid we expect as parent; if it already died between
    fork and this call (we were reparented), exit now instead of living on as an orphan.
    """
    prctl = _load_prctl()
    if not prctl:  # pragma: no cover
        return False
    prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    return True


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphans among our descendants are reparented to us, not to init (Linux 3.4+; False elsewhere).

    A supervisor that is a subreaper sees what a dead child left behind (a sandbox in its own
    session, a double-forked helper) as its own children, so it can kill and reap them.
    """
    prctl = _load_prctl()
    if not prctl:  # pragma: no cover
        return False
    return bool(prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def preexec_die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child dies with the process that starts it.

    Call it in the parent (it captures the parent's pid and loads prctl before the fork, so the
    child runs no import and takes no lock between fork and exec).
    """
    parent = os.getpid()
    _load_prctl()

    def preexec() -> None:
        die_with_parent(sig, parent=parent)

    return preexec


def zygote_send(ctl: socket.socket, doc: dict[str, Any]) -> None:
    """A zygote's message to the process it serves (one JSON object per SOCK_SEQPACKET message); gone: dropped."""
    with contextlib.suppress(OSError):
        ctl.send(json.dumps(doc).encode())


def reap_exited(ctl: socket.socket, children: set[int]) -> None:
    """In a zygote: reap every child that ended, kill what it spawned (its process group) and report its raw
    wait status (`{"op": "exit", "pid", "status"}`), which is how the front tells a signal from an exit."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        zygote_send(ctl, {"op": "exit", "pid": pid, "status": status})


def kill_and_reap(pids: Iterable[int]) -> None:
    """SIGKILL each child's process group (what it spawned) and the child, then reap them all.

    A zygote's last act (serving's model workers, ingest's sandboxes): nothing it forked outlives it.
    """
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), None if gone.

    A pid plus its start time names one process for good: a pid recorded in a file may have been
    reused by an unrelated process since, the pair cannot.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] == b"Z":  # a zombie is dead, only not yet reaped
        return None
    return int(fields[19])
