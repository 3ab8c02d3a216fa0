"""A test's view of the bus: every decodable event of some topics, from the beginning, as they arrive.

One consumer reads all the topics, so only the order within a topic's partition is the order of
publishing; `stamps` keeps each event's record timestamp to compare across topics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Self

from aiokafka import AIOKafkaConsumer

from modelcd.events.codec import DecodeError, decode
from modelcd.events.schemas import Event


class BusWatcher:
    def __init__(self, bootstrap: str, *topics: str) -> None:
        self.events: list[Event] = []
        self.stamps: dict[int, int] = {}  # id(event) -> record timestamp (ms, set by the producer)
        self._consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                          auto_offset_reset="earliest", metadata_max_age_ms=1000)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _run(self) -> None:
        async for r in self._consumer:
            try:
                event, _ = decode(r.topic, r.value, r.headers)
            except DecodeError:
                continue
            self.events.append(event)
            self.stamps[id(event)] = r.timestamp
            self._changed.set()

    async def wait_for(self, pred: Callable[[list[Event]], bool], timeout: float = 60.0) -> None:
        async def loop() -> None:
            while not pred(self.events):
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def about(self, model: str, *kinds: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kinds) and getattr(e, "model", None) == model]

    def of(self, model: str, kind: type[Event], action: str | None = None) -> list[Event]:
        return [e for e in self.about(model, kind) if action is None or getattr(e, "action", None) == action]
