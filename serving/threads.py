"""Threads for model code that may never return.

`concurrent.futures.ThreadPoolExecutor` joins its workers at interpreter exit, so one
model hung in `predict` would keep a node from ever exiting after SIGTERM. These
threads are daemons: a node stops on time and leaves a hung call behind, which is the
only thing one can do with a thread that will not return.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


def _run(fut: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # handed to the waiter, never lost
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class DaemonPool:
    """A fixed pool of daemon threads with `submit` like an executor (usable with `loop.run_in_executor`)."""

    def __init__(self, workers: int, name: str = "predict") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()
        self.size = len(self._threads)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            _run(*item)

    def submit(self, fn: Callable[..., T], /, *args: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fut, fn, args))
        return fut

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        """Stop the workers once they are idle; queued calls are cancelled. Never waits for a hung call."""
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(_STOP)


def run_in_daemon_thread(fn: Callable[..., T], /, *args: Any) -> concurrent.futures.Future[T]:
    """One fresh daemon thread for one call (model loads: rare, and one that hangs must not hold a worker)."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    threading.Thread(target=_run, args=(fut, fn, args), name="model-load", daemon=True).start()
    return fut
