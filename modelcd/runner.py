"""Running services until a signal: the one place that turns SIGINT/SIGTERM into a stop event.

Every long-lived service has the shape
`async def run(settings, *, stop: asyncio.Event, ready: asyncio.Event) -> None`:
it sets `ready` once it serves, returns after draining once `stop` is set, and
raises if it fails. A second signal cancels whatever is still draining.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from modelcd.logs import get_logger

log = get_logger("modelcd.runner")

Service = Callable[[asyncio.Event], Awaitable[None]]


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


def run_main(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop)` on a fresh loop (uvloop when available) until it returns."""

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

        result = uvloop.run(wrapper())
    except ImportError:  # pragma: no cover
        result = asyncio.run(wrapper())
    return int(result or 0)
