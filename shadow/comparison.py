"""Windowed comparison of shadows with their primaries: a pure `Window` and its stream processor.

`Window` (pure) aggregates the ShadowPredictions of one primary/shadow pair over one tumbling
window of event time (`ShadowPrediction.at`, when the primary answered):
- `count`: predictions; `errors`: those whose shadow failed (they count nowhere else);
- the compared output is the primary's first output that the shadow also returned; its values
  are flattened (a tensor's `data`, any nesting). Labels (all values int, str or bool) give
  `agreement`: the share of requests whose label outputs are equal. Numbers (any float) give
  `mean_abs_diff` (over every element of every compared request) and `max_abs_diff`. Outputs
  of different lengths or kinds are counted as disagreeing labels / skipped for differences;
- latency percentiles `p50`/`p90`/`p99` of each side, nearest-rank (shadow: successes only).

`ComparisonProcessor` reads `modelcd.shadow-predictions` in a consumer group and emits one
ShadowComparison per pair and window to `modelcd.shadow-comparisons`. Why a plain aiokafka
consumer group and not faust-streaming: a faust windowed table closes windows on its cleanup
timer, in wall-clock time, so replaying a topic would cut windows in pieces; here windows close
on event time (per partition: a pair's predictions are all on its primary's partition, so one
partition's watermark is enough) and offsets are committed only up to the first record of the
oldest window still open, so a crash loses nothing: those records are read again.

Closing rule: a window closes when its partition's watermark (largest `at` seen) passes
`end + grace`, or, when a poll comes back empty (caught up, so no more records are on their
way), when the wall clock passes `end + grace`. A record for a window that has already closed
is late: counted and dropped. Comparisons are keyed by pair and carry `window_start`, so a
reader keeps the last one per (pair, window_start): a window re-emitted after a crash replaces
the first.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from modelcd.events.bus import KafkaConfig, Publisher, stop_consumer
from modelcd.events.codec import DecodeError, decode
from modelcd.events.schemas import ShadowComparison, ShadowPrediction
from modelcd.events.topics import SHADOW_PREDICTIONS
from modelcd.logs import get_logger

from .pressure import percentile

log = get_logger("modelcd.shadow.comparison")

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping) and "data" in value:
        value = value["data"]
    if isinstance(value, list | tuple):
        for v in value:
            yield from _flat(v)
    else:
        yield value


def _is_label(v: Any) -> bool:
    return isinstance(v, str | bool | int)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def compared_output(primary: Mapping[str, Any], shadow: Mapping[str, Any]) -> str | None:
    """The output both sides returned, primary's order first."""
    return next((name for name in primary if name in shadow), None)


