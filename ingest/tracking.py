"""Deployment tracking: a view of every deployment, rebuilt by reading `modelcd.deployments` and
`modelcd.health` from the beginning.

`TrackingView` is sans-I/O: `apply(event)` folds one event in, `deployment(id)` answers the
API's `GET /deployments/{id}`; a deployment the topics no longer hold is answered from the store
(`view_of_record`, `view_of_request`: the API reads `deployments/<id>.json`, `requests/<id>.json`). `run_tracker` is the I/O shell that feeds it from the broker.

Invariants:
- a deployment's steps keep their first-seen order (accepted, validate, compile, ...); a
  step's last event wins, so a redelivered request that runs a step again shows its last run;
- a deployment's outcome is the last DeploymentCompleted/DeploymentFailed for its id;
- "nodes serving" counts nodes whose latest NodeStatus lists the deployed name:version and
  sha256 in state `ready` and that are not stopping;
- every change bumps `revision`, which long-polling readers (`wait_changed`) wait on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer

from modelcd.events.bus import PROMPT_FETCH_WAIT_MS, KafkaConfig, partitions_of, stop_consumer
from modelcd.events.codec import DecodeError, decode
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, DeploymentProgress, Event, NodeStatus
from modelcd.events.topics import DEPLOYMENTS, HEALTH
from modelcd.logs import get_logger
from modelcd.runner import wait_for

from .policy import AcceptedRequest, DeploymentRecord

log = get_logger("modelcd.ingest.tracking")


class StepView(msgspec.Struct, kw_only=True):
    step: str
    status: str
    detail: str = ""
    duration_ms: float | None = None
    at: float = 0.0


class DeploymentView(msgspec.Struct, kw_only=True):
    """What `GET /deployments/{id}` answers."""

    deployment_id: str
    model: str = ""
    version: str = ""
    status: str = "pending"  # pending, running, completed, failed
    steps: list[StepView] = []
    reason: str = ""
    failed_step: str = ""
    sha256: str = ""
    runtime: str = ""
    noop: bool = False
    existing_deployment_id: str | None = None
    timings_ms: dict[str, float] = {}
    nodes_serving: int = 0
    requested_at: float = 0.0
    finished_at: float | None = None
    revision: int = 0


@dataclass
class _Deployment:
    view: DeploymentView
    steps: dict[str, StepView] = field(default_factory=dict)


class TrackingView:
    """Every deployment's steps and outcome, and which nodes report which models loaded."""

    def __init__(self, *, max_deployments: int = 100_000) -> None:
        self._deployments: dict[str, _Deployment] = {}
        # node -> {(name, version, sha256)} loaded and ready, from its latest NodeStatus.
        self._nodes: dict[str, frozenset[tuple[str, str, str]]] = {}
        # node -> {(name, version, sha256)} the node quarantined (its worker kept dying).
        self._quarantined: dict[str, frozenset[tuple[str, str, str]]] = {}
        self._max = max_deployments
        self.revision = 0
        self._changed = asyncio.Event()

    # -- folding events in (pure apart from waking waiters) --------------------------------------

    def requested(self, deployment_id: str, model: str = "", at: float | None = None) -> None:
        """The API accepted a request: answer `GET /deployments/{id}` before the pipeline reports."""
        if deployment_id not in self._deployments:
            self._entry(deployment_id).view.requested_at = at if at is not None else time.time()
            self._entry(deployment_id).view.model = model
            self._bump()

    def apply(self, event: Event) -> bool:
        """Fold one event in; returns whether it concerned the view."""
        match event:
            case DeploymentProgress():
                d = self._entry(event.deployment_id)
                self._names(d, event.model, event.version)
                if not d.view.requested_at:
                    d.view.requested_at = event.at
                d.steps[event.step] = StepView(step=event.step, status=event.status, detail=event.detail,
                                               duration_ms=event.duration_ms, at=event.at)
                if d.view.status == "pending":
                    d.view.status = "running"
            case DeploymentCompleted():
                d = self._entry(event.deployment_id)
                self._names(d, event.model, event.version)
                d.view.status = "completed"
                d.view.reason = ""
                d.view.failed_step = ""
                d.view.sha256 = event.sha256
                d.view.runtime = event.runtime
                d.view.noop = event.noop
                d.view.existing_deployment_id = event.existing_deployment_id
                d.view.timings_ms = dict(event.timings_ms)
                d.view.finished_at = event.at
            case DeploymentFailed():
                d = self._entry(event.deployment_id)
                self._names(d, event.model, event.version)
                d.view.status = "failed"
                d.view.reason = event.reason
                d.view.failed_step = event.step
                d.view.finished_at = event.at
            case NodeStatus():
                loaded = frozenset(
                    (m.name, m.version, m.sha256) for m in event.models if m.state == "ready"
                ) if not event.stopping else frozenset()
                quarantined = frozenset(
                    (m.name, m.version, m.sha256) for m in event.models if m.quarantined
                ) if not event.stopping else frozenset()
                if self._nodes.get(event.node) == loaded and self._quarantined.get(event.node, frozenset()) == quarantined:
                    return True
                self._nodes[event.node] = loaded
                self._quarantined[event.node] = quarantined
            case _:
                return False
        self._bump()
        return True

    def remember(self, stored: DeploymentView) -> bool:
        """Add a deployment known only from the store (the topics lost it), so it is answered and listed like
        the others; a deployment the topics told about is left as they told. True if added."""
        if stored.deployment_id in self._deployments:
            return False
        d = self._entry(stored.deployment_id)
        d.view = stored
        d.steps = {s.step: s for s in stored.steps}
        self._bump()
        return True

    def _entry(self, deployment_id: str) -> _Deployment:
        d = self._deployments.get(deployment_id)
        if d is None:
            if len(self._deployments) >= self._max:
                # Bounded memory: forget the oldest deployment (dicts keep insertion order).
                self._deployments.pop(next(iter(self._deployments)))
            d = self._deployments[deployment_id] = _Deployment(DeploymentView(deployment_id=deployment_id))
        return d

    @staticmethod
    def _names(d: _Deployment, model: str, version: str) -> None:
        if model:
            d.view.model = model
        if version:
            d.view.version = version

    def _bump(self) -> None:
        self.revision += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # -- queries ---------------------------------------------------------------------------------

    def nodes_serving(self, name: str, version: str, sha256: str = "") -> int:
        return sum(
            1 for loaded in self._nodes.values()
            if any(n == name and v == version and (not sha256 or s == sha256) for n, v, s in loaded)
        )

    def nodes_quarantined(self, name: str, version: str, sha256: str = "") -> int:
        return sum(
            1 for held in self._quarantined.values()
            if any(n == name and v == version and (not sha256 or s == sha256) for n, v, s in held)
        )

    def deployment(self, deployment_id: str) -> DeploymentView | None:
        d = self._deployments.get(deployment_id)
        if d is None:
            return None
        v = d.view
        v.steps = list(d.steps.values())
        v.revision = self.revision
        v.nodes_serving = self.nodes_serving(v.model, v.version, v.sha256) if v.status == "completed" else 0
        return v

    def deployments(self) -> list[DeploymentView]:
        return [v for i in list(self._deployments) if (v := self.deployment(i)) is not None]

    async def wait_changed(self, after: int, timeout: float) -> None:
        """Return once `revision > after`, or after `timeout` seconds (a long poll)."""
        if self.revision > after:
            return
        try:
            await wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


