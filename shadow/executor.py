"""The shadow executor a serving node embeds: shadow predictions off the request path.

What it owns: the node's shadow rules (compiled from TrafficPolicy events), a bounded queue of
shadow jobs, `workers` tasks that run them, a loop-lag probe, and the pressure state machine
that pauses shadowing. What it borrows (injected): `predict` (the node's way of running a
loaded model) and `emit` (the node's bounded telemetry publisher).

Invariants:
- `offer()` is synchronous, cheap and never raises: the primary's answer is never delayed or
  failed by shadowing. It only matches rules and enqueues; predictions run in worker tasks,
  which first run after the request handler yields (`offer_soon` defers even the matching
  with `loop.call_soon`);
- the queue is bounded: a job that finds it full is dropped (`dropped_full`); while paused,
  new jobs are dropped and queued ones are shed (`dropped_paused`); nothing waits without bound;
- every job taken by a worker produces exactly one ShadowPrediction: with the shadow's outputs,
  or with `shadow_error` when the shadow raised, timed out (`timeout_s`) or a feature lookup
  failed. A predict that runs in a thread cannot be killed: on timeout it is abandoned and
  its record says so;
- `run()` is the only owner of the worker and probe tasks; `stop()` stops intake, lets queued
  jobs finish within `drain_timeout_s`, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelcd.events.schemas import ShadowPrediction, TrafficPolicy
from modelcd.logs import get_logger
from modelcd.runner import wait_for
from modelcd.serving.hooks import PrimaryResult

from .criteria import RequestView, ShadowRules, ShadowTarget
from .features import FeatureFetcher
from .pressure import Pressure, PressureLimits, State

log = get_logger("modelcd.shadow")

FAILURE_LOG_INTERVAL_S = 60.0  # a failing shadow is logged once a minute per kind of failure (all are published)


class ShadowPredict(Protocol):
    """Run `model:version` on `inputs` (name -> value); return (outputs, latency in ms).

    Outputs are a JSON-ready dict, or anything the executor's `convert` turns into one.
    """

    def __call__(self, model: str, version: str,
                 inputs: Mapping[str, Any]) -> Awaitable[tuple[dict[str, Any], float]]: ...


# Publishes one ShadowPrediction; returning False (a full buffer) counts it as not published.
Emit = Callable[[ShadowPrediction], Awaitable[bool | None] | bool | None]
Needs = Callable[[str, str], Sequence[str] | None]


@dataclass(frozen=True, slots=True)
class _Job:
    primary: PrimaryResult
    target: ShadowTarget
    at: float


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    queue_size: int = 1000
    workers: int = 2
    timeout_s: float = 5.0
    probe_interval_s: float = 0.1
    drain_timeout_s: float = 5.0
    limits: PressureLimits = field(default_factory=PressureLimits)

    @classmethod
    def from_settings(cls, settings: Any) -> ExecutorConfig:
        return cls(
            queue_size=settings.shadow_queue,
            workers=settings.shadow_workers,
            timeout_s=settings.shadow_timeout,
            limits=PressureLimits(
                pause_queue=settings.shadow_pause_queue or None,
                pause_lag_ms=settings.shadow_pause_lag_ms or None,
                pause_p99_ms=settings.shadow_pause_p99_ms or None,
                pause_busy=settings.shadow_pause_busy or None,
                resume_ratio=settings.shadow_resume_ratio,
            ),
        )


class ShadowExecutor:
    """See the module docstring. Counters are plain int attributes, read by the node's /metrics."""

    def __init__(self, *, predict: ShadowPredict, emit: Emit, node: str = "",
                 config: ExecutorConfig | None = None, features: FeatureFetcher | None = None,
                 needs: Needs | None = None, convert: Callable[[Any], dict[str, Any]] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = cfg = config or ExecutorConfig()
        self.rules = ShadowRules()
        self.pressure = Pressure(cfg.limits)
        self.features = features
        self._predict = predict
        self._emit = emit
        self._needs = needs
        self._node = node
        self._convert = convert  # outputs -> JSON-ready dict, run in the worker (never on the request path)
        self._wall = wall_clock
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=cfg.queue_size)
        self._closed = False
        self._stopping = asyncio.Event()
        # counters (monotonic, Prometheus counters)
        self.offered = 0  # primary results offered
        self.matched = 0  # (request, shadow) pairs the rules selected
        self.submitted = 0  # jobs enqueued
        self.dropped_full = 0
        self.dropped_paused = 0
        self.completed = 0  # ShadowPredictions produced (with outputs or an error)
        self.errors = 0  # shadows that raised, timed out or lacked features
        self.timeouts = 0
        self.emit_errors = 0
        self.internal_errors = 0  # offer() failures swallowed to protect the request path
        self._failure_log: dict[tuple[str, str], tuple[float, int]] = {}  # (shadow, kind) -> (logged at, quiet)

    # --- configuration -----------------------------------------------------------------------------

    def update_policy(self, policy: TrafficPolicy) -> None:
        """Apply an endpoint's TrafficPolicy (call it for every policy event the node reads)."""
        self._report(self.rules.update(policy, received=time.monotonic()))

    def reconcile(self, policies: Iterable[TrafficPolicy], started: float) -> None:
        """Apply a snapshot of the store's policies, read from `started` (time.monotonic()) on."""
        self._report(self.rules.reconcile(policies, started))

    @staticmethod
    def _report(rejected: list[tuple[Any, str]]) -> None:
        for rel, reason in rejected:
            log.warning("shadow relation ignored", primary=rel.primary, shadow=rel.shadow, reason=reason)

    # --- gauges --------------------------------------------------------------------------------------

    @property
    def pauses(self) -> int:
        return self.pressure.pauses

    @property
    def paused(self) -> bool:
        return self.pressure.paused

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def metrics(self) -> dict[str, float]:
        """Every counter and gauge, by Prometheus-style name (counters end in _total)."""
        return {
            "modelcd_shadow_offered_total": self.offered,
            "modelcd_shadow_matched_total": self.matched,
            "modelcd_shadow_submitted_total": self.submitted,
            "modelcd_shadow_dropped_full_total": self.dropped_full,
            "modelcd_shadow_dropped_paused_total": self.dropped_paused,
            "modelcd_shadow_completed_total": self.completed,
            "modelcd_shadow_errors_total": self.errors,
            "modelcd_shadow_timeouts_total": self.timeouts,
            "modelcd_shadow_emit_errors_total": self.emit_errors,
            "modelcd_shadow_pauses_total": self.pauses,
            "modelcd_shadow_feature_lookups_total": self.features.lookups if self.features else 0,
            "modelcd_shadow_queue_depth": self.queue_depth,
            "modelcd_shadow_paused": 1.0 if self.paused else 0.0,
            "modelcd_shadow_loop_busy": self.pressure.busy or 0.0,
        }

    # --- the request path ----------------------------------------------------------------------------

    def _log_failure(self, shadow: str, error: str, request_id: str) -> None:
        """One line per shadow and kind of failure per minute, with how many were not logged since:
        a shadow at a version that does not serve fails on every request and must not flood the log."""
        kind = (shadow, error.split(":", 1)[0])
        now = time.monotonic()
        last, quiet = self._failure_log.get(kind, (-math.inf, 0))
        if now - last < FAILURE_LOG_INTERVAL_S:
            self._failure_log[kind] = (last, quiet + 1)
            return
        if len(self._failure_log) > 1000:  # bounded: forget the kinds seen so far
            self._failure_log.clear()
        self._failure_log[kind] = (now, 0)
        log.warning("shadow failed", request_id=request_id, shadow=shadow, error=error, not_logged_since=quiet)

    def offer(self, primary: PrimaryResult) -> int:
        """Schedule the shadows of one answered request; returns how many shadows it matched.

        Never raises and never blocks. A return > 0 means the request is shadowed: its primary
        output will be published in a ShadowPrediction (see `criteria.log_primary`).
        """
        try:
            return self._offer(primary)
        except Exception:  # a bug here must never reach the caller's response
            self.internal_errors += 1
            log.exception("shadow offer failed", request_id=primary.request_id)
            return 0

    def offer_soon(self, primary: PrimaryResult) -> None:
        """`offer` on the next loop iteration: for callers that are about to write their response."""
        asyncio.get_running_loop().call_soon(self.offer, primary)

    def _offer(self, primary: PrimaryResult) -> int:
        self.offered += 1
        self.pressure.observe_latency(primary.latency_ms, time.monotonic())
        if not self.rules or self._closed:
            return 0
        at = primary.at if primary.at is not None else self._wall()
        view = RequestView(headers=primary.headers, params=primary.params, inputs=primary.inputs)
        targets = self.rules.match(primary.model, primary.version, primary.request_id, view, at)
        if not targets:
            return 0
        self.matched += len(targets)
        if self.pressure.paused:
            self.dropped_paused += len(targets)
            return len(targets)
        for t in targets:
            try:
                self._queue.put_nowait(_Job(primary, t, at))
                self.submitted += 1
            except asyncio.QueueFull:
                self.dropped_full += 1
        return len(targets)

    # --- the service ---------------------------------------------------------------------------------

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Run the workers and the probe until `stop()` (then drain) or cancellation."""
        cfg = self.config
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._worker(), name=f"shadow-worker-{i}") for i in range(cfg.workers)]
            tasks.append(tg.create_task(self._probe(), name="shadow-probe"))
            if ready is not None:
                ready.set()
            await self._stopping.wait()
            self._closed = True
            try:
                await wait_for(self._queue.join(), cfg.drain_timeout_s)
            except TimeoutError:
                log.warning("shadow jobs abandoned at stop", queued=self._queue.qsize())
            for t in tasks:
                t.cancel()

    def stop(self) -> None:
        """Stop taking work and drain (idempotent)."""
        self._closed = True
        self._stopping.set()

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.probe_interval_s
        window = self.config.limits.lag_window_s
        # (wall, CPU time of this thread): the probe runs on the loop's thread, so their ratio over
        # the window is the share of time the loop was busy rather than waiting for I/O.
        cpu: collections.deque[tuple[float, float]] = collections.deque([(time.monotonic(), time.thread_time())])
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.pressure.observe_lag(max(0.0, loop.time() - expected) * 1000.0, now)
            cpu.append((now, time.thread_time()))
            while len(cpu) > 2 and cpu[1][0] <= now - window:
                cpu.popleft()
            (w0, c0), (w1, c1) = cpu[0], cpu[-1]
            if w1 - w0 >= window / 2:
                self.pressure.observe_busy(min(1.0, (c1 - c0) / (w1 - w0)))
            self._check(now)

    def _check(self, now: float) -> None:
        tr = self.pressure.evaluate(now, self._queue.qsize())
        if tr is None:
            return
        if tr.state is State.PAUSED:
            shed = self._shed()
            # A warning only where there is shadow work to lose; without relations it is a fact for the metrics.
            emit = log.warning if self.rules else log.info
            emit("shadowing paused", reason=tr.reason, queue=tr.queue, loop_lag_ms=round(tr.lag_ms, 1),
                        primary_p99_ms=tr.p99_ms, loop_busy=tr.busy, shed=shed, pauses=self.pressure.pauses)
        else:
            log.info("shadowing resumed", reason=tr.reason, queue=tr.queue, loop_lag_ms=round(tr.lag_ms, 1),
                     primary_p99_ms=tr.p99_ms, loop_busy=tr.busy)

    def _shed(self) -> int:
        """Drop the queued jobs: under pressure, shadow work is the first to go."""
        shed = 0
        while True:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._queue.task_done()
            shed += 1
        self.dropped_paused += shed
        return shed

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                event = await self._run(job)
                self.completed += 1
                await self._publish(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # _run and _publish catch their own; this is a last line of defence
                self.internal_errors += 1
                log.exception("shadow worker error", request_id=job.primary.request_id)
            finally:
                self._queue.task_done()

    async def _inputs(self, job: _Job) -> Mapping[str, Any]:
        p = job.primary
        if self.features is None or p.entity is None or self._needs is None:
            return p.inputs
        needed = self._needs(job.target.model, job.target.version)
        if not needed:
            return p.inputs
        fetched = await self.features.fetch_missing(needed, p.inputs, p.entity)
        return {**p.inputs, **fetched} if fetched else p.inputs

    async def _run(self, job: _Job) -> ShadowPrediction:
        p, t = job.primary, job.target
        outputs: dict[str, Any] = {}
        latency = 0.0
        error: str | None = None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                inputs = await self._inputs(job)
                outputs, latency = await self._predict(t.model, t.version, inputs)
        except TimeoutError:
            self.errors += 1
            self.timeouts += 1
            latency = (time.perf_counter() - started) * 1000.0
            error = f"timeout: no answer within {self.config.timeout_s:g}s"
        except Exception as exc:  # the shadow's failure is data, not an incident
            self.errors += 1
            latency = (time.perf_counter() - started) * 1000.0
            error = f"{type(exc).__name__}: {exc}"
        primary_outputs = p.outputs
        if self._convert is not None:
            try:
                primary_outputs = self._convert(primary_outputs)
            except Exception as exc:  # keep the record: the shadow's side may still be worth comparing
                self.internal_errors += 1
                primary_outputs = {}
                log.warning("primary outputs not encodable", request_id=p.request_id, error=repr(exc))
            if error is None:
                try:
                    outputs = self._convert(outputs)
                except Exception as exc:  # a shadow answering with something unencodable is the shadow's error
                    self.errors += 1
                    outputs, error = {}, f"unencodable outputs: {type(exc).__name__}: {exc}"
        if error is not None:
            self._log_failure(f"{t.model}:{t.version}", error, p.request_id)
        return ShadowPrediction(
            request_id=p.request_id, primary_model=p.model, primary_version=p.version,
            shadow_model=t.model, shadow_version=t.version, primary_outputs=primary_outputs,
            shadow_outputs=outputs, primary_latency_ms=p.latency_ms, shadow_latency_ms=latency,
            shadow_error=error, node=self._node, at=job.at,
        )

    async def _publish(self, event: ShadowPrediction) -> None:
        try:
            result = self._emit(event)
            if inspect.isawaitable(result):
                result = await result
            if result is False:  # a bounded buffer that refused it (full): counted, not logged per event
                self.emit_errors += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            self.emit_errors += 1
            log.exception("shadow prediction not published", request_id=event.request_id)