def latency_summary(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {name: percentile(ordered, p) for name, p in PERCENTILES}


@dataclass
class Window:
    """One pair's predictions over [start, end). Pure: add events, read `result()`."""

    primary: str  # name:version
    shadow: str
    start: float
    end: float
    count: int = 0
    errors: int = 0
    label_pairs: int = 0
    label_agree: int = 0
    diff_n: int = 0
    diff_sum: float = 0.0
    diff_max: float | None = None
    primary_latencies: list[float] = field(default_factory=list)
    shadow_latencies: list[float] = field(default_factory=list)
    output: str | None = None  # the output to compare; None: the first both sides returned

    def add(self, p: ShadowPrediction) -> None:
        self.count += 1
        self.primary_latencies.append(p.primary_latency_ms)
        if p.shadow_error is not None:
            self.errors += 1
            return
        self.shadow_latencies.append(p.shadow_latency_ms)
        if self.output is not None:
            name = self.output if self.output in p.primary_outputs and self.output in p.shadow_outputs else None
        else:
            name = compared_output(p.primary_outputs, p.shadow_outputs)
        if name is None:
            return
        a = list(_flat(p.primary_outputs[name]))
        b = list(_flat(p.shadow_outputs[name]))
        both = a + b
        if both and all(_is_label(v) for v in both):
            self.label_pairs += 1
            self.label_agree += a == b
        elif both and all(_is_number(v) for v in both) and len(a) == len(b):
            for x, y in zip(a, b, strict=True):
                d = abs(float(x) - float(y))
                self.diff_n += 1
                self.diff_sum += d
                self.diff_max = d if self.diff_max is None else max(self.diff_max, d)
        elif both and all(_is_label(v) for v in a) and all(_is_label(v) for v in b):
            self.label_pairs += 1  # labels of different lengths: they disagree

    def result(self, *, at: float | None = None) -> ShadowComparison:
        return ShadowComparison(
            primary=self.primary, shadow=self.shadow, window_start=self.start, window_end=self.end,
            count=self.count, errors=self.errors,
            agreement=self.label_agree / self.label_pairs if self.label_pairs else None,
            mean_abs_diff=self.diff_sum / self.diff_n if self.diff_n else None,
            max_abs_diff=self.diff_max,
            primary_latency_ms=latency_summary(self.primary_latencies),
            shadow_latency_ms=latency_summary(self.shadow_latencies),
            **({"at": at} if at is not None else {}),
        )


def compare_windows(predictions: Iterable[ShadowPrediction], size: float, *, output: str | None = None,
                    at: float | None = None) -> list[ShadowComparison]:
    """Tumbling windows of `size` seconds per pair over `predictions`, comparing `output` (pure: for reports)."""
    windows: dict[tuple[str, str, float], Window] = {}
    for p in predictions:
        pair = (f"{p.primary_model}:{p.primary_version}", f"{p.shadow_model}:{p.shadow_version}")
        start, end = window_bounds(p.at, size)
        w = windows.get((*pair, start))
        if w is None:
            w = windows[(*pair, start)] = Window(primary=pair[0], shadow=pair[1], start=start, end=end, output=output)
        w.add(p)
    return [w.result(at=at) for w in windows.values()]


def window_bounds(at: float, size: float) -> tuple[float, float]:
    start = math.floor(at / size) * size
    return start, start + size


WindowKey = tuple[TopicPartition, str, str, float]


@dataclass
class _Open:
    window: Window
    first_offset: int


class Windows:
    """The open windows of a processor, per partition, with the offsets they pin. Pure."""

    def __init__(self, size: float, grace: float) -> None:
        if size <= 0:
            raise ValueError(f"window size {size}: expected seconds > 0")
        self.size = size
        self.grace = grace
        self.open: dict[WindowKey, _Open] = {}
        self.watermark: dict[TopicPartition, float] = {}
        self.closed_before: dict[TopicPartition, float] = {}  # windows ending at or before this have closed
        self.late = 0

    def add(self, tp: TopicPartition, offset: int, p: ShadowPrediction) -> None:
        start, end = window_bounds(p.at, self.size)
        if end <= self.closed_before.get(tp, -math.inf):
            self.late += 1
            return
        self.watermark[tp] = max(self.watermark.get(tp, -math.inf), p.at)
        key = (tp, f"{p.primary_model}:{p.primary_version}", f"{p.shadow_model}:{p.shadow_version}", start)
        o = self.open.get(key)
        if o is None:
            o = self.open[key] = _Open(Window(key[1], key[2], start, end), offset)
        o.window.add(p)

    def close(self, *, wall_now: float | None = None) -> list[Window]:
        """Windows past `end + grace` by their partition's watermark (or by `wall_now` when given)."""
        out = []
        for key, o in list(self.open.items()):
            tp = key[0]
            horizon = self.watermark.get(tp, -math.inf)
            if wall_now is not None:
                horizon = max(horizon, wall_now)
            if o.window.end + self.grace <= horizon:
                out.append(o.window)
                del self.open[key]
                self.closed_before[tp] = max(self.closed_before.get(tp, -math.inf), o.window.end)
        out.sort(key=lambda w: (w.start, w.primary, w.shadow))
        return out

    def drop(self, tp: TopicPartition) -> None:
        for key in [k for k in self.open if k[0] == tp]:
            del self.open[key]
        self.watermark.pop(tp, None)
        self.closed_before.pop(tp, None)

    def pinned(self, tp: TopicPartition) -> int | None:
        """The first offset of tp that an open window still needs (None: nothing pinned)."""
        return min((o.first_offset for k, o in self.open.items() if k[0] == tp), default=None)


class ComparisonProcessor:
    """The I/O shell around `Windows`: consume, aggregate, emit, commit (in that order)."""

    def __init__(self, cfg: KafkaConfig, publisher: Publisher, *, window_s: float = 60.0, grace_s: float = 5.0,
                 group_id: str = "modelcd-shadow-comparison", topic_prefix: str = "",
                 wall_clock: Callable[[], float] = time.time, consumer_options: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self._consumer_options = dict(consumer_options or {})  # e.g. session timeouts in tests
        self.publisher = publisher
        self.windows = Windows(window_s, grace_s)
        self.group_id = group_id
        self.topic_prefix = topic_prefix
        self._wall = wall_clock
        self.consumed = 0
        self.emitted = 0
        self.undecodable = 0

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        topic = self.topic_prefix + SHADOW_PREDICTIONS
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=self.cfg.bootstrap, client_id=f"{self.cfg.client_id}-{self.group_id}",
            group_id=self.group_id, enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500,
            **self._consumer_options,
        )
        await consumer.start()
        if ready is not None:
            ready.set()
        log.info("shadow comparison started", group=self.group_id, window_s=self.windows.size)
        committed: dict[TopicPartition, int] = {}
        positions: dict[TopicPartition, int] = {}
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500)
                self._forget_revoked(consumer, positions, committed)
                for tp, records in batches.items():
                    for r in records:
                        self.consumed += 1
                        try:
                            event, _env = decode(SHADOW_PREDICTIONS, r.value, r.headers)
                        except DecodeError as exc:
                            self.undecodable += 1
                            log.warning("skipped undecodable record", partition=r.partition, offset=r.offset,
                                        reason=str(exc))
                            continue
                        if isinstance(event, ShadowPrediction):
                            self.windows.add(tp, r.offset, event)
                    if records:
                        positions[tp] = records[-1].offset + 1
                closed = self.windows.close(wall_now=None if batches else self._wall())
                for w in closed:
                    await self.publisher.publish(w.result())  # acks=all before the offsets move
                    self.emitted += 1
                    log.info("shadow comparison", primary=w.primary, shadow=w.shadow, window_start=w.start,
                             count=w.count, errors=w.errors)
                await self._commit(consumer, positions, committed)
        finally:
            await stop_consumer(consumer)

    def _forget_revoked(self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int],
                        committed: dict[TopicPartition, int]) -> None:
        """After a rebalance, windows of partitions we lost belong to their new owner (it re-reads them)."""
        mine = consumer.assignment()
        for tp in [tp for tp in positions if tp not in mine]:
            positions.pop(tp, None)
            committed.pop(tp, None)
            self.windows.drop(tp)

    async def _commit(self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int],
                      committed: dict[TopicPartition, int]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in consumer.assignment():
            position = positions.get(tp)
            if position is None:
                continue
            pinned = self.windows.pinned(tp)
            target = position if pinned is None else min(position, pinned)
            if target > committed.get(tp, -1):
                offsets[tp] = OffsetAndMetadata(target, "")
        if offsets:
            await consumer.commit(offsets)
            for tp, om in offsets.items():
                committed[tp] = om.offset


async def run_comparison(settings: Any, *, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """The service `modelcd up` and `modelcd shadow compare` run."""
    cfg = KafkaConfig.from_settings(settings)
    async with Publisher(cfg, source="shadow-comparison") as publisher:
        await ComparisonProcessor(cfg, publisher, window_s=settings.comparison_window,
                                  grace_s=settings.comparison_grace).run(stop=stop, ready=ready)
