"""Telemetry off the request path: a bounded buffer in front of the bus, usage aggregation, log sampling.

Invariants:
- the request path only ever calls `offer()` (a `put_nowait`) and bumps counters: a slow
  or absent broker never blocks or fails a prediction;
- the buffer holds at most `settings.telemetry_buffer` events; when it is full the new
  event is dropped and counted (`dropped`), so memory stays bounded during an outage;
- usage is counted per model version in `UsageCounter`s and turned into one
  UsageReport per model version per interval (`take_usage`), never one per prediction;
- `drain()` publishes what is buffered within a deadline, then flushes and closes the
  producer; what could not be sent by then is counted as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelcd.events.schemas import Event, UsageReport
from modelcd.logs import get_logger

log = get_logger("modelcd.serving.telemetry")


class EventSink(Protocol):
    """What the telemetry publishes through (the bus' Publisher; a fake in handler tests)."""

    async def publish_nowait(self, event: Event) -> asyncio.Future[Any]: ...

    async def stop(self) -> None: ...


class UsageCounter:
    """One model version's usage since the last report; the request path bumps it in place."""

    __slots__ = ("model", "version", "count", "errors", "client_errors", "last_used")

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.count = 0
        self.errors = 0
        self.client_errors = 0  # of `errors`, the 4xx ones (the caller's mistake, not the model's)
        self.last_used = 0.0


@dataclass
class TelemetryStats:
    offered: int = 0
    published: int = 0
    dropped: int = 0  # buffer full, or still buffered at the drain deadline
    failed: int = 0  # the broker refused or timed out after the event left the buffer


@dataclass
class Telemetry:
    node: str
    sink: EventSink
    buffer: int = 10_000
    stats: TelemetryStats = field(default_factory=TelemetryStats)

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max(1, self.buffer))
        self._usage: dict[tuple[str, str], UsageCounter] = {}
        self._interval_start = time.time()
        self._pending: set[asyncio.Future[Any]] = set()

    # -- request path (no await)

    def offer(self, event: Event) -> bool:
        """Buffer `event` for publishing; False (and counted) when the buffer is full."""
        self.stats.offered += 1
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            return False
        return True

    def usage(self, model: str, version: str) -> UsageCounter:
        """The counter a model version's requests bump (kept across unload/reload of the model)."""
        key = (model, version)
        counter = self._usage.get(key)
        if counter is None:
            counter = self._usage[key] = UsageCounter(model, version)
        return counter

    def last_used(self) -> dict[str, float]:
        """{"name:version": last request time (epoch s)} of every model version requested since start."""
        return {f"{c.model}:{c.version}": c.last_used for c in self._usage.values() if c.last_used > 0}

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    # -- periodic

    def take_usage(self, now: float) -> list[UsageReport]:
        """One UsageReport per model version used since the last call; counters restart from zero."""
        start, self._interval_start = self._interval_start, now
        reports = []
        for c in self._usage.values():
            if c.count == 0 and c.errors == 0:
                continue
            reports.append(UsageReport(model=c.model, version=c.version, node=self.node, interval_start=start,
                                       interval_end=now, count=c.count, errors=c.errors,
                                       client_errors=c.client_errors, last_used=c.last_used))
            c.count = 0
            c.errors = 0
            c.client_errors = 0
        return reports

    def flush_usage(self) -> int:
        reports = self.take_usage(time.time())
        for r in reports:
            self.offer(r)
        return len(reports)

    # -- the publishing task

    async def run(self) -> None:
        """Move buffered events to the producer until cancelled; never raises for a broker problem."""
        while True:
            event = await self._queue.get()
            await self._send(event)

    async def _send(self, event: Event) -> None:
        try:
            fut = await self.sink.publish_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker down, metadata timeout: the event is lost, the node is not
            self.stats.failed += 1
            log.warning("telemetry event not sent", event_type=event.ce_type(), reason=repr(exc))
            await asyncio.sleep(0.05)  # do not spin on a dead broker
            return
        self._pending.add(fut)
        fut.add_done_callback(self._on_ack)

    def _on_ack(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.stats.failed += 1
        else:
            self.stats.published += 1

    async def drain(self, deadline: float) -> None:
        """Publish what is buffered, flush and close the producer, all within `deadline` seconds."""
        end = time.monotonic() + deadline
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                while not self._queue.empty():
                    await self._send(self._queue.get_nowait())
        left = self._queue.qsize()
        if left:
            self.stats.dropped += left
            log.warning("telemetry dropped at stop", events=left)
        try:
            async with asyncio.timeout(max(0.1, end - time.monotonic())):
                await self.sink.stop()
        except TimeoutError:
            log.warning("telemetry producer did not flush before the deadline", pending=len(self._pending))
