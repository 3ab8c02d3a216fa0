"""The models of one node: what should serve, what is loaded, loading under the memory budget, predicting.

Owns every `ModelEntry` (one per `name:version` whose target is serving) and the
compiled traffic policies. The node's state follower and reconciler tell it what
should serve (`apply_model`, `apply_traffic`, `reconcile`); requests ask it for a
model (`resolve`, `acquire`) and a prediction (`predict`).

Invariants:
- a request holds its own reference to the loaded model (`Loaded`), so unloading,
  evicting or swapping a version never fails a request already past `acquire`;
- a version is unloaded only after the name has another ready version, when one is
  on its way (load new before unloading old: a version swap fails no request);
- resident bytes (ready models plus reservations of loads in progress) never exceed
  the budget: a load reserves first, evicting least-recently-used models (budget.py);
- a model that fails to load or to predict answers its own requests with the reason
  and touches nothing else; model code never runs in this process: each loaded model
  has its own worker process (workers.py), so a crash, a hang or a memory blow-up costs
  that model its worker, never the node or another model;
- a worker that dies (or is killed for not answering within the prediction timeout)
  fails its calls with 503 and the reason; its model restarts after a backoff, and a
  model that takes its worker down MODELCD_WORKER_CRASH_LIMIT times within
  MODELCD_WORKER_CRASH_WINDOW seconds is quarantined on this node (503 with the reason,
  a ModelHealth event, `modelcd_model_quarantined`) until a new package is deployed;
- load tasks are created in the node's TaskGroup (`spawn`), never left unowned.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelcd.events.schemas import LoadedModel, ModelHealth, ModelState, Route, TrafficPolicy
from modelcd.logs import get_logger
from modelcd.settings import Settings
from modelcd.store.package import Manifest, Package, Samples

from .budget import Resident, estimate_size, plan_eviction
from .cache import PackageCache
from .desired import Known, plan_reconcile
from .errors import InvalidRequest, ModelBusy, ModelNotFound, ModelUnavailable, PredictFailed, PredictTimeout
from .metrics import ModelMetrics, NodeMetrics
from .protocol import TensorCodec, TensorSpec, encode
from .quarantine import CrashHistory
from .router import CompiledPolicy, compile_policy
from .telemetry import Telemetry, UsageCounter
from .worker_main import default_loader
from .workers import Worker, WorkerDied, WorkerError, Zygote

log = get_logger("modelcd.serving.registry")

Status = Literal["unloaded", "queued", "loading", "ready", "failed", "restarting", "quarantined"]
Arrays = dict[str, np.ndarray]
RuntimeLoader = Callable[[Package], Any]  # -> a runtime with predict(dict[str, ndarray]) -> dict[str, ndarray]
Spawn = Callable[[Coroutine[Any, Any, None]], Any]

TIMING_RUNS = 7


def loader_spec(loader: RuntimeLoader) -> str:
    """'module:qualname' of a loader, which the worker process imports: only module-level functions qualify."""
    module, qualname = getattr(loader, "__module__", None), getattr(loader, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(f"the model loader {loader!r} must be a module-level function: model workers import it")
    from .worker_main import resolve

    try:
        found = resolve(f"{module}:{qualname}")
    except (ImportError, AttributeError):
        found = None
    if found is not loader:
        raise ValueError(f"the model loader {module}:{qualname} cannot be imported by name: model workers import it")
    return f"{module}:{qualname}"


def _outputs_match(expected: Mapping[str, Any], actual: Mapping[str, Any], tolerance: float) -> str | None:
    from modelcd.runtimes.flavors import outputs_match

    return outputs_match(expected, actual, tolerance)


@dataclass(frozen=True, slots=True, eq=False)
class Loaded:
    """One successful load of a model: everything its requests need, computed once."""

    worker: Worker  # the process the model runs in
    manifest: Manifest
    codec: TensorCodec
    samples: Samples
    size: int
    predict_s: float  # predict time on the sample data, worker round trip included (fastest warm run)
    metadata: bytes  # GET /v2/models/{name}/versions/{version}


class ModelEntry:
    """One `name:version` that should serve on this node, loaded or not."""

    __slots__ = ("key", "name", "version", "state", "order", "status", "error", "loaded", "size", "last_used",
                 "retired", "future", "threads", "usage", "metrics", "failed_at", "evicted", "crashes")

    def __init__(self, state: ModelState, usage: UsageCounter, metrics: ModelMetrics) -> None:
        self.key = state.key()
        self.name = state.name
        self.version = state.version
        self.state = state
        self.order = (state.deployed_at or state.at, state.version)  # newest first when sorted descending
        self.status: Status = "unloaded"
        self.error: str | None = None
        self.loaded: Loaded | None = None
        self.size = state.resources.memory_bytes
        self.last_used = 0.0
        self.retired = False  # retired, but kept until a newer version of its name is ready
        self.future: asyncio.Future[Loaded] | None = None
        self.threads = 0  # predictions of this model in flight (sent to its worker, not answered yet)
        self.crashes = CrashHistory()  # its worker's deaths on this node, for restart backoff and quarantine
        self.usage = usage
        self.metrics = metrics
        self.failed_at = 0.0
        self.evicted = False  # unloaded for the budget: answers again after a reload from the local cache

    def describe(self) -> LoadedModel:
        # `state` keeps the values old readers know; `quarantined` and `restarts` say the rest.
        state = {"queued": "loading", "restarting": "loading", "quarantined": "failed"}.get(self.status, self.status)
        return LoadedModel(name=self.name, version=self.version, sha256=self.state.sha256,
                           state=state,  # type: ignore[arg-type]
                           memory_bytes=self.size if self.status in ("ready", "loading") else 0, error=self.error,
                           quarantined=self.status == "quarantined", restarts=self.crashes.total)


class Registry:
    def __init__(self, settings: Settings, *, node: str, cache: PackageCache, metrics: NodeMetrics,
                 telemetry: Telemetry, loader: RuntimeLoader = default_loader) -> None:
        self.settings = settings
        self.node = node
        self.cache = cache
        self.metrics = metrics
        self.telemetry = telemetry
        self.loader = loader
        self.loader_spec = loader_spec(loader)
        self.entries: dict[str, ModelEntry] = {}
        self.by_name: dict[str, list[ModelEntry]] = {}
        self.policies: dict[str, CompiledPolicy] = {}
        self.eager = False  # after start-up, new deployments load at once
        self._known_models: dict[str, Known[ModelState]] = {}
        self._known_traffic: dict[str, Known[TrafficPolicy]] = {}
        self._reserved: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._load_sem = asyncio.Semaphore(max(1, settings.load_concurrency))
        # Workers write only in private directories under a fresh one (Landlock): nothing of the node's is theirs.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"modelcd-workers-{_safe(node)}-"))
        self.workdir.chmod(0o711)
        # Spare workers hold no model but cost a worker each: their room comes off the models' budget (none
        # when that would leave no room for one model's worker).
        spares = max(0, settings.worker_spares)
        if settings.memory_budget < (spares + 1) * settings.model_overhead:
            spares = 0
        self.spare_reserve = spares * settings.model_overhead
        self.budget = settings.memory_budget - self.spare_reserve
        limits = {"memory": settings.worker_memory, "nice": settings.worker_nice, "spawn": settings.worker_spawn,
                  "batch": settings.worker_batch}
        self.zygote = Zygote(self.workdir, threads=settings.worker_threads, limits=limits, spares=spares)
        self._spawn: Spawn | None = None

    def start(self, spawn: Spawn) -> None:
        self._spawn = spawn

    async def aclose(self) -> None:
        """Stop every worker (and the zygote): no model process outlives the node."""
        for entry in self.entries.values():
            loaded, entry.loaded = entry.loaded, None
            if loaded is not None:
                loaded.worker.kill("the node stopped")
        await self.zygote.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ desired state

    def apply_model(self, state: ModelState, *, received: float | None = None) -> None:
        """A model-state event (or a repaired one): load, reload or retire accordingly."""
        key = state.key()
        known = self._known_models.get(key)
        if known is not None and known.state.at > state.at:
            return  # an older event replayed after a newer one: last write by time wins
        self._known_models[key] = Known(state, time.monotonic() if received is None else received)
        if state.target == "serving":
            self._upsert(state)
        else:
            entry = self.entries.get(key)
            if entry is not None:
                self._retire(entry, state.reason or "retired")

    def apply_traffic(self, policy: TrafficPolicy, *, received: float | None = None) -> None:
        known = self._known_traffic.get(policy.endpoint)
        if known is not None and (known.state.at, known.state.revision) > (policy.at, policy.revision):
            return
        self._known_traffic[policy.endpoint] = Known(policy, time.monotonic() if received is None else received)
        compiled = compile_policy(policy)
        if compiled is None:
            self.policies.pop(policy.endpoint, None)
        else:
            self.policies[policy.endpoint] = compiled

    def reconcile(self, models: Iterable[ModelState], traffic: Iterable[TrafficPolicy], started: float) -> int:
        """Repair the difference with a snapshot of the store's target state; returns the changes made."""
        changes = 0
        plan = plan_reconcile(self._known_models, models, started)
        for key in plan.drop:
            known = self._known_models.pop(key)
            entry = self.entries.get(key)
            if entry is not None:
                self._retire(entry, "not in the target state")
                changes += 1
            log.info("target state dropped a model", key=key, target=known.state.target)
        for state in plan.apply:
            self.apply_model(state)
            changes += 1
        tplan = plan_reconcile(self._known_traffic, traffic, started)
        for endpoint in tplan.drop:
            self._known_traffic.pop(endpoint, None)
            self.policies.pop(endpoint, None)
            changes += 1
        for policy in tplan.apply:
            self.apply_traffic(policy)
            changes += 1
        # What should serve but is missing or failed gets another chance once per period.
        for key, known in self._known_models.items():
            if known.state.target == "serving":
                entry = self.entries.get(key)
                if entry is None:
                    self._upsert(known.state)
                    changes += 1
                elif entry.status == "failed":
                    entry.status, entry.error = "unloaded", None
                    if self.eager:
                        self._schedule_load(entry)
        return changes

    def desired_shas(self) -> set[str]:
        return {e.state.sha256 for e in self.entries.values() if e.state.sha256}

    def _upsert(self, state: ModelState) -> None:
        entry = self.entries.get(state.key())
        if entry is not None:
            if entry.state.sha256 == state.sha256 and not entry.retired:
                entry.state = state  # same package: nothing to reload (owner, expiry, pinned may change)
                return
            self._remove(entry)  # a different package under the same name:version: replace it
        m = self.metrics.for_model(state.name, state.version)
        entry = ModelEntry(state, self.telemetry.usage(state.name, state.version), m)
        self.entries[entry.key] = entry
        versions = self.by_name.setdefault(entry.name, [])
        versions.append(entry)
        versions.sort(key=lambda e: e.order, reverse=True)
        log.info("model deployed", model=entry.name, version=entry.version, sha256=state.sha256)
        if self.eager:
            self._schedule_load(entry)

    def _retire(self, entry: ModelEntry, reason: str) -> None:
        entry.retired = True
        if self._must_wait_for_successor(entry):
            log.info("retirement deferred until a newer version is ready", model=entry.name, version=entry.version)
            return
        log.info("model retired", model=entry.name, version=entry.version, reason=reason)
        self._remove(entry)

    def _must_wait_for_successor(self, entry: ModelEntry) -> bool:
        if entry.status != "ready":
            return False
        others = [e for e in self.by_name.get(entry.name, ()) if e is not entry and not e.retired]
        if any(e.status == "ready" for e in others):
            return False
        return any(e.status in ("unloaded", "queued", "loading") for e in others)

    def _retire_deferred(self, name: str) -> None:
        for entry in list(self.by_name.get(name, ())):
            if entry.retired and not self._must_wait_for_successor(entry):
                log.info("model retired", model=entry.name, version=entry.version, reason="successor ready")
                self._remove(entry)

    def _remove(self, entry: ModelEntry) -> None:
        self.entries.pop(entry.key, None)
        versions = self.by_name.get(entry.name)
        if versions is not None:
            if entry in versions:
                versions.remove(entry)
            if not versions:
                del self.by_name[entry.name]
        self._drop_loaded(entry)
        entry.status = "unloaded"
        self._changed.set()

    def _drop_loaded(self, entry: ModelEntry) -> None:
        loaded, entry.loaded = entry.loaded, None
        self._reserved.pop(entry.key, None)
        if loaded is not None:
            # In-flight requests hold `loaded`: its worker stops once they are answered.
            loaded.worker.retire()

    # ------------------------------------------------------------------ request path

    def resolve(self, name: str, version: str | None, headers: Sequence[tuple[bytes, bytes]] = (),
                parameters: Mapping[str, Any] | None = None) -> tuple[ModelEntry, str]:
        """The entry that answers `name[/versions/version]`, and the endpoint it was routed through ("")."""
        entry, endpoint, _rate = self.route(name, version, headers, parameters)
        return entry, endpoint

    def route(self, name: str, version: str | None, headers: Sequence[tuple[bytes, bytes]] = (),
              parameters: Mapping[str, Any] | None = None) -> tuple[ModelEntry, str, float | None]:
        """`resolve`, plus the prediction-log rate of the route taken (None: the node's default)."""
        if version is None:
            policy = self.policies.get(name)
            if policy is not None:
                route = policy.pick(_sticky(policy.sticky_key, headers, parameters), random.random())
                return self._routed(name, route), name, route.log_rate
            versions = self.by_name.get(name)
            if not versions:
                raise ModelNotFound(f"no model or endpoint {name!r} on this node")
            return _newest(versions), "", None
        entry = self.entries.get(f"{name}:{version}")
        if entry is None:
            known = ", ".join(e.version for e in self.by_name.get(name, ()))
            raise ModelNotFound(f"model {name!r} has no version {version!r} on this node"
                                + (f" (versions: {known})" if known else ""))
        return entry, "", None

    def _routed(self, endpoint: str, route: Route) -> ModelEntry:
        entry = self.entries.get(f"{route.model}:{route.version}")
        if entry is None:
            raise ModelUnavailable(f"endpoint {endpoint!r} routes to {route.model}:{route.version}, which is not "
                                   "deployed on this node")
        return entry

    async def acquire(self, entry: ModelEntry) -> Loaded:
        """The loaded model, loading it on demand (after an eviction, or before start-up finished)."""
        loaded = entry.loaded
        if loaded is not None:
            entry.last_used = time.monotonic()
            return loaded
        if entry.status == "failed":
            raise ModelUnavailable(f"model {entry.key} failed to load: {entry.error} (retried every "
                                   f"{self.settings.reconcile_interval:g}s)")
        if entry.status == "quarantined":
            raise ModelUnavailable(f"model {entry.key} is quarantined on this node: {entry.error}; deploy a fixed "
                                   "version (or restart the node to try it again)")
        if entry.status == "restarting":
            raise ModelUnavailable(f"model {entry.key} is restarting: {entry.error}; retry later",
                                   retry_after=max(1.0, entry.crashes.backoff(self.settings.worker_restart_backoff,
                                                                              self.settings.worker_restart_backoff_max)))
        fut = self._schedule_load(entry)
        try:
            async with asyncio.timeout(self.settings.load_timeout):
                loaded = await asyncio.shield(fut)
        except TimeoutError:
            raise ModelUnavailable(f"model {entry.key} is still loading after {self.settings.load_timeout:g}s; "
                                   "retry later") from None
        entry.last_used = time.monotonic()
        return loaded

    async def predict(self, entry: ModelEntry, loaded: Loaded, inputs: Arrays, rows: int) -> Arrays:
        """Run the model in its worker, within the prediction timeout.

        A worker that has not answered anything for the whole timeout is stuck on the call at the
        head of its queue: it is killed (and restarted), which is the only way to get a native call
        back. Calls that merely waited behind a slow one time out without killing it.
        """
        worker = loaded.worker
        if worker.in_flight >= self.settings.worker_queue:
            raise ModelBusy(f"model {entry.key} has {worker.in_flight} predictions waiting in its worker "
                            "(MODELCD_WORKER_QUEUE); retry later")
        timeout = self.settings.predict_timeout
        entry.threads += 1
        sent = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                _meta, outputs = await worker.call("predict", entry.key, None, inputs)
            return outputs
        except TimeoutError:
            if worker.alive and worker.answered_at < sent:  # nothing answered for the whole timeout: stuck
                worker.kill(f"no answer within {timeout:g}s (MODELCD_PREDICT_TIMEOUT)")
            raise PredictTimeout(f"model {entry.key} did not answer within {timeout:g}s "
                                 "(MODELCD_PREDICT_TIMEOUT)") from None
        except WorkerError as exc:
            if exc.kind == "invalid":
                raise InvalidRequest(exc.reason) from None
            if exc.kind == "unavailable":
                raise ModelUnavailable(exc.reason) from None
            raise PredictFailed(f"model {entry.key} failed to predict: {exc.reason}") from None
        except WorkerDied as exc:
            raise ModelUnavailable(f"model {entry.key} is unavailable: its {exc.reason}; it restarts, retry "
                                   "later") from None
        finally:
            entry.threads -= 1

    # ------------------------------------------------------------------ loading

    def _schedule_load(self, entry: ModelEntry) -> asyncio.Future[Loaded]:
        if entry.future is not None and not entry.future.done():
            return entry.future
        if self._spawn is None:
            raise ModelUnavailable("the node is not started")
        fut: asyncio.Future[Loaded] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        entry.future = fut
        entry.status = "queued"
        self._spawn(self._load(entry, fut))
        return fut

    def load_all(self, keys: Iterable[str]) -> list[asyncio.Future[Loaded]]:
        return [self._schedule_load(self.entries[k]) for k in keys if k in self.entries]

    async def _load(self, entry: ModelEntry, fut: asyncio.Future[Loaded]) -> None:
        started = time.perf_counter()
        worker: Worker | None = None
        try:
            async with self._load_sem:
                if self.entries.get(entry.key) is not entry:
                    raise ModelNotFound(f"model {entry.key} was retired while waiting to load")
                entry.status = "loading"
                pkg = await self.cache.fetch(entry.state.sha256)
                # The model and the worker process that holds it: a budget blind to the worker would admit
                # hundreds of small models whose workers alone overflow it.
                size = estimate_size(entry.state.resources.memory_bytes, len(pkg.data)) + self.settings.model_overhead
                await self._reserve(entry, size)
                async with asyncio.timeout(self.settings.load_timeout):
                    worker = await self.zygote.worker(entry.key)
                    loaded = await self._build(entry, worker, pkg, size)
            if self.entries.get(entry.key) is not entry:
                raise ModelNotFound(f"model {entry.key} was retired while loading")
            self._reserved.pop(entry.key, None)
            worker.on_death = lambda w, reason: self._worker_died(entry, w, reason)
            entry.loaded, entry.size, entry.status, entry.error = loaded, size, "ready", None
            entry.evicted = False
            entry.last_used = time.monotonic()
            fut.set_result(loaded)
            self.metrics.loads.labels("ok").inc()
            ms = (time.perf_counter() - started) * 1000
            log.info("model loaded", model=entry.name, version=entry.version, ms=round(ms, 1), bytes=size,
                     predict_us=round(loaded.predict_s * 1e6, 1), worker=worker.pid)
            self.telemetry.offer(ModelHealth(node=self.node, model=entry.name, version=entry.version, ok=True,
                                             check="load", latency_ms=ms))
        except asyncio.CancelledError:
            self._reserved.pop(entry.key, None)
            if worker is not None and entry.loaded is None:
                worker.kill("its load was cancelled")
            if entry.status != "ready":
                entry.status = "unloaded"
            fut.cancel()
            raise
        except Exception as exc:
            self._reserved.pop(entry.key, None)
            if worker is not None:
                worker.kill("its load failed")
            reason = _reason(exc)
            if isinstance(exc, TimeoutError):
                reason = f"no load within {self.settings.load_timeout:g}s (MODELCD_LOAD_TIMEOUT)"
            if self.entries.get(entry.key) is entry and isinstance(exc, LoadCrashed):
                # Its worker died loading it: a crash like one at predict, counted towards quarantine.
                crashes = entry.crashes.record(time.monotonic(), self.settings.worker_crash_window)
                self.metrics.worker_deaths.labels(entry.name, entry.version, _cause(reason)).inc()
                if crashes >= self.settings.worker_crash_limit:
                    self._quarantine(entry, crashes, f"crashed while loading: {reason}")
            if self.entries.get(entry.key) is entry and entry.status != "quarantined":
                entry.status, entry.error, entry.failed_at = "failed", reason, time.monotonic()
                self.metrics.loads.labels("failed").inc()
                log.error("model failed to load", model=entry.name, version=entry.version, reason=reason)
                self.telemetry.offer(ModelHealth(node=self.node, model=entry.name, version=entry.version, ok=False,
                                                 check="load", detail=reason))
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, ModelNotFound)
                                  else ModelUnavailable(f"model {entry.key} failed to load: {reason}"))
        finally:
            self._changed.set()
            self._retire_deferred(entry.name)

    def _worker_died(self, entry: ModelEntry, worker: Worker, reason: str) -> None:
        """A serving worker ended: its model restarts after a backoff, or is quarantined if it keeps dying."""
        if entry.loaded is None or entry.loaded.worker is not worker or self.entries.get(entry.key) is not entry:
            return  # an old worker (evicted, replaced): nothing serves from it any more
        entry.loaded = None
        entry.size = 0
        now = time.monotonic()
        s = self.settings
        crashes = entry.crashes.record(now, s.worker_crash_window)
        cause = _cause(reason)
        self.metrics.worker_deaths.labels(entry.name, entry.version, cause).inc()
        detail = f"its worker {reason}"
        if crashes >= s.worker_crash_limit:
            self._quarantine(entry, crashes, reason)
        else:
            delay = entry.crashes.backoff(s.worker_restart_backoff, s.worker_restart_backoff_max)
            entry.status = "restarting"
            entry.error = f"{detail}; restarting in {delay:g}s"
            log.warning("model worker died; restarting", model=entry.name, version=entry.version, reason=reason,
                        cause=cause, crashes=crashes, delay_s=delay)
            self.telemetry.offer(ModelHealth(node=self.node, model=entry.name, version=entry.version, ok=False,
                                             check="predict", detail=entry.error))
            if self._spawn is not None:
                self._spawn(self._restart(entry, delay))
        self._changed.set()

    def _quarantine(self, entry: ModelEntry, crashes: int, reason: str) -> None:
        s = self.settings
        entry.status = "quarantined"
        entry.error = (f"its worker died {crashes} times within {s.worker_crash_window:g}s "
                       f"(MODELCD_WORKER_CRASH_LIMIT); last: {reason}")
        log.error("model quarantined", model=entry.name, version=entry.version, crashes=crashes, reason=reason)
        self.telemetry.offer(ModelHealth(node=self.node, model=entry.name, version=entry.version, ok=False,
                                         check="predict", detail=entry.error, quarantined=True))

    async def _restart(self, entry: ModelEntry, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.entries.get(entry.key) is entry and entry.status == "restarting":
            entry.status = "unloaded"
            self._schedule_load(entry)

    async def _reserve(self, entry: ModelEntry, size: int) -> None:
        """Make room for `size` bytes (evicting LRU models), or wait for loads in progress to finish."""
        while True:
            plan = plan_eviction(self._residents(), size, self.budget)
            if plan is not None:
                for key in plan:
                    self._evict(self.entries[key])
                self._reserved[entry.key] = size
                return
            if size > self.budget:
                raise ModelUnavailable(f"model {entry.key} needs {size} bytes and the node's memory budget is "
                                       f"{self.budget} (MODELCD_MEMORY_BUDGET)")
            self._changed.clear()
            await self._changed.wait()

    def _residents(self) -> list[Resident]:
        out = [Resident(e.key, e.size, e.last_used) for e in self.entries.values() if e.status == "ready"]
        out.extend(Resident(k, s, 0.0, evictable=False) for k, s in self._reserved.items())
        return out

    def _evict(self, entry: ModelEntry) -> None:
        log.info("model evicted (memory budget)", model=entry.name, version=entry.version, bytes=entry.size)
        self._drop_loaded(entry)
        entry.status = "unloaded"
        entry.evicted = True
        self.metrics.evictions.inc()

    async def _build(self, entry: ModelEntry, worker: Worker, pkg: Package, size: int) -> Loaded:
        """Load the model in its worker, check it on the sample data, measure it, precompute the request path."""
        m = pkg.manifest
        try:
            await worker.call("load", entry.key, {"loader": self.loader_spec}, payload=pkg.data)
            samples = pkg.samples()
            times = []
            outputs: Arrays = {}
            for _ in range(TIMING_RUNS):
                t0 = time.perf_counter()
                _meta, outputs = await worker.call("predict", entry.key, None, samples.inputs)
                times.append(time.perf_counter() - t0)
        except WorkerError as exc:
            raise ModelUnavailable(exc.reason) from None
        except WorkerDied as exc:
            raise LoadCrashed(exc.reason) from None
        problem = _outputs_match(samples.outputs, outputs, m.tolerance)
        if problem is not None:
            raise ModelUnavailable(f"outputs on the package's sample data differ from the expected ones: {problem}")
        codec = TensorCodec([_spec(s) for s in m.inputs], [_spec(s) for s in m.outputs])
        metadata = encode(codec.metadata(m.name, [m.version], m.runtime))
        # The fastest run after warm-up: noise from other work on the machine only ever adds time.
        return Loaded(worker=worker, manifest=m, codec=codec, samples=samples, size=size, predict_s=min(times[1:]),
                      metadata=metadata)

    # ------------------------------------------------------------------ health and state

    async def check(self, entry: ModelEntry) -> ModelHealth | None:
        """Predict on the model's sample data and compare with its expected outputs (loaded models only)."""
        loaded = entry.loaded
        if loaded is None:
            return None
        t0 = time.perf_counter()
        try:
            outputs = await self.predict(entry, loaded, dict(loaded.samples.inputs), 0)
            problem = _outputs_match(loaded.samples.outputs, outputs, loaded.manifest.tolerance)
        except PredictTimeout:
            problem = f"no answer on the sample data within {self.settings.predict_timeout:g}s"
        except Exception as exc:
            problem = f"predict on the sample data raised {_reason(exc)}"
        ms = (time.perf_counter() - t0) * 1000
        return ModelHealth(node=self.node, model=entry.name, version=entry.version, ok=problem is None,
                           check="samples", latency_ms=ms, detail=problem or "")

    def describe(self) -> list[LoadedModel]:
        return [e.describe() for e in self.entries.values()]

    @property
    def resident_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.status == "ready") + sum(self._reserved.values())

    def loaded_keys(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.status == "ready"]


