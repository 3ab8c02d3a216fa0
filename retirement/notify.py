"""Telling owners: a pluggable `Notifier`; a log line by default, a webhook when one is configured.

Notifications are best effort and never hold up the processor: `NotifyQueue` buffers
them (bounded, drops counted) and one task delivers them, each with a deadline.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx
import msgspec

from modelcd.events.schemas import RetirementDecision, RetirementWarning
from modelcd.logs import get_logger
from modelcd.runner import wait_for

log = get_logger("modelcd.retirement.notify")

Notice = RetirementWarning | RetirementDecision


@runtime_checkable
class Notifier(Protocol):
    async def notify(self, notice: Notice) -> None:
        """Deliver one notice; may raise (the queue logs it and carries on)."""


class LogNotifier:
    """The default: one structured log line per notice."""

    async def notify(self, notice: Notice) -> None:
        match notice:
            case RetirementWarning():
                log.warning("model will be retired unless used", model=notice.model, version=notice.version,
                            owner=notice.owner, last_used=notice.last_used, retire_at=notice.retire_at)
            case RetirementDecision():
                log.info("retirement decision", model=notice.model, version=notice.version, owner=notice.owner,
                         action=notice.action, reason=notice.reason)


class WebhookNotifier:
    """POSTs each notice as its event JSON (the same body as on the bus) to `url`.

    `transport` is the test seam (httpx.MockTransport).
    """

    def __init__(self, url: str, *, timeout: float = 5.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def notify(self, notice: Notice) -> None:
        resp = await self._client.post(self.url, content=msgspec.json.encode(notice),
                                       headers={"content-type": "application/json",
                                                "ce-type": notice.ce_type()})
        resp.raise_for_status()

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass
class NotifyStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0


class NotifyQueue:
    """A bounded buffer in front of a Notifier; `run()` delivers until `close()` (draining what is queued)."""

    def __init__(self, notifier: Notifier, *, maxsize: int = 1000, timeout: float = 10.0) -> None:
        self.notifier = notifier
        self.stats = NotifyStats()
        self._queue: asyncio.Queue[Notice | None] = asyncio.Queue(maxsize)
        self._timeout = timeout

    def put(self, notice: Notice) -> None:
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning("notification dropped: queue full", model=notice.model, version=notice.version)

    async def close(self) -> None:
        """Ask `run()` to finish after what is already queued."""
        await self._queue.put(None)

    async def run(self) -> None:
        while (notice := await self._queue.get()) is not None:
            try:
                await wait_for(self.notifier.notify(notice), self._timeout)
                self.stats.sent += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken webhook must not stop retirement
                self.stats.failed += 1
                log.warning("notification failed", model=notice.model, version=notice.version, error=repr(exc))


def notifier_from_settings(webhook_url: str | None) -> Notifier:
    return WebhookNotifier(webhook_url) if webhook_url else LogNotifier()
