"""The ingest service: the deployment API, the deploy-request consumer and the tracker, run as one unit.

`run_ingest(settings, stop=..., ready=...)` owns every task in one TaskGroup:

    http      uvicorn serving `DeploymentApi` on settings.ingest_host:ingest_port
    consumer  `modelcd.deploy-requests` in group "modelcd-ingest" -> `Pipeline.handle`
    tracker   `modelcd.deployments` + `modelcd.health` from the beginning -> `TrackingView`
    mounted   the mounted route groups' background work (the console's bus feed), if any

Before any of them starts, `resume` puts back on the topics what a broker loss took (the target
state and policies from the store, requests accepted and not ended). `ready` is set once the
API listens, the consumer joined its group and the tracker caught up.
On `stop` it drains in a fixed order, each with a deadline: end the mounted groups' background
work (the console's live streams close with it) → stop accepting HTTP (in-flight
requests finish) → let the consumer finish the request in hand (its offset is committed only
after the handler returns; past the deadline it is cancelled and the request is redelivered
to the next instance, which is safe because the pipeline is idempotent) → stop the tracker →
flush the publisher → close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import uvicorn

from modelcd.events.bus import PROMPT_FETCH_WAIT_MS, Consumer, KafkaConfig, Publisher, ensure_topics, read_topic
from modelcd.events.topics import DEPLOY_REQUESTS, TRAFFIC
from modelcd.logs import get_logger
from modelcd.settings import Settings
from modelcd.store.blobs import open_store

from .api import ApiConfig, DeploymentApi, RoutesFactory
from .pipeline import Pipeline
from .policy import parse_file_dirs
from .resume import recall_deployments, resume
from .sandbox import Sandbox
from .tracking import TrackingView, run_tracker

log = get_logger("modelcd.ingest")

GROUP_ID = "modelcd-ingest"
STRAGGLER_S = 20.0  # a drain step past this is reported with its stack
HTTP_DRAIN_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling (the runner owns signals), plus a started event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.started_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.started_event.set()


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a busy port is a clear error here, not uvicorn's sys.exit()."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY: see serving/node.py
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the deployment API cannot listen on {host}:{port}: {exc.strerror}; choose another "
                      "port with MODELCD_INGEST_PORT") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def run_ingest(settings: Settings, *, stop: asyncio.Event, ready: asyncio.Event,
                     routes: Mapping[str, RoutesFactory] | None = None) -> None:
    """Run the ingest service until `stop` is set; raises if a part of it fails.

    `routes` are mounted on the deployment API beside its own (`modelcd up` mounts `/endpoints`).
    """
    cfg = KafkaConfig.from_settings(settings)
    instance = f"ingest@{socket.gethostname()}:{settings.ingest_port}"
    await ensure_topics(cfg)
    sock = _bind(settings.ingest_host, settings.ingest_port)
    async with AsyncExitStack() as stack:
        stack.callback(sock.close)
        store = await stack.enter_async_context(
            open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url))
        publisher = await stack.enter_async_context(Publisher(cfg, instance))
        # Before taking requests: what the broker lost (targets, policies, requests in flight) back on
        # the topics, from the store (ingest/resume.py).
        await resume(store, cfg, publisher)
        view = TrackingView()
        sandbox = Sandbox.from_settings(settings)
        sandbox.prestart()
        stack.push_async_callback(sandbox.close)  # its zygote, and every child it forked
        async def traffic() -> list[object]:  # the safety check's rollouts in progress
            return [event for event, _env, _record in await read_topic(cfg, TRAFFIC)]

        pipeline = Pipeline(settings, store, publisher, sandbox, instance=instance, traffic=traffic)
        consumer = Consumer(cfg, [DEPLOY_REQUESTS], GROUP_ID, pipeline.handle, fetch_wait_ms=PROMPT_FETCH_WAIT_MS)
        tracker_ready = asyncio.Event()

        def health() -> dict[str, Any]:
            s = consumer.stats
            return {"instance": instance, "consumer_joined": consumer.started.is_set(),
                    "tracker_caught_up": tracker_ready.is_set(), "handled": s.handled,
                    "handler_errors": s.handler_errors, "skipped_undecodable": s.skipped_undecodable,
                    "deployments": pipeline.counters.copy()}

        api = DeploymentApi(ApiConfig(settings.api_token, settings.max_upload_bytes,
                                      file_uri_dirs=parse_file_dirs(settings.file_uri_dirs)), store, publisher, view,
                            health=health, routes=routes, traffic=traffic)
        server = _Server(uvicorn.Config(api, lifespan="off", log_config=None, access_log=False,
                                        timeout_graceful_shutdown=int(HTTP_DRAIN_S)))
        async with asyncio.TaskGroup() as tg:
            http = tg.create_task(server.serve(sockets=[sock]), name="ingest-http")
            consuming = tg.create_task(consumer.run(), name="ingest-consumer")
            tracking = tg.create_task(run_tracker(cfg, view, ready=tracker_ready), name="ingest-tracker")
            recalling = tg.create_task(_recall(store, view, tracker_ready), name="ingest-recall")
            mounted = tg.create_task(api.run_mounted(), name="ingest-mounted")
            await _first(stop, _all(server.started_event, consumer.started, tracker_ready))
            if not stop.is_set():
                log.info("ingest ready", api=f"http://{settings.ingest_host}:{settings.ingest_port}",
                         store=store.url, group=GROUP_ID)
                ready.set()
            await stop.wait()
            log.info("ingest draining")
            # 0. live streams (the console's server-sent events) would hold the HTTP drain up to its deadline.
            mounted.cancel()
            # 1. intake: no new HTTP requests; in-flight ones finish (uvicorn's own deadline).
            server.should_exit = True
            await _bounded(http, HTTP_DRAIN_S + 1)
            # 2. the request in hand: finish it, or leave it uncommitted for redelivery.
            consumer.stop()
            await _bounded(consuming, settings.validation_timeout + 15)
            # 3. the view is rebuilt from the topics on the next start.
            tracking.cancel()
            recalling.cancel()
            await _stragglers((http, consuming, tracking, recalling, mounted), STRAGGLER_S)
        log.info("ingest stopped")


async def _recall(store: Any, view: TrackingView, caught_up: asyncio.Event) -> None:
    """After the tracker caught up: the deployments only the store still knows, into the view (never fatal)."""
    await caught_up.wait()
    try:
        await recall_deployments(store, view)
    except Exception:  # noqa: BLE001 - one id is still answered from the store; the list is a convenience
        log.exception("could not recall deployments from the store")


async def _all(*events: asyncio.Event) -> None:
    for e in events:
        await e.wait()


async def _first(stop: asyncio.Event, aw: Any) -> None:
    """Wait for `aw` unless `stop` comes first."""
    waiter = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (waiter, stopper):
            f.cancel()
        await asyncio.gather(waiter, stopper, return_exceptions=True)


async def _stragglers(tasks: tuple[asyncio.Task[Any], ...], after: float) -> None:
    """Wait `after` seconds for `tasks` to end; then say which have not, and where each is waiting.

    The group still waits for them: this only leaves a trace for a drain that hangs in a library.
    """
    _, pending = await asyncio.wait(tasks, timeout=after)
    for task in pending:
        where = "; ".join(f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                          for f in task.get_stack(limit=8))
        log.warning("still draining", task=task.get_name(), waiting_in=where)


async def _bounded(task: asyncio.Task[Any], deadline: float) -> None:
    """Give `task` `deadline` seconds to finish, then cancel it (its exception, if any, reaches the group)."""
    done, _ = await asyncio.wait({task}, timeout=deadline)
    if not done:
        log.warning("drain deadline passed; cancelling", task=task.get_name(), deadline_s=deadline)
        task.cancel()
