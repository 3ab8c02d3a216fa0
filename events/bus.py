"""The bus: typed publish, a consumer loop that never dies on a poison record, state-topic readers.

Client settings are explicit, never aiokafka's defaults: producers use acks=all
(idempotence when the broker supports it); consumers never auto-commit, commit
after the handler succeeded, and a new group starts from the earliest offset.

Failure model:
- an undecodable record is logged, counted and skipped (its offset committed);
- a handler exception is logged and counted; the record is retried up to
  `max_attempts` times, then skipped, so one bad event never blocks a partition;
- `stop()` is idempotent and flushes the producer before closing;
- a consumer stops within `CONSUMER_STOP_S` (`stop_consumer`): aiokafka's own stop waits for
  whatever the broker still holds (a group consumer's pending JoinGroup, up to the rebalance
  timeout of minutes), and a service's drain must not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from modelcd.logs import get_logger

from .codec import DecodeError, Envelope, decode, encode
from .schemas import Event
from .topics import TOPICS

log = get_logger("modelcd.bus")

CONSUMER_STOP_S = 10.0
# How long the broker may hold an empty fetch, for the consumers on a deployment's path (the deploy
# requests, the model-state followers of nodes and the tracker behind the API's status). aiokafka's
# default (500 ms) let a record wait up to ~150 ms per hop on the embedded broker, and a deployment
# crosses three; 100 ms cuts that to a few ms for ~0.7 % of a core per idle consumer (broker and client,
# measured). Followers off that path (health, console, usage) keep the default.
PROMPT_FETCH_WAIT_MS = 100


async def stop_consumer(consumer: AIOKafkaConsumer, timeout: float = CONSUMER_STOP_S) -> None:
    """`consumer.stop()` within `timeout` seconds; past it, its connections are closed and it is abandoned.

    A consumer holds nothing that must be flushed (offsets are committed after each record), so
    giving up on a slow leave-group costs at most one rebalance on the broker's side.
    """
    try:
        async with asyncio.timeout(timeout):
            await consumer.stop()
    except TimeoutError:
        log.warning("a Kafka consumer did not stop in time; closing its connections",
                    client_id=consumer._client._client_id, timeout_s=timeout)  # noqa: SLF001 - for the log only
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await consumer._client.close()  # noqa: SLF001 - aiokafka has no public forced close


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str
    idempotence: bool = False
    # Set when MODELCD_KAFKA_IDEMPOTENCE=true was asked for: then a broker that refuses the
    # idempotent producer is an error instead of a warning and a fallback to acks=all alone.
    idempotence_required: bool = False
    client_id: str = "modelcd"
    partitions: int = 3
    replication: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> KafkaConfig:
        return cls(
            bootstrap=settings.bootstrap,
            idempotence=settings.idempotence,
            idempotence_required=settings.kafka_idempotence is True,
            client_id=settings.kafka_client_id,
            partitions=settings.topic_partitions,
            replication=settings.topic_replication,
        )


async def ensure_topics(cfg: KafkaConfig, names: Iterable[str] | None = None) -> list[str]:
    """Create the modelcd topics that do not exist yet; returns the ones created."""
    wanted = list(names or TOPICS)
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap, client_id=f"{cfg.client_id}-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(n, cfg.partitions, cfg.replication,
                     topic_configs=TOPICS[n].configs() if n in TOPICS else {})
            for n in wanted if n not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in new]
    finally:
        await admin.close()


class Publisher:
    """Publishes events to the topic their type names, keyed by `event.key()`.

    An async context manager; `stop()` is idempotent and flushes first.
    """

    def __init__(self, cfg: KafkaConfig, source: str, *, topic_prefix: str = "") -> None:
        self._cfg = cfg
        self.source = source
        self._prefix = topic_prefix
        self._producer: AIOKafkaProducer | None = None
        self._stopped = False

    async def start(self) -> None:
        kwargs: dict[str, Any] = dict(
            bootstrap_servers=self._cfg.bootstrap,
            client_id=f"{self._cfg.client_id}-{self.source}",
            acks="all",
            enable_idempotence=self._cfg.idempotence,
            linger_ms=5,
            request_timeout_ms=15_000,
            retry_backoff_ms=200,
        )
        self._producer = AIOKafkaProducer(**kwargs)
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            if not self._cfg.idempotence or isinstance(exc, KafkaConnectionError):
                raise
            # Brokers without transactions (the embedded one) answer InitProducerId with an error.
            if self._cfg.idempotence_required:
                raise KafkaError(f"the broker at {self._cfg.bootstrap} refused the idempotent producer ({exc!r}); "
                                 "set MODELCD_KAFKA_IDEMPOTENCE=false for brokers without it") from exc
            log.warning("broker refused the idempotent producer; publishing with acks=all only",
                        bootstrap=self._cfg.bootstrap, error=repr(exc))
            kwargs["enable_idempotence"] = False
            self._producer = AIOKafkaProducer(**kwargs)
            await self._producer.start()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def topic_for(self, event: Event) -> str:
        return self._prefix + type(event).topic

    async def publish(self, event: Event, *, event_id: str | None = None) -> None:
        """Send and wait for the broker's acknowledgement (acks=all)."""
        if self._producer is None:
            raise RuntimeError("Publisher is not started")
        key, value, headers = encode(event, self.source, event_id=event_id)
        await self._producer.send_and_wait(self.topic_for(event), value, key=key, headers=headers)

    async def publish_nowait(self, event: Event) -> asyncio.Future[Any]:
        """Queue in the producer's batch; the returned future resolves on acknowledgement."""
        if self._producer is None:
            raise RuntimeError("Publisher is not started")
        key, value, headers = encode(event, self.source)
        return await self._producer.send(self.topic_for(event), value, key=key, headers=headers)

    async def stop(self) -> None:
        if self._stopped or self._producer is None:
            self._stopped = True
            return
        self._stopped = True
        try:
            await self._producer.flush()
        finally:
            await self._producer.stop()