def _newest(versions: list[ModelEntry]) -> ModelEntry:
    """Newest ready version not retired; else a ready retired one (its successor is loading); else the newest."""
    fallback = None
    for e in versions:
        if e.status == "ready":
            if not e.retired:
                return e
            fallback = fallback or e
    if fallback is not None:
        return fallback
    for e in versions:
        if not e.retired:
            return e
    return versions[0]


def _sticky(name: str | None, headers: Sequence[tuple[bytes, bytes]], parameters: Mapping[str, Any] | None) -> str | None:
    if not name:
        return None
    if parameters:
        value = parameters.get(name)
        if value is not None:
            return str(value)
    wanted = name.lower().encode()
    for k, v in headers:
        if k == wanted:
            return v.decode(errors="replace")
    return None


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    for a in arrays.values():
        return int(a.shape[0]) if a.ndim else 1
    return 1


def _spec(s: Any) -> TensorSpec:
    return TensorSpec(s.name, s.datatype, tuple(s.shape))


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _predict_error(entry: ModelEntry, exc: Exception) -> Exception:
    from modelcd.runtimes.flavors import InvalidInputError

    if isinstance(exc, InvalidInputError):
        return InvalidRequest(str(exc))
    return PredictFailed(f"model {entry.key} failed to predict: {_reason(exc)}")


class LoadCrashed(ModelUnavailable):
    """The model's worker died while loading it (a native crash at load): counted towards quarantine."""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _cause(reason: str) -> str:
    """A short label for the metric: the signal, killed (timeout, memory...), or exited."""
    if "was killed:" in reason:
        return "killed"
    if "signal" in reason:
        return reason.split("signal ", 1)[1].split(" ")[0]
    return "exited"


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark an exception as retrieved: nobody may be left awaiting this future (timeouts, shields)."""
    if not fut.cancelled():
        fut.exception()
