"""The console's one bus consumer per API process: topics in, `ConsoleState` folded, sections marked dirty.

`Feed.run()` reads the topics in `TOPICS` from the beginning (no consumer group: every API
process shows everything) and keeps reading; each decoded event goes through
`ConsoleState.apply`, and the sections it changed are handed to `on_change`. The console
never polls the store: what it shows is what the bus said.

Failure model: an undecodable record is counted and skipped; when the broker cannot be
reached the feed says so in `status` (the page's status line shows it) and retries with
backoff, resuming from the offsets it had reached, so no event is folded twice. The feed
never raises out of `run()` (the API must not go down because its console lost the bus).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from modelcd.events.bus import KafkaConfig, partitions_of, stop_consumer
from modelcd.events.codec import DecodeError, decode
from modelcd.events.topics import DEPLOYMENTS, HEALTH, MODEL_STATE, RETIREMENT, SHADOW_COMPARISONS, TRAFFIC, USAGE
from modelcd.logs import get_logger

from .state import ConsoleState

log = get_logger("modelcd.console.feed")

# State, progress, rollouts (on the traffic topic), usage, health, shadow comparisons, retirement.
TOPICS = (DEPLOYMENTS, MODEL_STATE, TRAFFIC, USAGE, HEALTH, SHADOW_COMPARISONS, RETIREMENT)
BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class Feed:
    def __init__(self, cfg: KafkaConfig, state: ConsoleState, on_change: Callable[[frozenset[str]], None], *,
                 topic_prefix: str = "") -> None:
        self.cfg = cfg
        self.state = state
        self.on_change = on_change
        self.prefix = topic_prefix
        self.status = "connecting to the bus"
        self.caught_up = asyncio.Event()
        self._positions: dict[TopicPartition, int] = {}

    async def run(self) -> None:
        """Consume until cancelled; reconnect on broker errors."""
        failures = 0
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError) as exc:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                self.status = f"bus unreachable: {exc}; retrying in {delay:g} s"
                self.on_change(frozenset())
                log.warning("console feed lost the bus", error=repr(exc), retry_s=delay)
                await asyncio.sleep(delay)
            except Exception:
                log.exception("console feed failed; restarting it")
                self.status = "feed error (see the ingest log); restarting"
                self.on_change(frozenset())
                await asyncio.sleep(BACKOFF_S[-1])
            else:  # pragma: no cover - _consume only returns by raising
                return

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.cfg.bootstrap, client_id=f"{self.cfg.client_id}-console",
                                    group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
        try:
            await consumer.start()
            tps = await partitions_of(consumer, [self.prefix + t for t in TOPICS])
            consumer.assign(tps)
            for tp in tps:
                if tp in self._positions:
                    consumer.seek(tp, self._positions[tp])
                else:
                    await consumer.seek_to_beginning(tp)
            ends = await consumer.end_offsets(tps) if tps else {}
            behind = {tp for tp in tps if ends[tp] > self._positions.get(tp, 0)}
            self.status = "catching up" if behind else "live"
            if not behind:
                self.caught_up.set()
            self.on_change(frozenset())
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                changed: set[str] = set()
                for tp, records in batches.items():
                    topic = tp.topic[len(self.prefix):]
                    for record in records:
                        changed |= self._fold(topic, record)
                        self._positions[tp] = record.offset + 1
                if behind:
                    for tp in list(behind):
                        if await consumer.position(tp) >= ends[tp]:
                            behind.discard(tp)
                    if not behind:
                        self.status = "live"
                        self.caught_up.set()
                if changed or batches:
                    self.on_change(frozenset(changed))
        finally:
            await stop_consumer(consumer)

    def _fold(self, topic: str, record: object) -> frozenset[str]:
        try:
            event, _env = decode(topic, record.value, record.headers)  # type: ignore[attr-defined]
        except DecodeError as exc:
            self.state.counters.undecodable += 1
            log.warning("console skipped an undecodable record", topic=topic,
                        offset=getattr(record, "offset", None), reason=str(exc))
            return frozenset()
        return self.state.apply(event)