Handler = Callable[[Event, Envelope], Awaitable[None]]


@dataclass
class ConsumerStats:
    handled: int = 0
    skipped_undecodable: int = 0
    handler_errors: int = 0
    duplicates: int = 0
    last_error: str | None = None


class SeenIds:
    """A bounded memory of event ids, so a redelivered event is handled once."""

    def __init__(self, size: int = 10_000) -> None:
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._size = size

    def add(self, event_id: str) -> bool:
        """True if new."""
        if not event_id:
            return True
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


@dataclass
class Consumer:
    """A consumer-group loop: decode → handler → commit.

    Run `await consumer.run()` inside the service's TaskGroup; `started` is set
    once the group has joined. Cancel the task (or call `stop()`) to leave.
    """

    cfg: KafkaConfig
    topics: list[str]
    group_id: str
    handler: Handler
    max_attempts: int = 3
    dedupe: bool = True
    topic_prefix: str = ""
    fetch_wait_ms: int = 500  # PROMPT_FETCH_WAIT_MS on a deployment's path
    stats: ConsumerStats = field(default_factory=ConsumerStats)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _seen: SeenIds = field(default_factory=SeenIds)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            *[self.topic_prefix + t for t in self.topics],
            bootstrap_servers=self.cfg.bootstrap,
            client_id=f"{self.cfg.client_id}-{self.group_id}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=100,
            fetch_max_wait_ms=self.fetch_wait_ms,
        )
        await consumer.start()
        self.started.set()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        await self._handle(record)
                        await consumer.commit({tp: record.offset + 1})
        finally:
            await stop_consumer(consumer)

    async def _handle(self, record: Any) -> None:
        topic = record.topic[len(self.topic_prefix):]
        bound = log.bind(topic=record.topic, partition=record.partition, offset=record.offset)
        try:
            event, env = decode(topic, record.value, record.headers)
        except DecodeError as exc:
            self.stats.skipped_undecodable += 1
            self.stats.last_error = str(exc)
            bound.warning("skipped undecodable record", reason=str(exc))
            return
        if self.dedupe and not self._seen.add(env.id):
            self.stats.duplicates += 1
            return
        for attempt in range(1, self.max_attempts + 1):
            try:
                await self.handler(event, env)
                self.stats.handled += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the handler's failure must not kill the loop
                self.stats.handler_errors += 1
                self.stats.last_error = repr(exc)
                bound.exception("handler failed", attempt=attempt, event_type=env.type)
                await asyncio.sleep(min(0.2 * attempt, 1.0))
        bound.error("giving up on event after retries", event_id=env.id, event_type=env.type)


