"""Raw records for ops tools: scan a topic, follow it, write and read a lossless JSON-lines dump.

`scan` reads every partition from the beginning (or from an offset) to the end it finds, and
yields records undecoded, so a replay can report what it could not decode instead of dropping it.
The end is re-read once reached: the embedded broker reports a high watermark below the true end
(the last batch's first offset + 1), and a writer may append while we read.

The dump format (`modelcd replay --out FILE`, read back by `--from-file`) is one JSON object per
record: topic, partition, offset, timestamp (ms), key, value, headers. Keys, values and header
values are kept as text when they are UTF-8 and as `{"b64": ...}` otherwise, so writing a dump
back into a topic reproduces every byte of key, value and headers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from .bus import KafkaConfig, partitions_of, scan_to_end, stop_consumer


class TopicMissing(LookupError):
    """The broker has no such topic (yet)."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One Kafka record as it was on the broker."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, r: Any) -> RawRecord:
        return cls(topic=r.topic, partition=r.partition, offset=r.offset, timestamp_ms=r.timestamp,
                   key=r.key, value=r.value, headers=tuple((k, bytes(v)) for k, v in (r.headers or ())))

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode(errors="replace")
        return None


def _text(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode()}


def _bytes(field: Any) -> bytes | None:
    if field is None:
        return None
    if isinstance(field, dict):
        return base64.b64decode(field["b64"])
    return str(field).encode("utf-8")


def dump_line(record: RawRecord, **extra: Any) -> str:
    """One line of the dump format (`extra` adds readable fields, ignored when read back)."""
    obj = {"topic": record.topic, "partition": record.partition, "offset": record.offset,
           "timestamp": record.timestamp_ms, "key": _text(record.key), "value": _text(record.value),
           "headers": [[k, _text(v)] for k, v in record.headers], **extra}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def load_lines(lines: Iterable[str]) -> Iterator[RawRecord]:
    """Records from a dump; raises ValueError naming the line that is not one."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            yield RawRecord(topic=obj["topic"], partition=int(obj.get("partition", 0)),
                            offset=int(obj.get("offset", -1)), timestamp_ms=int(obj.get("timestamp", 0)),
                            key=_bytes(obj.get("key")), value=_bytes(obj.get("value")),
                            headers=tuple((str(k), _bytes(v) or b"") for k, v in obj.get("headers", ())))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {n} is not a record of a modelcd dump ({exc})") from None


def _consumer(cfg: KafkaConfig) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, client_id=f"{cfg.client_id}-ops", group_id=None,
                            enable_auto_commit=False, auto_offset_reset="earliest")


async def _start(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.start()
    except BaseException:
        await stop_consumer(consumer)
        raise


async def scan(cfg: KafkaConfig, topic: str, *, offset: int | None = None,
               partitions: Iterable[int] | None = None) -> AsyncIterator[RawRecord]:
    """Every record of `topic` (from `offset` on each partition, default the beginning) up to its end."""
    consumer = _consumer(cfg)
    await _start(consumer)
    try:
        tps = await partitions_of(consumer, [topic])
        if partitions is not None:
            wanted = set(partitions)
            tps = [tp for tp in tps if tp.partition in wanted]
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if offset is not None:
            for tp in tps:
                consumer.seek(tp, offset)
        async for r in scan_to_end(consumer, tps):
            yield RawRecord.of(r)
    finally:
        await stop_consumer(consumer)


async def follow(cfg: KafkaConfig, topic: str, *, from_beginning: bool = False) -> AsyncIterator[RawRecord]:
    """Records of `topic` as they arrive (from its end, or its beginning), until the caller stops iterating."""
    consumer = _consumer(cfg)
    await _start(consumer)
    try:
        tps = await partitions_of(consumer, [topic])
        if not tps:
            raise TopicMissing(topic)
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        while True:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for records in batches.values():
                for r in records:
                    yield RawRecord.of(r)
    finally:
        await stop_consumer(consumer)


async def produce(cfg: KafkaConfig, topic: str, records: Iterable[RawRecord]) -> int:
    """Write `records` into `topic` byte for byte (key, value, headers; the partition follows the key)."""
    producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, client_id=f"{cfg.client_id}-replay", acks="all",
                                enable_idempotence=False, linger_ms=5)
    await producer.start()
    n = 0
    try:
        for rec in records:
            await producer.send(topic, rec.value, key=rec.key, headers=list(rec.headers))
            n += 1
        await producer.flush()
    finally:
        await producer.stop()
    return n


def write_dump(out: IO[str], records: Iterable[RawRecord]) -> int:
    n = 0
    for rec in records:
        out.write(dump_line(rec) + "\n")
        n += 1
    return n


__all__ = ["RawRecord", "TopicMissing", "TopicPartition", "dump_line", "follow", "load_lines", "produce", "scan", "write_dump"]
