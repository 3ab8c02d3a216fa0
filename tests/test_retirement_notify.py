"""Notifiers: the webhook posts the event JSON; a failing notifier never stops the queue."""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from modelcd.events.schemas import RetirementDecision, RetirementWarning
from modelcd.retirement.notify import NotifyQueue, WebhookNotifier

WARNING = RetirementWarning(model="iris", version="1", owner="ann", last_used=1.0, retire_at=2.0)


async def test_webhook_posts_event_json_and_failures_are_counted() -> None:
    """The webhook receives the warning as JSON; a 500 is counted as failed and the next notice still goes."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500 if len(seen) == 1 else 204)

    notifier = WebhookNotifier("http://hooks.example/retire", transport=httpx.MockTransport(handler))
    queue = NotifyQueue(notifier)
    runner = asyncio.create_task(queue.run())
    queue.put(RetirementDecision(model="iris", version="1", action="skip", reason="pinned by its owner"))
    queue.put(WARNING)
    await queue.close()
    await asyncio.wait_for(runner, 10)
    await notifier.aclose()
    assert (queue.stats.failed, queue.stats.sent) == (1, 1)
    body = msgspec.json.decode(seen[1].content)
    assert body["type"] == "modelcd.retirement.warning.v1" and body["owner"] == "ann"
    assert seen[1].headers["ce-type"] == "modelcd.retirement.warning.v1"


def test_full_queue_drops_and_counts() -> None:
    """Past its bound the queue drops notices and counts them instead of blocking the processor."""

    class Never:
        async def notify(self, notice: object) -> None:  # pragma: no cover - never run
            raise AssertionError

    queue = NotifyQueue(Never(), maxsize=2)  # type: ignore[arg-type]
    for _ in range(5):
        queue.put(WARNING)
    assert queue.stats.dropped == 3
