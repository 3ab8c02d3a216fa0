"""The deployment pipeline: validate → compile → serving-validation → publish, one request at a time.

`Pipeline.handle` is the consumer's handler for `modelcd.deploy-requests`; it knows nothing of
Kafka beyond the `EventSink` it publishes to. Each step emits DeploymentProgress `started`, then
`succeeded` / `failed` / `skipped` with its `duration_ms`; a deployment ends with exactly one
DeploymentCompleted or DeploymentFailed, then its record `deployments/<id>.json`. Progress is
published without waiting for each acknowledgement (`_Progress`); every other event first waits
for the progress before it, so no ModelState or ending is published ahead of an unacknowledged step.

Crash safety (the consumer commits a request only after `handle` returns, so a crash means the
request is handled again from the start):
- nothing reaches `packages/` or `targets/` before validation and serving validation passed;
- the package put is content-addressed and put-if-absent, so a second put is a no-op;
- the target state is put, then ModelState published: a crash between them is resumed by the
  redelivery (the target holds this deployment's id: publish again, complete);
- the record is written last; a request whose record exists is skipped;
- a staged upload (`uploads/<id>.tar`) is deleted once the deployment ended, either way.

Isolation: this process never loads or runs a model. It reads archives as bytes, off the event loop
and bounded (`reading.off_loop`, `read_package` with size, ratio and time limits); the structural
checks, compile and serving validation run in one sandbox child per deployment (`sandbox.py`), each
phase killed on its time limit, and the compiled archive the child hands back is read and compared
with the original again (`policy.check_compiled`).

Every request ends: bad input becomes DeploymentFailed with the reason at once; a transient
store/broker/source failure runs the request again with backoff (it is idempotent, see above)
for up to MODELCD_DEPLOY_RETRY_TIME, each attempt bounded by MODELCD_DEPLOY_TIMEOUT, then it
becomes DeploymentFailed naming the last error. Only a cancellation escapes `handle`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka.errors import KafkaError

from modelcd.events.codec import Envelope
from modelcd.events.schemas import (
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentProgress,
    DeployRequested,
    Event,
    ModelState,
    RetireRequested,
)
from modelcd.events.schemas.deployments import Step, StepStatus
from modelcd.logs import get_logger
from modelcd.settings import Settings
from modelcd.store.blobs import (
    Store, StoreError, StoreNotFound, StoreUnavailable, get_package, package_key, put_package,
)
from modelcd.store.package import Package, PackageError, read_package
from modelcd.store.safety import Unsafe, check_retire
from modelcd.store.targets import TargetState

from .api import EventSink, TrafficReader, retire_world
from .errors import (
    CompileFailed,
    DeploymentRejected,
    IngestError,
    ModelInUse,
    PackageUnavailable,
    UnknownModel,
    ValidationFailed,
    VersionConflict,
)
from .policy import (
    MAX_PICKUPS,
    UPLOAD_PREFIX,
    AcceptedRequest,
    Conflict,
    Decision,
    DeploymentRecord,
    Noop,
    Proceed,
    RecordStep,
    Resume,
    accepted_decoder,
    accepted_encoder,
    check_compiled,
    check_expiry,
    check_requested_sha,
    check_serving_needs,
    decide_deploy,
    manifest_differences,
    model_state_for,
    parse_file_dirs,
    parse_package_uri,
    record_decoder,
    record_encoder,
    record_key,
    request_key,
    retired_state,
)
from .reading import OffLoopTimeout, TooLarge, Unreadable, off_loop, read_regular_file
from .sandbox import Sandbox, SandboxJob

log = get_logger("modelcd.ingest.pipeline")

RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 15.0
GIVE_UP_WRITE_S = 10.0  # each last write of a failed deployment, so a hung store cannot hold the request


def _transient(exc: BaseException) -> bool:
    """Whether the same request may succeed later: the store, the broker or the network failed."""
    if isinstance(exc, StoreError | IngestError):
        return exc.retriable
    return isinstance(exc, KafkaError | OSError | TimeoutError)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class _Progress:
    """The pipeline's sink: progress is queued without waiting for its acknowledgement, any other event is not.

    A deployment emits about a dozen DeploymentProgress events; waiting for the broker's ack of each
    cost ~100 ms of every deployment. `publish` (a ModelState, an ending) first waits for the progress
    queued before it and raises the first error among them, so the request is retried as for any
    broker failure, and nothing is published ahead of the steps that led to it.
    """

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._pending: list[asyncio.Future[Any]] = []

    async def progress(self, event: Event) -> None:
        nowait = getattr(self.sink, "publish_nowait", None)
        if nowait is None:  # a sink that only publishes (tests' fakes)
            await self.sink.publish(event)
            return
        self._pending.append(await nowait(event))

    async def settle(self) -> None:
        pending, self._pending = self._pending, []
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def publish(self, event: Event, *, event_id: str | None = None) -> None:
        await self.settle()
        await self.sink.publish(event, event_id=event_id)


@dataclass
class _Run:
    """One deployment in progress: emits its events with the model it learned and the step timings."""

    sink: _Progress
    deployment_id: str
    model: str = ""
    version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    step_now: Step = "accepted"
    # Each step as it last stood, in first-seen order: the record keeps them (the topic may lose them).
    steps: dict[str, RecordStep] = field(default_factory=dict)

    async def emit(self, step: Step, status: StepStatus, detail: str = "", duration_ms: float | None = None) -> None:
        self.steps[step] = RecordStep(step=step, status=status, detail=detail, duration_ms=duration_ms,
                                      at=time.time())
        await self.sink.progress(DeploymentProgress(deployment_id=self.deployment_id, model=self.model,
                                                   version=self.version, step=step, status=status,
                                                   detail=detail, duration_ms=duration_ms))

    @asynccontextmanager
    async def step(self, step: Step) -> AsyncIterator[dict[str, str]]:
        """Emit `started`, run the body, emit `succeeded` (with `out["detail"]`) or `failed`, timed."""
        self.step_now = step
        await self.emit(step, "started")
        out: dict[str, str] = {"detail": ""}
        t0 = time.perf_counter()
        try:
            yield out
        except DeploymentRejected as exc:
            ms = (time.perf_counter() - t0) * 1000
            self.timings_ms[step] = ms
            exc.step = step
            await self.emit(step, "failed", exc.reason, ms)
            raise
        ms = (time.perf_counter() - t0) * 1000
        self.timings_ms[step] = ms
        log.info("step done", step=step, ms=round(ms, 2), detail=out["detail"])
        await self.emit(step, "succeeded", out["detail"], ms)


class Pipeline:
    """Turns deploy and retire requests into validated, published model states."""

    def __init__(self, settings: Settings, store: Store, sink: EventSink, sandbox: Sandbox, *,
                 instance: str = "ingest", traffic: TrafficReader | None = None) -> None:
        self.settings = settings
        self.traffic = traffic  # the traffic topic, for the rollouts in progress the safety check protects
        self.store = store
        self.targets = TargetState(store)
        self.sink = _Progress(sink)
        self.sandbox = sandbox
        self.instance = instance
        self._runs: dict[str, _Run] = {}  # the request in hand (one per consumer), for its record's steps
        self.counters: dict[str, int] = {"completed": 0, "noop": 0, "failed": 0, "resumed": 0, "skipped": 0,
                                         "retried": 0}

    async def handle(self, event: Event, env: Envelope) -> None:
        """The consumer's handler: one request, start to end; it always ends the deployment.

        A transient failure (store, broker, package source unreachable, `retriable` errors) runs the
        request again with exponential backoff for up to `deploy_retry_time` seconds, each attempt
        bounded by `deploy_timeout`; then the deployment fails with the last error as its reason. So
        `handle` returns for every request (the consumer commits it), and only a cancellation (the
        service stopping) leaves a request unfinished, to be handled again after the restart.
        """
        match event:
            case DeployRequested() | RetireRequested():
                with structlog.contextvars.bound_contextvars(deployment_id=event.deployment_id):
                    await self._until_ended(event)
            case _:
                log.warning("ignored event", event_type=env.type)

    async def _until_ended(self, req: DeployRequested | RetireRequested) -> None:
        started = time.monotonic()
        delay = RETRY_FIRST_DELAY_S
        attempt = 0
        picked_up = False
        while True:
            attempt += 1
            run = _Run(self.sink, req.deployment_id, model=req.model,
                       version=req.version if isinstance(req, RetireRequested) else "")
            self._runs[req.deployment_id] = run
            try:
                if not picked_up:
                    crashed = await self._pick_up(req)
                    picked_up = True
                    if crashed:
                        await self._give_up(req, run, crashed)
                        return
                async with asyncio.timeout(self.settings.deploy_timeout):
                    if isinstance(req, DeployRequested):
                        await self.deploy(req, run)
                    else:
                        await self.retire(req, run)
                await self._ended(req)
                return
            except TimeoutError:
                await self._give_up(req, run, f"took longer than {self.settings.deploy_timeout:g} s in step "
                                              f"{run.step_now} (MODELCD_DEPLOY_TIMEOUT); deploy again, or raise "
                                              "the limit for large models")
                return
            except Exception as exc:
                if not _transient(exc):
                    raise  # a bug in the give-up path itself; the consumer logs it
                elapsed = time.monotonic() - started
                if elapsed + delay > self.settings.deploy_retry_time:
                    await self._give_up(req, run, (
                        f"gave up after {attempt} attempts over {elapsed:.0f} s (MODELCD_DEPLOY_RETRY_TIME): "
                        f"{_describe(exc)}; check that the store, the broker and the package location are "
                        "reachable, then deploy again"))
                    return
                self.counters["retried"] += 1
                log.warning("transient failure; retrying the request", attempt=attempt, step=run.step_now,
                            retry_in_s=round(delay, 2), error=_describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY_S)

    async def _give_up(self, req: DeployRequested | RetireRequested, run: _Run, reason: str) -> None:
        """End the deployment failed with `reason`, as far as the store and broker let us.

        Each write is tried on its own: with the broker down the record still lands in the store
        (which the API answers from), with the store down the event still reaches the tracker.
        """
        step = run.step_now
        kind: Any = "retire" if isinstance(req, RetireRequested) else "deploy"
        writes = [
            ("step", run.emit(step, "failed", reason)),
            ("event", self.sink.publish(DeploymentFailed(deployment_id=req.deployment_id, model=run.model,
                                                         version=run.version, step=step, reason=reason))),
            ("record", self._record(DeploymentRecord(
                deployment_id=req.deployment_id, kind=kind, status="failed", model=run.model, version=run.version,
                failed_step=step, reason=reason, timings_ms=dict(run.timings_ms), requested_at=req.requested_at,
                finished_at=time.time()))),
        ]
        if isinstance(req, DeployRequested):
            writes.append(("upload", self._drop_upload(req)))
        writes.append(("request", self._ended(req)))
        for what, write in writes:
            try:
                async with asyncio.timeout(GIVE_UP_WRITE_S):
                    await write
            except Exception as exc:  # noqa: BLE001 - the others are still worth trying
                log.error("could not write the failed deployment", what=what, error=_describe(exc))
        self.counters["failed"] += 1
        log.warning("deployment failed", step=step, reason=reason, model=run.model, version=run.version)

    # --- deploy ------------------------------------------------------------------------------------

    async def deploy(self, req: DeployRequested, run: _Run | None = None) -> None:
        if await self._finished(req.deployment_id):
            return
        run = run or _Run(self.sink, req.deployment_id, model=req.model)
        started = time.perf_counter()
        sha = ""
        job: SandboxJob | None = None
        await run.emit("accepted", "succeeded", f"picked up by {self.instance}")
        try:
            try:
                async with run.step("validate") as out:
                    try:
                        check_expiry(req.expiry_seconds)
                    except ValueError as exc:
                        raise ValidationFailed(str(exc)) from None
                    data = await self._fetch(req)
                    sha, pkg = await self._read(data)
                    check_requested_sha(req.sha256, sha)
                    check_serving_needs(pkg.manifest)
                    if req.model and req.model != pkg.manifest.name:
                        raise ValidationFailed(f"the request is for model {req.model!r}, but the package is "
                                               f"{pkg.manifest.name!r}")
                    run.model, run.version = pkg.manifest.name, pkg.manifest.version
                    existing = await self.targets.get_model(run.model, run.version)
                    decision = decide_deploy(existing, await self._source_sha(existing), sha, req.deployment_id)
                    if isinstance(decision, Conflict):
                        assert existing is not None
                        decision = await self._same_content(decision, existing, pkg, sha, req)
                    out["detail"] = (f"{pkg.manifest.flavor} package {sha[:12]}, {len(data)} bytes, "
                                     f"{len(pkg.manifest.files)} files")
                    if isinstance(decision, Proceed):
                        # From here on model files are handled by the sandbox child only: the structural
                        # checks, compile and serving validation run there, each phase on its own clock.
                        job = await self.sandbox.start(pkg.data, compile=self.settings.compile_onnx,
                                                       checks=self.settings.structural_checks)
                        out["detail"] += f"; {await job.checked()}"
                if isinstance(decision, Noop | Resume):
                    await self._shortcut(run, req, decision, sha, started)
                    return
                assert isinstance(decision, Proceed) and job is not None

                async with run.step("compile") as out:
                    outcome = await job.compiled()
                    built = pkg.built()
                    if outcome.data is not None:
                        compiled = await self._read_compiled(outcome.data)
                        check_compiled(pkg, compiled)
                        built = compiled.built()
                    out["detail"] = outcome.reason
                    runtime = built.manifest.runtime

                async with run.step("serving-validation") as out:
                    report = await job.validated()
                    out["detail"] = (f"{report.runtime}: outputs match on {report.samples} samples; "
                                     f"load {report.load_ms:.0f} ms, predict {report.predict_us:.0f} us, "
                                     f"memory {report.memory_bytes // 1024} KiB")
                await job.close()

                async with run.step("publish") as out:
                    stored_sha = await put_package(self.store, built.data)
                    key = package_key(stored_sha)
                    state = model_state_for(pkg.manifest, req, package_key=key, sha256=stored_sha, runtime=runtime,
                                            resources=report.resources(), now=time.time())
                    # Target first, then the event: the store is the truth a node reconciles against,
                    # and a crash between the two is resumed by the redelivery. A new name:version is
                    # created only if still absent: the immutability check above ran before compile and
                    # validation, and another instance may have deployed it since.
                    if existing is not None or not await self.targets.create_model(state):
                        current = await self.targets.get_model(state.name, state.version)
                        again = decide_deploy(current, await self._source_sha(current), sha, req.deployment_id)
                        if isinstance(again, Conflict):
                            # Its archive names this name:version, so no other target can refer to it.
                            await self.store.delete(key)
                            raise VersionConflict(again.reason)
                        await self.targets.put_model(state)
                    await self.sink.publish(state)
                    out["detail"] = f"{state.name}:{state.version} serving from {state.package_uri}"
            except DeploymentRejected:
                raise
            except StoreError as exc:
                if exc.retriable:
                    raise  # the consumer handles the request again
                raise DeploymentRejected(f"the store refused: {exc}", step=run.step_now) from exc
            except (asyncio.CancelledError, KafkaError):
                raise
            except Exception as exc:
                # A bug or a library failing in a way we did not foresee: end the deployment with the
                # reason rather than leave it running forever after the consumer's retries.
                log.exception("unexpected error in the pipeline", step=run.step_now)
                raise DeploymentRejected(f"internal error in step {run.step_now}: {type(exc).__name__}: {exc}",
                                         step=run.step_now) from exc
        except DeploymentRejected as exc:
            await self._fail(run, req, exc, sha, started)
            return
        finally:
            if job is not None:
                await job.close()  # the child is killed whatever happened (a cancel, a failure, a bug)
        timings = {**run.timings_ms, "total": (time.perf_counter() - started) * 1000}
        await self.sink.publish(DeploymentCompleted(deployment_id=req.deployment_id, model=run.model,
                                                    version=run.version, sha256=stored_sha, runtime=runtime,
                                                    timings_ms=timings))
        await self._record(DeploymentRecord(deployment_id=req.deployment_id, status="completed", model=run.model,
                                            version=run.version, sha256=stored_sha, source_sha256=sha,
                                            runtime=runtime, timings_ms=timings, requested_at=req.requested_at,
                                            finished_at=time.time()))
        await self._drop_upload(req)
        self.counters["completed"] += 1
        log.info("deployment completed", model=run.model, version=run.version, sha256=stored_sha,
                 runtime=runtime, ms=round(timings["total"], 1))

    async def _shortcut(self, run: _Run, req: DeployRequested, decision: Noop | Resume, sha: str,
                        started: float) -> None:
        """An identical package already serves (no-op), or this deployment already wrote its target (resume)."""
        existing = decision.existing
        if isinstance(decision, Noop):
            why = f"identical package already serving (deployment {existing.deployment_id})"
            for step in ("compile", "serving-validation", "publish"):
                await run.emit(step, "skipped", why)  # type: ignore[arg-type]
        else:
            why = "resumed: the target state was written before a restart; publishing it again"
            for step in ("compile", "serving-validation"):
                await run.emit(step, "skipped", why)  # type: ignore[arg-type]
            async with run.step("publish") as out:
                await self.sink.publish(existing)
                out["detail"] = why
        timings = {**run.timings_ms, "total": (time.perf_counter() - started) * 1000}
        noop = isinstance(decision, Noop)
        await self.sink.publish(DeploymentCompleted(
            deployment_id=req.deployment_id, model=existing.name, version=existing.version, sha256=existing.sha256,
            runtime=existing.runtime, noop=noop, existing_deployment_id=existing.deployment_id if noop else None,
            timings_ms=timings))
        await self._record(DeploymentRecord(
            deployment_id=req.deployment_id, status="completed", model=existing.name, version=existing.version,
            sha256=existing.sha256, source_sha256=sha, runtime=existing.runtime, noop=noop,
            existing_deployment_id=existing.deployment_id if noop else None, timings_ms=timings,
            requested_at=req.requested_at, finished_at=time.time()))
        await self._drop_upload(req)
        self.counters["noop" if noop else "resumed"] += 1
        log.info("deployment completed without changes" if noop else "deployment resumed",
                 model=existing.name, version=existing.version)

    async def _fail(self, run: _Run, req: DeployRequested, exc: DeploymentRejected, sha: str, started: float) -> None:
        await self.sink.publish(DeploymentFailed(deployment_id=req.deployment_id, model=run.model,
                                                 version=run.version, step=exc.step, reason=exc.reason))
        await self._record(DeploymentRecord(
            deployment_id=req.deployment_id, status="failed", model=run.model, version=run.version,
            source_sha256=sha, failed_step=exc.step, reason=exc.reason,
            timings_ms={**run.timings_ms, "total": (time.perf_counter() - started) * 1000},
            requested_at=req.requested_at, finished_at=time.time()))
        await self._drop_upload(req)
        self.counters["failed"] += 1
        log.warning("deployment failed", step=exc.step, reason=exc.reason, model=run.model, version=run.version)

    # --- retire ------------------------------------------------------------------------------------

    async def retire(self, req: RetireRequested, run: _Run | None = None) -> None:
        if await self._finished(req.deployment_id):
            return
        run = run or _Run(self.sink, req.deployment_id, model=req.model, version=req.version)
        started = time.perf_counter()
        await run.emit("accepted", "succeeded", f"picked up by {self.instance}")
        try:
            async with run.step("retire") as out:
                existing = await self.targets.get_model(req.model, req.version)
                if existing is None:
                    raise UnknownModel(f"no model {req.model}:{req.version} in the target state; "
                                       "`modelcd models` lists the deployed ones")
                noop = existing.target == "retired"
                if not noop:
                    # The same check the API made, again here: the auto-retirement processor publishes
                    # straight to the topic, and the traffic may have changed since the API answered.
                    try:
                        check_retire(f"{req.model}:{req.version}", await retire_world(self.targets, self.traffic),
                                     force=req.force, force_hint=f"modelcd retire {req.model} {req.version} --force")
                    except Unsafe as exc:
                        raise ModelInUse(str(exc)) from None
                state = existing if noop else retired_state(existing, req.reason, time.time())
                if not noop:
                    await self.targets.put_model(state)
                # Published again when already retired: harmless (last write wins) and it finishes a
                # retirement that crashed between the target put and the event.
                await self.sink.publish(state)
                out["detail"] = "already retired" if noop else f"retired: {state.reason}"
        except DeploymentRejected as exc:
            await self.sink.publish(DeploymentFailed(deployment_id=req.deployment_id, model=req.model,
                                                     version=req.version, step="retire", reason=exc.reason))
            await self._record(DeploymentRecord(deployment_id=req.deployment_id, kind="retire", status="failed",
                                                model=req.model, version=req.version, failed_step="retire",
                                                reason=exc.reason, requested_at=req.requested_at,
                                                finished_at=time.time()))
            self.counters["failed"] += 1
            log.warning("retirement failed", reason=exc.reason)
            return
        timings = {**run.timings_ms, "total": (time.perf_counter() - started) * 1000}
        await self.sink.publish(DeploymentCompleted(deployment_id=req.deployment_id, model=req.model,
                                                    version=req.version, sha256=state.sha256, runtime=state.runtime,
                                                    noop=noop, timings_ms=timings))
        await self._record(DeploymentRecord(deployment_id=req.deployment_id, kind="retire", status="completed",
                                            model=req.model, version=req.version, sha256=state.sha256, noop=noop,
                                            timings_ms=timings, requested_at=req.requested_at,
                                            finished_at=time.time()))
        self.counters["noop" if noop else "completed"] += 1
        log.info("model retired", model=req.model, version=req.version, noop=noop)

    # --- I/O helpers -------------------------------------------------------------------------------

    async def _finished(self, deployment_id: str) -> bool:
        if await self.store.exists(record_key(deployment_id)):
            self.counters["skipped"] += 1
            log.info("request already handled to its end; redelivery ignored")
            return True
        return False

    async def _record(self, record: DeploymentRecord) -> None:
        run = self._runs.get(record.deployment_id)
        if run is not None and not record.steps:
            record.steps = list(run.steps.values())
        await self.store.put(record_key(record.deployment_id), record_encoder.encode(record))

    async def _pick_up(self, req: DeployRequested | RetireRequested) -> str:
        """Count this pickup in `requests/<id>.json` (written here if the request came straight from the
        topic); returns why to fail it at once when it was picked up MAX_PICKUPS times without ending."""
        if await self.store.exists(record_key(req.deployment_id)):
            return ""  # ended before; `deploy`/`retire` skip it
        try:
            accepted = accepted_decoder.decode(await self.store.get(request_key(req.deployment_id)))
        except StoreNotFound:
            accepted = AcceptedRequest(request=req, accepted_at=req.requested_at or time.time())
        except ValueError:  # unreadable marker: start counting again
            accepted = AcceptedRequest(request=req, accepted_at=req.requested_at or time.time())
        if accepted.pickups >= MAX_PICKUPS:
            return (f"ingest stopped {accepted.pickups} times while handling this deployment (it may crash or "
                    "exhaust the ingest process); see the ingest log, fix the package and deploy again")
        accepted.pickups += 1
        await self.store.put(request_key(req.deployment_id), accepted_encoder.encode(accepted))
        return ""

    async def _ended(self, req: DeployRequested | RetireRequested) -> None:
        await self.store.delete(request_key(req.deployment_id))
        self._runs.pop(req.deployment_id, None)

    async def _same_content(self, conflict: Conflict, existing: ModelState, pkg: Package, sha: str,
                            req: DeployRequested) -> Decision:
        """Another archive under a taken name:version: a no-op when it holds the same files (re-packed),
        else a VersionConflict naming both package ids and what differs."""
        try:
            _, held = await self._read(await get_package(self.store, existing.sha256))
            diffs = manifest_differences(pkg.manifest, held.manifest)
        except Exception as exc:  # noqa: BLE001 - the comparison only improves the message
            log.warning("could not compare with the existing package", sha256=existing.sha256, error=repr(exc))
            diffs = None
        if diffs == [] and existing.target == "serving":
            return decide_deploy(existing, None, existing.sha256, req.deployment_id)  # the same package: a no-op
        what = ("the files are the same (only the archive differs), but it is retired: deploy it under a new "
                "version" if diffs == [] else f"it differs: {'; '.join(diffs)}" if diffs else "")
        raise VersionConflict(f"{conflict.reason}. This archive is package {sha[:12]}"
                              + (f" and {what}" if what else ""))

    async def _source_sha(self, existing: ModelState | None) -> str | None:
        if existing is None or not existing.deployment_id:
            return None
        try:
            return record_decoder.decode(await self.store.get(record_key(existing.deployment_id))).source_sha256
        except (StoreNotFound, ValueError):
            return None

    async def _drop_upload(self, req: DeployRequested) -> None:
        # Only what the API staged: a package a user points at (store:packages/.., s3://, file://) is theirs.
        key = req.package_uri.removeprefix("store:")
        if req.package_uri.startswith("store:") and key.startswith(UPLOAD_PREFIX):
            await self.store.delete(key)

    async def _read(self, data: bytes) -> tuple[str, Package]:
        """sha256 and the checked package, off the loop, bounded in size, gzip ratio and time."""
        s = self.settings
        timeout = s.package_read_timeout

        def read() -> tuple[str, Package]:
            deadline = time.monotonic() + timeout
            return hashlib.sha256(data).hexdigest(), read_package(
                data, max_member_bytes=s.max_package_bytes, max_total_bytes=s.max_package_bytes,
                max_ratio=s.max_package_ratio, deadline=deadline)

        try:
            return await off_loop(read, timeout=timeout + 5, name="package-read")
        except PackageError as exc:
            raise ValidationFailed(f"invalid package: {exc.reason}") from None
        except OffLoopTimeout:
            raise ValidationFailed(f"reading the package took longer than {timeout:g} s "
                                   "(MODELCD_PACKAGE_READ_TIMEOUT)") from None

    async def _read_compiled(self, data: bytes) -> Package:
        limit = 2 * self.settings.max_package_bytes
        try:
            return await off_loop(lambda: read_package(data, max_member_bytes=limit, max_total_bytes=limit),
                                  timeout=self.settings.package_read_timeout, name="compiled-read")
        except (PackageError, OffLoopTimeout) as exc:
            raise CompileFailed(f"the compiled package is invalid: {exc}") from None

    async def _fetch(self, req: DeployRequested) -> bytes:
        """The archive's bytes, bounded by MODELCD_MAX_UPLOAD_BYTES, or PackageUnavailable / ValidationFailed.

        A file:// URI names a regular file, read within MODELCD_PACKAGE_READ_TIMEOUT; one that came through
        the HTTP door must lie under MODELCD_FILE_URI_DIRS, and its errors say nothing about the host."""
        uri = req.package_uri
        limit = self.settings.max_upload_bytes
        try:
            source = parse_package_uri(uri)
        except ValueError as exc:
            raise ValidationFailed(str(exc)) from None
        if source.scheme == "store":
            try:
                data = await self.store.get(source.location)
            except StoreNotFound:
                raise PackageUnavailable(f"no package at {uri} in the store {self.store.url}") from None
            except ValueError as exc:
                raise ValidationFailed(f"package_uri {uri!r}: {exc}") from None
        elif source.scheme == "file":
            dirs = parse_file_dirs(self.settings.file_uri_dirs) if req.requested_by == "api" else None
            timeout = self.settings.package_read_timeout
            try:
                data = await off_loop(read_regular_file, source.location, limit, dirs, timeout=timeout,
                                      name="file-read")
            except TooLarge as exc:
                raise ValidationFailed(exc.reason) from None
            except Unreadable as exc:
                raise PackageUnavailable(f"package_uri {uri}: {exc.reason}") from None
            except OffLoopTimeout:
                raise PackageUnavailable(f"package_uri {uri}: " + (
                    "no package archive ingest may read at this path" if dirs is not None else
                    f"reading it took longer than {timeout:g} s (MODELCD_PACKAGE_READ_TIMEOUT)")) from None
        else:
            timeout = self.settings.package_read_timeout
            try:
                async with asyncio.timeout(timeout):
                    data = await _read_s3(source.bucket, source.location, self.settings.s3_endpoint_url, limit)
            except TimeoutError:
                # Retriable (S3 may be slow for a while), and not the deployment's own MODELCD_DEPLOY_TIMEOUT.
                raise StoreUnavailable(f"reading {uri} took longer than {timeout:g} s "
                                       "(MODELCD_PACKAGE_READ_TIMEOUT)") from None
        if len(data) > limit:
            raise ValidationFailed(f"archive too large: {len(data)} bytes, the limit is {limit} "
                                   "(MODELCD_MAX_UPLOAD_BYTES)")
        return data


async def _read_s3(bucket: str, key: str, endpoint_url: str | None, limit: int) -> bytes:
    import aioboto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    session = aioboto3.Session()
    try:
        async with session.client("s3", endpoint_url=endpoint_url) as s3:
            head: dict[str, Any] = await s3.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength", 0)) > limit:
                raise ValidationFailed(f"archive too large: {head['ContentLength']} bytes, the limit is {limit} "
                                       "(MODELCD_MAX_UPLOAD_BYTES)")
            resp = await s3.get_object(Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data  # its size is checked by the caller (the object may have grown since the head)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise PackageUnavailable(f"no object s3://{bucket}/{key}") from None
        if code in ("AccessDenied", "403"):
            raise PackageUnavailable(f"ingest may not read s3://{bucket}/{key} (access denied)") from None
        if status >= 500:
            raise StoreUnavailable(f"S3 unavailable for s3://{bucket}/{key}: {code}") from exc
        raise PackageUnavailable(f"cannot read s3://{bucket}/{key}: {code}") from None
    except (NoCredentialsError, PartialCredentialsError):
        # Waiting does not bring credentials: fail now, saying what to set.
        raise PackageUnavailable(f"ingest has no AWS credentials to read s3://{bucket}/{key}: give the ingest "
                                 "process AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or role), "
                                 "or upload the package instead") from None
    except BotoCoreError as exc:
        raise StoreUnavailable(f"S3 unreachable for s3://{bucket}/{key}: {exc}") from exc