async def partitions_of(consumer: AIOKafkaConsumer, names: Iterable[str]) -> list[TopicPartition]:
    """Every partition of `names`, sorted, refreshing metadata once for topics the client has not seen."""
    names = list(names)
    if any(consumer.partitions_for_topic(n) is None for n in names):
        await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public refresh
    return [TopicPartition(n, p) for n in names for p in sorted(consumer.partitions_for_topic(n) or ())]


async def read_topic(cfg: KafkaConfig, topic: str, *, topic_prefix: str = "",
                     since: float | None = None) -> list[tuple[Event, Envelope, Any]]:
    """Every decodable event of `topic` from the beginning up to its current end.

    `since` (epoch seconds) filters by record timestamp while scanning: brokers that
    cannot seek by time (the embedded one answers offset 0) are still correct.
    """
    name = topic_prefix + topic
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cfg.bootstrap, client_id=f"{cfg.client_id}-reader",
        group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
    )
    try:
        await consumer.start()
    except BaseException:
        await stop_consumer(consumer)  # a failed start leaves connections behind
        raise
    out: list[tuple[Event, Envelope, Any]] = []
    try:
        tps = await partitions_of(consumer, [name])
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async for r in scan_to_end(consumer, tps):
            if since is not None and r.timestamp / 1000.0 < since:
                continue
            try:
                event, env = decode(topic, r.value, r.headers)
            except DecodeError:
                continue
            out.append((event, env, r))
        return out
    finally:
        await stop_consumer(consumer)


async def scan_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> AsyncIterator[Any]:
    """The records of the assigned `tps` from the consumer's positions up to the partitions' end.

    The end is re-read once reached: the embedded broker has been seen to answer an end offset
    below the last record of a batch that was still being appended, and a writer may land
    records while we scan. Three rounds bound a busy topic.
    """
    ends = await consumer.end_offsets(tps)
    for _round in range(3):
        remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=500)
            for records in batches.values():
                for r in records:
                    yield r
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        fresh = await consumer.end_offsets(tps)
        if all(fresh[tp] <= ends[tp] for tp in tps):
            break
        ends = fresh


async def read_state(cfg: KafkaConfig, topic: str, *, topic_prefix: str = "") -> dict[str, Event]:
    """A state topic read from the beginning into {key: last event} (never relies on compaction)."""
    state: dict[str, Event] = {}
    for event, _env, record in await read_topic(cfg, topic, topic_prefix=topic_prefix):
        key = record.key.decode() if record.key else event.key()
        state[key] = event
    return state


async def follow_events(cfg: KafkaConfig, names: Iterable[str], on_event: Callable[[Event], None], *,
                        caught_up: asyncio.Event, client_id: str, backlog: int | None = None,
                        on_undecodable: Callable[[str, int, int, DecodeError], None] | None = None,
                        max_records: int = 500, fetch_wait_ms: int = 500) -> None:
    """Apply every event of `names` to `on_event`, for as long as the caller lets it run (cancel to stop).

    No consumer group: every follower sees every record. It starts at the beginning of each partition, or at
    its last `backlog` records (the fleet's heartbeats), and sets `caught_up` once it has read what the
    partitions held when it started. A record that does not decode goes to `on_undecodable(topic, partition,
    offset, error)` (or is skipped) and never stops the follower. `fetch_wait_ms`: PROMPT_FETCH_WAIT_MS on a
    deployment's path.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, client_id=client_id, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=fetch_wait_ms)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, names)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begins[tp] if backlog is None else max(begins[tp], ends[tp] - backlog))
        pending = {tp for tp in tps if ends[tp] > begins[tp]}
        if not pending:
            caught_up.set()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=max_records)
            for tp, records in batches.items():
                for r in records:
                    try:
                        event, _env = decode(tp.topic, r.value, r.headers)
                    except DecodeError as exc:
                        if on_undecodable is not None:
                            on_undecodable(tp.topic, tp.partition, r.offset, exc)
                        continue
                    on_event(event)
            if pending:
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
                if not pending:
                    caught_up.set()
    finally:
        await stop_consumer(consumer)