def view_of_record(record: DeploymentRecord, tracking: TrackingView) -> DeploymentView:
    """`GET /deployments/{id}` from the store's record of an ended deployment (the topic lost its events)."""
    view = DeploymentView(
        deployment_id=record.deployment_id, model=record.model, version=record.version, status=record.status,
        steps=[StepView(step=s.step, status=s.status, detail=s.detail, duration_ms=s.duration_ms, at=s.at)
               for s in record.steps],
        reason=record.reason, failed_step=record.failed_step, sha256=record.sha256, runtime=record.runtime,
        noop=record.noop, existing_deployment_id=record.existing_deployment_id, timings_ms=dict(record.timings_ms),
        requested_at=record.requested_at, finished_at=record.finished_at, revision=tracking.revision)
    if record.status == "completed" and record.kind == "deploy":
        view.nodes_serving = tracking.nodes_serving(record.model, record.version, record.sha256)
    return view


def view_of_request(accepted: AcceptedRequest, tracking: TrackingView) -> DeploymentView:
    """`GET /deployments/{id}` of a request accepted and not ended yet, that the topic does not (yet) hold."""
    req = accepted.request
    return DeploymentView(deployment_id=req.deployment_id, model=req.model,
                          version=getattr(req, "version", ""), status="running" if accepted.pickups else "pending",
                          requested_at=accepted.accepted_at, revision=tracking.revision)


async def run_tracker(cfg: KafkaConfig, view: TrackingView, *, ready: asyncio.Event,
                      topic_prefix: str = "") -> None:
    """Feed `view` from the beginning of `modelcd.deployments` and `modelcd.health`; runs until cancelled.

    No consumer group: every ingest instance reads every partition, so any instance answers for
    any deployment. `ready` is set once the events that existed at start are folded in.
    """
    topics = [topic_prefix + DEPLOYMENTS, topic_prefix + HEALTH]
    consumer = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, client_id=f"{cfg.client_id}-ingest-tracker",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=PROMPT_FETCH_WAIT_MS)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topics)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps) if tps else {}
        behind = {tp for tp in tps if ends[tp] > 0}
        if not behind:
            ready.set()
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp, records in batches.items():
                topic = tp.topic[len(topic_prefix):]
                for record in records:
                    _apply_record(view, topic, record)
            if behind:
                for tp in list(behind):
                    if await consumer.position(tp) >= ends[tp]:
                        behind.discard(tp)
                if not behind:
                    ready.set()
    finally:
        await stop_consumer(consumer)


def _apply_record(view: TrackingView, topic: str, record: Any) -> None:
    try:
        event, _env = decode(topic, record.value, record.headers)
    except DecodeError as exc:
        log.warning("tracker skipped undecodable record", topic=topic, offset=record.offset, reason=str(exc))
        return
    view.apply(event)
