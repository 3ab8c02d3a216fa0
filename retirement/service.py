"""The retirement stream processor: a faust-streaming app run inside modelcd's asyncio loop.

Dataflow (every arrow keeps one model's messages on one partition):

    modelcd.usage        (key: model) ─────────────────────────────► usage agent ─┐
    modelcd.model-state  (key: name:version) ─► state agent ─┐                    ├─► `models` table
    modelcd.traffic      (key: endpoint) ─► traffic agent ───┼─► <app>-updates ──► updates agent ─┤    (key: model)
      (`endpoints` table: each endpoint's routes/rollouts)   │   (key: model)                     │
    timer, every check interval: one Check per local model ──┘                                    │
                                                                                                  ▼
                     modelcd.retirement: RetirementWarning / RetirementDecision   (modelcd Publisher, CloudEvents)
                     modelcd.deploy-requests: RetireRequested(requested_by="retirement")

Why the detour through `<app>-updates`: faust only lets a table change inside an agent
(the changelog partition is the current event's), and the `models` table is keyed by
model name like `modelcd.usage`. ModelState (keyed `name:version`), traffic (keyed by
endpoint) and the timer's checks are re-keyed onto that topic, so every change of a
model's entry, including "warned at", happens in one agent, in order, and lands in the
changelog: a restarted worker recovers it and never warns twice.

Beyond the broker: each model's last use and the time the table began tracking each version are
also written to the store (`targets/usage/<name>.json`, throttled to one write per model per
REMEMBER_EVERY_S of progress), so `modelcd expiring` shows them after a restart, and a table rebuilt
after a broker loss starts a version's record from the last use the store remembers. Idle time never
counts from before the record was created (`policy.Record.tracked_since`), whatever was lost.

Delivery: at least once. Events are published (acks=all) before the table write that
records them; a crash in between republishes them with the same deterministic event
id after restart. Undecodable records are logged, counted and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust

from modelcd.events import topics as T
from modelcd.events.bus import KafkaConfig, Publisher, ensure_topics
from modelcd.events.codec import DecodeError, decode
from modelcd.events.schemas import (
    ModelState,
    RetirementDecision,
    RetirementWarning,
    RolloutStep,
    TrafficPolicy,
    UsageReport,
)
from modelcd.logs import get_logger
from modelcd.settings import Settings
from modelcd.store.blobs import open_store
from modelcd.store.targets import LastUse, TargetState

from . import handlers, policy
from .notify import Notifier, NotifyQueue, WebhookNotifier, notifier_from_settings

log = get_logger("modelcd.retirement")

APP_ID = "modelcd-retirement"
REMEMBER_EVERY_S = 60.0  # a last use is written to the store when it moved this much (or is new)


@dataclass
class ProcessorStats:
    usage_reports: int = 0
    state_events: int = 0
    traffic_events: int = 0
    checks: int = 0
    warnings: int = 0
    retirements: int = 0
    skips: int = 0
    cancels: int = 0
    undecodable: int = 0
    errors: int = 0


def _headers(message: Any) -> list[tuple[str, bytes]]:
    raw = message.headers or ()
    return list(raw.items()) if isinstance(raw, dict) else list(raw)


class RetirementProcessor:
    """One faust worker of the retirement processor; `async with` starts it and waits until it is ready.

    `clock` is injectable so tests can move time; `notifier` defaults from the settings.
    Several processes with the same settings share the partitions (one consumer group).
    """

    def __init__(self, settings: Settings, *, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.time, app_id: str = APP_ID) -> None:
        self.settings = settings
        self.clock = clock
        self.stats = ProcessorStats()
        self.warn_share = settings.retirement_warn_share
        self.notifier = notifier or notifier_from_settings(settings.retirement_webhook_url)
        self.notices = NotifyQueue(self.notifier)
        self.cfg = KafkaConfig.from_settings(settings)
        self.publisher = Publisher(self.cfg, f"retirement/{socket.gethostname()}")
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._stack = contextlib.AsyncExitStack()
        self._targets: TargetState | None = None  # the store, opened in start()
        self._remembered: dict[str, dict[str, LastUse]] = {}  # per model: what the store holds
        self.app = self._build_app(app_id)

    # --- the faust app -------------------------------------------------------------------------

    def _build_app(self, app_id: str) -> faust.App:
        s = self.settings
        app = faust.App(
            app_id,
            broker=f"kafka://{s.bootstrap}",
            broker_client_id=f"{s.kafka_client_id}-retirement",
            # In-memory tables rebuilt from their changelog topics on start: the changelog is
            # the durable state (the embedded broker has no local disk to share anyway).
            store="memory://",
            datadir=str(s.home / "retirement"),
            web_enabled=False,
            autodiscover=False,
            topic_partitions=s.topic_partitions,
            topic_replication_factor=s.topic_replication,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # faust only turns on the idempotent producer for exactly-once, which we do not use:
            # the embedded broker refuses it.
            processing_guarantee="at_least_once",
            # Tansu answers a join after about half the rebalance timeout: keep it short so a
            # worker is ready in seconds, not the default 30.
            broker_rebalance_timeout=10.0,
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            table_standby_replicas=0,
            table_cleanup_interval=3600.0,
        )
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        usage_topic = app.topic(T.USAGE, **raw)
        state_topic = app.topic(T.MODEL_STATE, **raw)
        traffic_topic = app.topic(T.TRAFFIC, **raw)
        self.updates_topic = updates = app.topic(f"{app_id}-updates", partitions=s.topic_partitions,
                                                 internal=True, **raw)
        self.models = models = app.Table("models", key_type=str, partitions=s.topic_partitions)
        self.endpoints = endpoints = app.Table("endpoints", key_type=str, partitions=s.topic_partitions)

        async def on_usage(stream: Any) -> None:
            async for event in stream.events():
                report = self._decode(T.USAGE, event.message)
                if not isinstance(report, UsageReport):
                    continue
                self.stats.usage_reports += 1
                try:
                    entry = handlers.entry_from_table(models.get(report.model))
                    if handlers.handle_usage(entry, report, self.clock()):
                        models[report.model] = handlers.entry_to_table(entry)
                        await self._remember(report.model, entry)
                except Exception:
                    self._failed("usage", report.model)

        async def on_state(stream: Any) -> None:
            async for event in stream.events():
                state = self._decode(T.MODEL_STATE, event.message)
                if not isinstance(state, ModelState):
                    continue
                self.stats.state_events += 1
                await self._send_update(state.name, handlers.StateChanged(state=state))

        async def on_traffic(stream: Any) -> None:
            async for event in stream.events():
                ev = self._decode(T.TRAFFIC, event.message)
                if not isinstance(ev, TrafficPolicy | RolloutStep):
                    continue
                self.stats.traffic_events += 1
                try:
                    before = endpoints.get(ev.endpoint)
                    view_before = None if before is None else policy.EndpointView(**before)
                    view = policy.on_traffic(view_before, ev)
                    endpoints[ev.endpoint] = {"endpoint": view.endpoint, "weights": view.weights,
                                              "rollouts": view.rollouts, "shadows": view.shadows}
                    changed = policy.changed_protections(policy.endpoint_protections(view_before),
                                                         policy.endpoint_protections(view))
                except Exception:
                    self._failed("traffic", ev.endpoint)
                    continue
                for model_key, reasons in changed.items():
                    name, _, version = model_key.rpartition(":")
                    await self._send_update(name, handlers.ProtectionChanged(
                        model=name, version=version, endpoint=ev.endpoint, reasons=reasons))

        async def on_update(stream: Any) -> None:
            async for event in stream.events():
                key = (event.key or b"").decode(errors="replace")
                try:
                    update = handlers.update_decoder.decode(event.value)
                except Exception as exc:
                    self.stats.undecodable += 1
                    log.warning("skipped undecodable update", key=key, reason=str(exc))
                    continue
                try:
                    entry = handlers.entry_from_table(models.get(key))
                    match update:
                        case handlers.StateChanged(state=state):
                            recalled = (await self._recall(state.name)).get(state.version)
                            if handlers.handle_state(entry, state, self.clock(),
                                                     recalled.last_used if recalled else 0.0):
                                await self._remember(state.name, entry)
                        case handlers.ProtectionChanged():
                            handlers.handle_protection(entry, update)
                        case handlers.Check():
                            self.stats.checks += 1
                            await self._carry_out(handlers.handle_check(entry, self.clock(), self.warn_share))
                    models[key] = handlers.entry_to_table(entry)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._failed("update", key)

        async def check_all() -> None:
            # Every worker checks the models of its own partitions (the table holds only those).
            now = self.clock()
            for name in list(models.keys()):
                await self._send_update(name, handlers.Check(at=now))

        app.agent(usage_topic, name=f"{app_id}.usage")(on_usage)
        app.agent(state_topic, name=f"{app_id}.state")(on_state)
        app.agent(traffic_topic, name=f"{app_id}.traffic")(on_traffic)
        app.agent(updates, name=f"{app_id}.updates")(on_update)
        app.timer(s.retirement_check_interval, name=f"{app_id}.check")(check_all)

        async def on_startup_finished() -> None:
            self._ready.set()

        app.on_startup_finished = on_startup_finished
        return app

    async def _recall(self, name: str) -> dict[str, LastUse]:
        """What the store remembers of a model's versions (read once per model and process)."""
        if self._targets is None:
            return {}
        if name not in self._remembered:
            try:
                self._remembered[name] = await self._targets.get_last_use(name)
            except Exception:  # the store is a memory beyond the broker; the conservative clock still holds
                log.exception("could not read the last use kept in the store", model=name)
                return {}
        return self._remembered[name]

    async def _remember(self, name: str, entry: handlers.ModelEntry) -> None:
        """Write the model's last use and tracking start to the store when a version is new to it or its last
        use moved by REMEMBER_EVERY_S: `modelcd expiring` reads it, and a table rebuilt after a broker loss
        starts from it."""
        if self._targets is None:
            return
        known = await self._recall(name)
        # tracked_since is the table's own (a table rebuilt after a loss tracks from its rebuild), so what
        # `modelcd expiring` computes from the store agrees with what the processor decides.
        doc = {v: LastUse(last_used=max(r.last_used, known[v].last_used if v in known else 0.0),
                          tracked_since=r.tracked_since)
               for v, r in entry.versions.items()}
        if all(v in known and doc[v].tracked_since == known[v].tracked_since
               and doc[v].last_used - known[v].last_used < REMEMBER_EVERY_S for v in doc):
            return
        try:
            await self._targets.put_last_use(name, doc)
        except Exception:
            log.exception("could not write the last use to the store", model=name)
            return
        self._remembered[name] = doc

    def _decode(self, topic: str, message: Any) -> Any:
        try:
            event, _env = decode(topic, message.value, _headers(message))
        except DecodeError as exc:
            self.stats.undecodable += 1
            log.warning("skipped undecodable record", topic=topic, partition=message.partition,
                        offset=message.offset, reason=str(exc))
            return None
        return event

    def _failed(self, what: str, key: str) -> None:
        # One bad entry must not stop the stream; the next message for the key retries.
        self.stats.errors += 1
        log.exception("retirement processing failed", stage=what, key=key)

    async def _send_update(self, model: str, update: handlers.Update) -> None:
        await self.updates_topic.send(key=model.encode(), value=handlers.update_encoder.encode(update))

    async def _carry_out(self, outcomes: list[handlers.Outcome]) -> None:
        for outcome in outcomes:
            record, decision = outcome.record, outcome.decision
            for event, event_id in outcome.events:
                await self.publisher.publish(event, event_id=event_id)
                if isinstance(event, RetirementWarning | RetirementDecision):
                    self.notices.put(event)
            counter = {"warn": "warnings", "retire": "retirements", "skip": "skips", "cancel": "cancels"}.get(
                decision.action.value)
            if counter:
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            log.info("retirement check", model=record.name, version=record.version, action=decision.action.value,
                     reason=decision.reason, owner=record.owner, last_used=record.last_used)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # Topics the processor reads must exist before faust subscribes (up creates them too).
        await ensure_topics(self.cfg, [T.USAGE, T.MODEL_STATE, T.TRAFFIC, T.RETIREMENT, T.DEPLOY_REQUESTS])
        await self.publisher.start()
        store = await self._stack.enter_async_context(
            open_store(self.settings.resolved_store_url, endpoint_url=self.settings.s3_endpoint_url))
        self._targets = TargetState(store)
        self._tasks.append(asyncio.create_task(self.notices.run(), name="retirement-notify"))
        # faust creates only the last level of its datadir: a fresh MODELCD_HOME would crash the worker.
        self.settings.home.joinpath("retirement").mkdir(parents=True, exist_ok=True)
        await self.app.start()
        stopped = asyncio.ensure_future(self.app.wait_until_stopped())
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({stopped, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            ready.cancel()
        if not self._ready.is_set():
            raise RuntimeError(f"the retirement processor stopped while starting: {self.app.crash_reason!r}")
        log.info("retirement processor ready", bootstrap=self.settings.bootstrap,
                 check_interval=self.settings.retirement_check_interval, warn_share=self.warn_share)

    async def stop(self) -> None:
        """Idempotent: faust drains its streams and flushes, then the publisher flushes, then notices drain."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            await self.app.stop()
        await self.publisher.stop()
        await self._stack.aclose()
        if self._tasks:
            await self.notices.close()
            done, pending = await asyncio.wait(self._tasks, timeout=10.0)
            for task in pending:
                task.cancel()
            self._tasks.clear()
        if isinstance(self.notifier, WebhookNotifier):
            await self.notifier.aclose()

    async def wait_until_stopped(self) -> None:
        await self.app.wait_until_stopped()

    async def __aenter__(self) -> RetirementProcessor:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_retirement(settings: Settings, *, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """Run one retirement worker until `stop` is set; raises if faust stops on its own (a crash)."""
    async with RetirementProcessor(settings) as proc:
        ready.set()
        stopped = asyncio.ensure_future(stop.wait())
        crashed = asyncio.ensure_future(proc.wait_until_stopped())
        try:
            await asyncio.wait({stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            crashed.cancel()
        if not stop.is_set():
            raise RuntimeError(f"the retirement processor stopped: {proc.app.crash_reason!r}")
