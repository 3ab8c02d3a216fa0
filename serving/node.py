"""A serving node: the I/O shell around the registry, started and stopped as one unit.

One TaskGroup owns every task: the HTTP server, the state follower, model loads, the
reconciler, telemetry (publisher, usage, heartbeats, health checks).

Start: bind and serve HTTP at once (live; ready answers 503) → read `model-state` and
`traffic` from the beginning to their current end (no consumer group: every node sees
every event) → one reconciliation against the store → load the hot set (what fits the
budget, with bounded concurrency: pinned, then recently requested, then newest) → ready. A node
with a request history (serving/recent.py, saved every usage interval and at stop) loads only the
pinned and recently requested part before ready (MODELCD_READY_WINDOW) and the rest of the hot set
after. Models outside the hot set load on demand.

Stop (the `stop` event, set by SIGTERM/SIGINT in `modelcd serve`, or a `NodeDrain` for this node on
modelcd.health, as a release roll sends): hand-off (leave the placement, keep serving until what it
holds is ready on other nodes, within MODELCD_HANDOFF_TIMEOUT; skipped for a lone node) → not ready →
the server stops accepting and finishes in-flight requests (deadline
`drain_timeout`, then cancelled) → background tasks cancelled → final usage and
NodeStatus → telemetry flushed within the deadline → return.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import time
from collections.abc import Coroutine, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgspec
import uvicorn

from modelcd.events import topics
from modelcd.events.bus import PROMPT_FETCH_WAIT_MS, KafkaConfig, Publisher, ensure_topics, follow_events
from modelcd.events.schemas import LoadedModel, ModelState, NodeDrain, NodeStatus, TrafficPolicy
from modelcd.logs import get_logger
from modelcd.settings import Settings
from modelcd.store.blobs import Store, open_store
from modelcd.store.targets import TargetState

from . import recent
from .api import NodeState, ServingApp
from .budget import ESTIMATE_FACTOR, Candidate, estimate_size, hot_set
from .cache import PackageCache
from .hooks import NodeHooks, ShadowFactory, ShadowHook
from .metrics import NodeMetrics, StateCollector
from .placement import NodePlacement
from .protocol import tensors_to_log
from .registry import Registry, RuntimeLoader, default_loader
from .telemetry import Telemetry

log = get_logger("modelcd.serving.node")

STATE_TOPICS = [topics.MODEL_STATE, topics.TRAFFIC]
HEALTH_BACKLOG = 5000  # records per partition of modelcd.health read at start (recent heartbeats: the membership)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the runner owns signals and sets the node's stop event."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class ServingNode:
    """One node. `port` is known once `run` has bound it (port 0 picks a free one)."""

    def __init__(self, settings: Settings, *, port: int | None = None, node_id: str | None = None,
                 loader: RuntimeLoader = default_loader, store: Store | None = None,
                 shadow: ShadowFactory | None = None) -> None:
        self.settings = settings
        self.port = settings.serving_port if port is None else port
        self.node_id = node_id or settings.node_id or f"{socket.gethostname()}:{self.port}"
        self.loader = loader
        self._store = store
        self.state = NodeState()
        self.metrics = NodeMetrics()
        self.registry: Registry | None = None
        self.telemetry: Telemetry | None = None
        self._shadow_factory = shadow  # None: this node runs no shadows (modelcd up / serve pass shadow.node.attach)
        self.shadow: ShadowHook | None = None
        self._loads: set[asyncio.Task[None]] = set()
        # The request history (serving/recent.py): read at start, saved every usage interval and at stop.
        self._history_path: Path | None = None
        self._history: dict[str, float] = {}
        self._saved_history: dict[str, float] = {}
        self.loaded_before_ready: list[str] = []  # what was loaded when the node reported ready (logged)
        self.placement: NodePlacement | None = None
        self.drain_requested = asyncio.Event()  # a NodeDrain for this node: leave as on SIGTERM
        self._started = time.time()  # NodeDrain events older than this node are for an earlier one of its name

    @property
    def url(self) -> str:
        host = self.settings.serving_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()  # what others (the front door) dial: listening on all addresses says nothing
        return f"http://{host}:{self.port}"

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event) -> None:
        s = self.settings
        cfg = KafkaConfig.from_settings(s)
        async with AsyncExitStack() as stack:
            store = self._store or await stack.enter_async_context(
                open_store(s.resolved_store_url, endpoint_url=s.s3_endpoint_url))
            await ensure_topics(cfg)
            publisher = Publisher(cfg, source=f"serving/{self.node_id}")
            await publisher.start()
            telemetry = self.telemetry = Telemetry(self.node_id, publisher, s.telemetry_buffer)
            safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", self.node_id)
            cache = PackageCache(s.home / "cache" / safe_id, store)
            self._history_path = s.home / "history" / f"{safe_id}.json"
            self._history = await asyncio.to_thread(recent.load, self._history_path)
            registry = self.registry = Registry(s, node=self.node_id, cache=cache, metrics=self.metrics,
                                                telemetry=telemetry, loader=self.loader)
            self.placement = NodePlacement(self.node_id, registry, s, on_change=self._heartbeat_now)
            self.metrics.add_collector(StateCollector(self._gauges))
            shadow = None
            if self._shadow_factory is not None:
                shadow, collector = self._shadow_factory(self._hooks(registry, telemetry))
                self.shadow = shadow
                if collector is not None:
                    self.metrics.add_collector(collector)
            targets = TargetState(store)
            sock = self._bind()
            app = ServingApp(registry, telemetry, self.metrics, self.state, node=self.node_id,
                             max_body=s.max_request_bytes, log_rate=s.prediction_log_rate, shadow=shadow,
                             max_inflight=s.max_inflight_bytes, max_response=s.max_response_bytes, load_wait=s.load_wait)
            server = _Server(uvicorn.Config(
                app, loop="none", http="httptools", lifespan="off", access_log=False, log_config=None,
                timeout_graceful_shutdown=max(1, int(s.drain_timeout)), timeout_keep_alive=5, backlog=2048))
            log.info("serving node starting", node=self.node_id, url=self.url, budget=s.memory_budget)
            try:
                async with asyncio.TaskGroup() as tg:
                    registry.start(lambda coro: self._spawn(tg, coro))
                    server_task = tg.create_task(server.serve(sockets=[sock]), name="http")
                    publisher_task = tg.create_task(telemetry.run(), name="telemetry")
                    shadow_tasks = [tg.create_task(shadow.run(), name="shadow")] if shadow is not None else []
                    caught_up, fleet_known = asyncio.Event(), asyncio.Event()
                    background = [tg.create_task(self._follow(cfg, caught_up), name="state-follower"),
                                  tg.create_task(self._follow_fleet(cfg, fleet_known), name="fleet-follower"),
                                  # Heartbeats from the start: the fleet counts a loading node in its placement.
                                  tg.create_task(self._every(s.heartbeat_interval, self._heartbeat), name="heartbeat"),
                                  # The zygote (numpy, scikit-learn) and its spare workers start while the state
                                  # is read, not after: a restart's hot set starts loading at once.
                                  tg.create_task(registry.zygote.start(), name="zygote")]
                    self._heartbeat_now()
                    both = asyncio.gather(caught_up.wait(), fleet_known.wait())
                    if await _first(both, stop.wait()) and not stop.is_set():
                        await self._reconcile(targets, cache)
                        await self._load_hot_set(cache, stop)
                    registry.eager = True
                    background += [
                        tg.create_task(self._every(s.reconcile_interval, self._reconcile, targets, cache),
                                       name="reconciler"),
                        tg.create_task(self._every(s.usage_interval, self._usage), name="usage"),
                        tg.create_task(self._every(s.health_interval, self._health), name="health"),
                        tg.create_task(self._every(min(0.5, s.heartbeat_interval / 2), self._place), name="placement"),
                    ]
                    if not stop.is_set():
                        # Start-up objects (libraries, clients, loaded models) live as long as the node: moving
                        # them out of the collector's generations keeps each collection small on the request path.
                        gc.freeze()
                        self.loaded_before_ready = sorted(registry.loaded_keys())
                        self.state.ready = True
                        ready.set()
                        self._heartbeat_now()
                        log.info("serving node ready", node=self.node_id, url=self.url,
                                 loaded=len(registry.loaded_keys()), known=len(registry.entries))
                    await _first(stop.wait(), self.drain_requested.wait())  # SIGTERM, or a NodeDrain (release roll)
                    await self._hand_off()
                    await self._drain(server, server_task, publisher_task, [*shadow_tasks, *background])
            finally:
                await registry.aclose()

    # ------------------------------------------------------------------ start

    def _bind(self) -> socket.socket:
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says TCP, and without it every keep-alive response waits ~40 ms on
        # Nagle + delayed ACK (uvloop sets it regardless, the plain asyncio loop does not).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.serving_host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"serving node cannot listen on {self.settings.serving_host}:{self.port}: {exc} "
                          "(MODELCD_SERVING_PORT / --port)") from exc
        self.port = sock.getsockname()[1]
        return sock

    def _spawn(self, tg: asyncio.TaskGroup, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = tg.create_task(coro, name="model-load")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return task

    async def _follow(self, cfg: KafkaConfig, caught_up: asyncio.Event) -> None:
        """Apply every model-state and traffic event, from the beginning, for as long as the node runs."""
        assert self.registry is not None and self.placement is not None
        registry, placement = self.registry, self.placement

        def on_event(event: Any) -> None:
            match event:
                case ModelState():
                    placement.on_model(event)
                case TrafficPolicy():
                    registry.apply_traffic(event)
                    placement.on_traffic(event)
                    if self.shadow is not None:
                        self.shadow.update_policy(event)
                case _:
                    pass  # rollout steps travel on the traffic topic: not the node's business

        def on_undecodable(topic: str, partition: int, offset: int, exc: Exception) -> None:
            log.warning("skipped undecodable state record", topic=topic, partition=partition, offset=offset,
                        reason=str(exc))

        await follow_events(cfg, STATE_TOPICS, on_event, caught_up=caught_up,
                            client_id=f"{cfg.client_id}-{self.node_id}", on_undecodable=on_undecodable,
                            fetch_wait_ms=PROMPT_FETCH_WAIT_MS)

    async def _follow_fleet(self, cfg: KafkaConfig, caught_up: asyncio.Event) -> None:
        """Fold the fleet's heartbeats into the placement: recent ones at start (the membership), then live."""
        assert self.placement is not None
        placement = self.placement

        def on_event(event: Any) -> None:
            if isinstance(event, NodeStatus):
                # Received "as of" its own time: an old heartbeat read at start is not a live node.
                age = max(0.0, time.time() - event.at)
                placement.on_status(event, time.monotonic() - age)
            elif isinstance(event, NodeDrain) and event.node == self.node_id and event.at >= self._started:
                log.info("asked to leave the fleet", node=self.node_id, reason=event.reason)
                self.drain_requested.set()

        await follow_events(cfg, [topics.HEALTH], on_event, caught_up=caught_up,
                            client_id=f"{cfg.client_id}-{self.node_id}-fleet", backlog=HEALTH_BACKLOG,
                            max_records=1000)

    def _place(self) -> None:
        p = self.placement
        if p is not None and p.enabled and (p.dirty or p.members(time.monotonic()) != p._members):
            changes = p.refresh()
            if changes:
                log.info("placement applied", node=self.node_id, changes=changes, load=len(p.plan.load),
                         keep=len(p.plan.keep))

    async def _hand_off(self) -> None:
        """Stopping: leave the placement, keep serving until what this node holds is ready elsewhere."""
        p, s = self.placement, self.settings
        if p is None or not p.enabled or s.handoff_timeout <= 0 or not self.state.ready or p.alone():
            return
        p.leaving = True
        self._heartbeat_now(stopping=True)
        # Others may be releasing copies right now on the membership they saw before this heartbeat: let them
        # see it (and take their copies back) before judging what is held elsewhere.
        await asyncio.sleep(p.grace)
        deadline = time.monotonic() + s.handoff_timeout
        log.info("serving node leaving the fleet: handing off", node=self.node_id, held=len(p.registry.entries))
        while not p.handed_off() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        done = p.handed_off()
        log.info("hand-off " + ("done" if done else "timed out"), node=self.node_id, keep=sorted(p.plan.keep))
        await asyncio.sleep(p.grace)  # the front door sees the same heartbeats; give it time to move its routes

    def _hooks(self, registry: Registry, telemetry: Telemetry) -> NodeHooks:
        """What this node lends its shadow executor: its own predict path, signatures, telemetry buffer."""
        import numpy as np

        async def predict(model: str, version: str, inputs: Mapping[str, Any]) -> tuple[Any, float]:
            entry, _ = registry.resolve(model, version)
            loaded = entry.loaded or await registry.acquire(entry)
            arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in inputs.items()}
            first = next(iter(arrays.values()), None)
            rows = int(first.shape[0]) if first is not None and first.ndim else 1
            t0 = time.perf_counter()
            outputs = await registry.predict(entry, loaded, arrays, rows)
            return outputs, (time.perf_counter() - t0) * 1000.0

        def input_names(model: str, version: str) -> list[str] | None:
            entry = registry.entries.get(f"{model}:{version}")
            if entry is None or entry.loaded is None:
                return None  # not loaded yet: its signature is unknown, it gets the request's inputs
            return [spec.name for spec in entry.loaded.manifest.inputs]

        return NodeHooks(node_id=self.node_id, settings=self.settings, predict=predict, input_names=input_names,
                         emit=telemetry.offer, convert=tensors_to_log)

    async def _reconcile(self, targets: TargetState, cache: PackageCache) -> None:
        assert self.registry is not None
        started = time.monotonic()
        try:
            models = await targets.models()
            traffic = list((await targets.traffic()).values())
        except Exception as exc:  # the store is down: events still flow, try again next period
            log.warning("reconciliation skipped: store unavailable", reason=repr(exc))
            return
        assert self.placement is not None
        models = self.placement.on_snapshot(models, traffic, started)
        changes = self.registry.reconcile(models, traffic, started)
        if self.shadow is not None:
            self.shadow.reconcile(traffic, started)
        if changes:
            log.info("reconciled with the target state", changes=changes)
        await cache.prune(self.registry.desired_shas())

    async def _load_hot_set(self, cache: PackageCache, stop: asyncio.Event) -> None:
        assert self.registry is not None
        cached = cache.cached()
        candidates = []
        for e in self.registry.entries.values():
            size = e.state.resources.memory_bytes
            if size <= 0 and e.state.sha256 in cached:
                size = estimate_size(0, cache.path(e.state.sha256).stat().st_size)
            candidates.append(Candidate(e.key, estimate_size(size, 0) + self.settings.model_overhead, e.state.pinned,
                                        e.state.deployed_at or e.state.at, self._history.get(e.key, 0.0)))
        keys = hot_set(candidates, self.registry.budget)
        pinned = {e.key for e in self.registry.entries.values() if e.state.pinned}
        first, after = recent.split(keys, self._history, pinned, now=time.time(), window=self.settings.ready_window)
        futures = self.registry.load_all(first)
        if futures:
            # Failures are the models' own (reported, 503 on their requests): the node is ready regardless.
            await _first(asyncio.wait(futures), stop.wait())
        self.registry.load_all(after)  # in the background, bounded like every load; requests may come first
        log.info("hot set loaded", loaded=len(self.registry.loaded_keys()), hot=len(keys), after_ready=len(after),
                 deployed=len(self.registry.entries), estimate_factor=ESTIMATE_FACTOR)

    # ------------------------------------------------------------------ periodic

    async def _every(self, interval: float, fn: Any, *args: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            result = fn(*args)
            if asyncio.iscoroutine(result):
                await result

    async def _usage(self) -> None:
        assert self.telemetry is not None
        self.telemetry.flush_usage()
        await self._save_history()

    async def _save_history(self) -> None:
        """Keep the request history (serving/recent.py): what was used, among what still serves here."""
        assert self.registry is not None and self.telemetry is not None
        merged = {**self._history, **self.telemetry.last_used()}
        history = {k: t for k, t in merged.items() if k in self.registry.entries}
        if history != self._saved_history and self._history_path is not None:
            try:
                await asyncio.to_thread(recent.save, self._history_path, history)
                self._saved_history = history
            except OSError as exc:  # a full disk costs the next restart its order, not this node
                log.warning("could not save the request history", path=str(self._history_path), reason=str(exc))
        self._history = history

    def _heartbeat(self) -> None:
        self._heartbeat_now()

    def _heartbeat_now(self, *, stopping: bool = False) -> None:
        assert self.registry is not None and self.telemetry is not None
        self.telemetry.offer(NodeStatus(
            node=self.node_id, url=self.url, ready=self.state.ready and not stopping,
            models=self._models(), memory_bytes=self.registry.resident_bytes,
            memory_budget=self.settings.memory_budget,
            stopping=stopping or (self.placement is not None and self.placement.leaving)))

    def _models(self) -> list[LoadedModel]:
        """What the heartbeat lists: a model this node is about to release is no longer ready for the fleet."""
        assert self.registry is not None
        models = self.registry.describe()
        releasing = self.placement.releasing if self.placement is not None else set()
        if not releasing:
            return models
        return [msgspec.structs.replace(m, state="unloaded") if f"{m.name}:{m.version}" in releasing and
                m.state == "ready" else m for m in models]

    async def _health(self) -> None:
        assert self.registry is not None and self.telemetry is not None
        for entry in list(self.registry.entries.values()):
            result = await self.registry.check(entry)
            if result is not None:
                self.telemetry.offer(result)
                if not result.ok:
                    log.warning("model health check failed", model=entry.name, version=entry.version,
                                detail=result.detail)

    def _gauges(self) -> list[tuple[str, str, list[tuple[dict[str, str], float]]]]:
        r, t = self.registry, self.telemetry
        if r is None or t is None:
            return []
        states = [({"model": e.name, "version": e.version, "state": e.status}, 1.0) for e in r.entries.values()]
        quarantined = [({"model": e.name, "version": e.version}, 1.0) for e in r.entries.values()
                       if e.status == "quarantined"]
        return [
            ("modelcd_models_loaded", "Models resident in memory.", [({}, float(len(r.loaded_keys())))]),
            ("modelcd_model_state", "Each model version this node should serve, by load state.", states),
            ("modelcd_model_quarantined", "1 for each model version quarantined on this node (its worker kept "
             "dying).", quarantined),
            ("modelcd_workers", "Model worker processes serving.", [({}, float(len(r.loaded_keys())))]),
            ("modelcd_memory_resident_bytes", "Bytes the budget charges for loaded and loading models.",
             [({}, float(r.resident_bytes))]),
            ("modelcd_memory_budget_bytes", "MODELCD_MEMORY_BUDGET.", [({}, float(self.settings.memory_budget))]),
            ("modelcd_telemetry_buffered", "Telemetry events waiting for the broker.", [({}, float(t.buffered))]),
            ("modelcd_telemetry_dropped", "Telemetry events dropped (buffer full or stop deadline).",
             [({}, float(t.stats.dropped))]),
            ("modelcd_telemetry_failed", "Telemetry events the broker did not acknowledge.",
             [({}, float(t.stats.failed))]),
            ("modelcd_ready", "1 when the node reports ready.", [({}, float(self.state.ready))]),
        ]

    # ------------------------------------------------------------------ stop

    async def _drain(self, server: uvicorn.Server, server_task: asyncio.Task[None],
                     publisher_task: asyncio.Task[None], background: list[asyncio.Task[None]]) -> None:
        assert self.telemetry is not None
        log.info("serving node stopping: draining", node=self.node_id)
        self.state.stopping = True
        self.state.ready = False
        server.should_exit = True  # stop accepting; uvicorn finishes in-flight requests within its deadline
        with contextlib.suppress(Exception):
            await server_task
        for task in [*background, *self._loads, publisher_task]:
            task.cancel()
        await asyncio.gather(*background, *self._loads, publisher_task, return_exceptions=True)
        self.telemetry.flush_usage()
        with contextlib.suppress(Exception):
            await self._save_history()
        self._heartbeat_now(stopping=True)
        await self.telemetry.drain(self.settings.drain_timeout)
        log.info("serving node stopped", node=self.node_id, telemetry=vars(self.telemetry.stats))


async def _first(*aws: Any) -> bool:
    """Wait for the first of several awaitables; cancel the rest. True if the first one finished first."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return tasks[0] in done
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_node(settings: Settings, *, stop: asyncio.Event, ready: asyncio.Event, port: int | None = None,
                   node_id: str | None = None, loader: RuntimeLoader = default_loader,
                   shadow: ShadowFactory | None = None) -> None:
    """Run one serving node until `stop` is set (the shape `modelcd up` and `modelcd serve` start)."""
    await ServingNode(settings, port=port, node_id=node_id, loader=loader, shadow=shadow).run(stop=stop, ready=ready)
