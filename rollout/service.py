"""The rollout controller: a stream processor whose state lives on `modelcd.traffic`.

On start it reads `modelcd.traffic` from the beginning and folds the RolloutStep facts
(`rollout.fold`), so a restarted controller resumes every rollout at the step it was at. Each
rollout's facts are also written to the store (`targets/rollouts/<endpoint>.json`) after the bus:
a topic that lost them (a broker restarted empty, retention, compaction) gets them back on start. It
republishes a policy that a crash left unpublished, applies commands written while it was down,
then follows the traffic topic (commands, policies) and the evidence topics
(`modelcd.predictions`, `modelcd.usage`, `modelcd.shadow-predictions`) live. Every `tick` it
analyses each rollout whose interval is up and publishes the decision: first the facts (the
commit point), then the TrafficPolicy, then the store's target state.

Evidence is kept in bounded per-rollout buffers (drops are counted) and re-read from the
topics on restart from the oldest active window on, so a restart loses no evidence either.
What counts against a model (`Evidence.window`): usage reports' answered requests and 5xx; their
4xx (`client_errors`) are the callers' mistakes and are compared apart. A request another shadow
relation shadowed is not in the prediction log; its ShadowPrediction carries the primary's answer,
which is a row of that arm. At 0 % (blue-green) the canary is judged against its primary on the
very requests it shadowed.

One controller runs per cluster (like Flagger's): it reads every partition itself, without a
consumer group, because it needs all of its state and all of the evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from modelcd.events.bus import KafkaConfig, Publisher, partitions_of, read_topic, stop_consumer
from modelcd.events.codec import DecodeError, decode
from modelcd.events.schemas import (
    Event,
    ModelState,
    PredictionLog,
    RolloutStep,
    ShadowPrediction,
    TrafficPolicy,
    UsageReport,
    new_id,
)
from modelcd.events.topics import PREDICTIONS, SHADOW_PREDICTIONS, TRAFFIC, USAGE
from modelcd.logs import get_logger
from modelcd.settings import Settings
from modelcd.store.restore import missing_rollouts, restore_id
from modelcd.store.safety import Unsafe, World, check_serving

from .analysis import Analysis, ArmWindow, analyze, extract_values
from .machine import (
    Rollout,
    RolloutError,
    apply,
    due,
    fold,
    on_analysis,
    on_command,
    pending_commands,
    policy_for,
    same_traffic,
)

log = get_logger("modelcd.rollout")

EVIDENCE_TOPICS = (PREDICTIONS, USAGE, SHADOW_PREDICTIONS)
SOURCE = "rollout-controller"


class TrafficSink(Protocol):
    """Where policies and rollout facts are written besides the bus: the store's target state (`TargetState`)."""

    async def put_traffic(self, policy: TrafficPolicy) -> None: ...

    async def put_rollout(self, endpoint: str, facts: list[RolloutStep]) -> None: ...

    async def rollouts(self) -> dict[str, list[RolloutStep]]: ...

    async def traffic(self) -> dict[str, TrafficPolicy]: ...


_inputs_encoder = msgspec.json.Encoder(order="deterministic")


@dataclass
class Evidence:
    """Bounded evidence of one rollout; analysed over [window_start, now]."""

    max_samples: int
    logs: deque[PredictionLog] = field(init=False)
    usage: deque[UsageReport] = field(init=False)
    shadows: deque[ShadowPrediction] = field(init=False)
    dropped: int = 0

    def __post_init__(self) -> None:
        self.logs = deque(maxlen=self.max_samples)
        self.usage = deque(maxlen=self.max_samples)
        self.shadows = deque(maxlen=self.max_samples)

    def add(self, buf: deque[Any], item: Any) -> None:
        if len(buf) == buf.maxlen:
            self.dropped += 1  # the oldest sample goes: the window's newest evidence matters most
        buf.append(item)

    def window(self, r: Rollout) -> tuple[ArmWindow, ArmWindow, list[tuple[Any, Any]]]:
        """(canary, baseline, pairs) over the current step's window."""
        out = r.plan.thresholds.output
        arms = {r.canary: ArmWindow(), r.baseline: ArmWindow()}
        by_input: dict[str, list[Any]] = {}
        canary_by_input: list[tuple[str, list[Any]]] = []
        for lg in self.logs:
            ref = f"{lg.model}:{lg.version}"
            arm = arms.get(ref)
            if arm is None or lg.at < r.window_start or lg.endpoint not in ("", r.endpoint):
                continue
            if lg.error and 400 <= lg.status < 500:  # the caller's mistake, not the model's
                arm.client_errors += 1
                continue
            arm.requests += 1
            if lg.error:
                arm.errors += 1
                continue
            arm.latencies_ms.append(lg.latency_ms)
            values = extract_values(lg.outputs, out)
            arm.outputs.extend(values)
            if lg.inputs:
                digest = hashlib.blake2b(_inputs_encoder.encode(lg.inputs), digest_size=12).hexdigest()
                if ref == r.baseline:
                    by_input.setdefault(digest, values)
                else:
                    canary_by_input.append((digest, values))
        # Identical inputs answered by both models are paired samples, as good as shadow traffic.
        pairs: list[tuple[Any, Any]] = []
        for digest, c_vals in canary_by_input:
            b_vals = by_input.get(digest)
            if b_vals is not None and len(b_vals) == len(c_vals):
                pairs.extend(zip(b_vals, c_vals, strict=True))
        # Shadow predictions (baseline primary, canary shadow): paired; at 0 % they are the canary.
        shadow_arm, primary_arm = ArmWindow(), ArmWindow()
        seen: set[tuple[str, str]] = set()
        for s in self.shadows:
            if s.at < r.window_start:
                continue
            primary = f"{s.primary_model}:{s.primary_version}"
            # A shadowed request's primary answer is published here instead of in a prediction log
            # (the node does not log it twice): it is a row of that arm, once per request.
            if primary in arms and (primary, s.request_id) not in seen:
                seen.add((primary, s.request_id))
                arms[primary].requests += 1
                arms[primary].latencies_ms.append(s.primary_latency_ms)
                arms[primary].outputs.extend(extract_values(s.primary_outputs, out))
            if primary != r.baseline or f"{s.shadow_model}:{s.shadow_version}" != r.canary:
                continue
            shadow_arm.requests += 1
            primary_arm.requests += 1  # a request is shadowed once its primary answered it
            primary_arm.latencies_ms.append(s.primary_latency_ms)
            b_vals = extract_values(s.primary_outputs, out)
            primary_arm.outputs.extend(b_vals)
            if s.shadow_error:
                shadow_arm.errors += 1
                continue
            shadow_arm.latencies_ms.append(s.shadow_latency_ms)
            c_vals = extract_values(s.shadow_outputs, out)
            shadow_arm.outputs.extend(c_vals)
            if len(c_vals) == len(b_vals):
                pairs.extend(zip(b_vals, c_vals, strict=True))
        # Usage reports count every request (logs are sampled): prefer them where nodes sent any.
        counts: dict[str, list[int]] = {}
        for u in self.usage:
            ref = f"{u.model}:{u.version}"
            if ref in arms and u.interval_end >= r.window_start:
                c = counts.setdefault(ref, [0, 0, 0])
                c[0] += u.count
                c[1] += u.errors - u.client_errors
                c[2] += u.client_errors
        # A client error (4xx) never reached the model: it is neither a request the model answered
        # nor a model error; the analysis compares its share between the arms apart.
        for ref, (answered, errors, client) in counts.items():
            if answered + errors + client > 0:
                a = arms[ref]
                a.requests, a.errors, a.client_errors = answered + errors, errors, client
        canary, baseline = arms[r.canary], arms[r.baseline]
        if r.weight == 0:
            # At 0 % the canary answers only shadowed requests: judge it against its primary on the
            # very same requests (the primary answered each; the canary may not have).
            canary, baseline = shadow_arm, primary_arm
        return canary, baseline, pairs


class RolloutController:
    """The controller service: `async with` it, then `await run(stop=..., ready=...)`."""

    def __init__(self, cfg: KafkaConfig, *, targets: TrafficSink | None = None, tick: float = 1.0,
                 max_samples: int = 20_000, topic_prefix: str = "",
                 clock: Callable[[], float] = time.time,
                 models: Callable[[], Awaitable[Iterable[ModelState]]] | None = None) -> None:
        self._cfg = cfg
        # The target state's models (`TargetState.models`): a start command that reached the topic without the
        # CLI's or the API's check (published straight to Kafka) is checked again here. None: not checked.
        self._models = models
        self._targets = targets
        self._tick = tick
        self._max_samples = max_samples
        self._prefix = topic_prefix
        self._clock = clock
        self._pub = Publisher(cfg, SOURCE, topic_prefix=topic_prefix)
        self.rollouts: dict[str, Rollout] = {}
        self.policies: dict[str, TrafficPolicy] = {}
        self.evidence: dict[str, Evidence] = {}  # by rollout id
        self.last_analysis: dict[str, Analysis] = {}
        self._own: set[str] = set()  # ids of the events we published: applied already when read back
        self.stats = {"decisions": 0, "commands": 0, "refused": 0, "undecodable": 0}

    async def __aenter__(self) -> RolloutController:
        await self._pub.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pub.stop()

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        positions = await self._recover()
        consumer = AIOKafkaConsumer(bootstrap_servers=self._cfg.bootstrap, client_id=f"{self._cfg.client_id}-rollout",
                                    group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            await self._assign(consumer, positions)
            # No decision before the evidence that was already on the topics has been read again:
            # judging a window on part of it could promote or roll back on a biased sample.
            backlog = {tp: end for tp, end in (await consumer.end_offsets(list(consumer.assignment()))).items()
                       if tp.topic != self._prefix + TRAFFIC and end > 0}
            if ready is not None:
                ready.set()
            log.info("rollout controller ready", active=[r.endpoint for r in self.rollouts.values() if r.active])
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=int(self._tick * 1000))
                for records in batches.values():
                    for record in records:
                        await self._on_record(record)
                for tp in list(backlog):
                    if await consumer.position(tp) >= backlog[tp]:
                        del backlog[tp]
                if not backlog:
                    await self.tick()
        finally:
            await stop_consumer(consumer)

    async def _recover(self) -> dict[TopicPartition, int]:
        """Rebuild every rollout from the traffic topic; return where to follow it from."""
        records = await read_topic(self._cfg, TRAFFIC, topic_prefix=self._prefix)
        steps: list[RolloutStep] = []
        positions: dict[TopicPartition, int] = {}
        for event, _env, record in records:
            positions[TopicPartition(record.topic, record.partition)] = record.offset + 1
            match event:
                case TrafficPolicy():
                    self.policies[event.endpoint] = event
                case RolloutStep():
                    steps.append(event)
                    if not event.command:
                        r = apply(self.rollouts.get(event.endpoint), event)
                        if r is not None:
                            self.rollouts[event.endpoint] = r
        await self._restore(steps)
        await self._restore_policies()
        for r in self.rollouts.values():
            if r.active:
                self.evidence[r.rollout_id] = Evidence(self._max_samples)
                log.info("resuming rollout", endpoint=r.endpoint, rollout_id=r.rollout_id, step=r.step,
                         weight=r.weight, phase=str(r.phase))
        # A crash between a fact and its policy leaves the policy behind: bring it level.
        for r in list(self.rollouts.values()):
            if r.history and r.history[-1].at > self.policies.get(r.endpoint, _NO_POLICY).at - 1e-9:
                await self._publish_policy(r)
        for cmd in pending_commands(steps):
            await self._on_command(cmd)
        return positions

    async def _restore(self, on_topic: list[RolloutStep]) -> None:
        """The store keeps each endpoint's latest rollout (its facts): a topic that lost them (a broker
        restarted empty) gets them back, and one that holds fewer (compaction, retention) is read with
        the store's, so a rollout's state and history survive what the broker forgets."""
        if self._targets is None:
            return
        try:
            stored = await self._targets.rollouts()
        except Exception:  # the topic is all we have; say so
            log.exception("could not read the rollouts kept in the store")
            return
        lost = missing_rollouts(stored, on_topic)
        for endpoint, facts in lost.items():
            for i, fact in enumerate(facts):
                event_id = restore_id("rollout", fact.rollout_id, i)
                self._own.add(event_id)
                await self._pub.publish(fact, event_id=event_id)
            log.warning("restored a rollout the broker had lost, from the store", endpoint=endpoint,
                        rollout_id=facts[0].rollout_id, facts=len(facts))
        for endpoint, facts in stored.items():
            r = self.rollouts.get(endpoint)
            if endpoint in lost or (r is not None and r.rollout_id == facts[0].rollout_id
                                    and len(r.history) < len(facts)):
                if (folded := fold(facts).get(endpoint)) is not None:
                    self.rollouts[endpoint] = folded

    async def _restore_policies(self) -> None:
        """Policies the topic lost (a broker restarted empty) or holds older revisions of are read from the
        store before anything is brought level: a policy published for a rollout after a restart continues
        the endpoint's revisions and keeps its shadows, instead of starting over at revision 1 without
        them (and overwriting the store's, so ingest's restore would then find nothing to put back)."""
        if self._targets is None:
            return
        try:
            stored = await self._targets.traffic()
        except Exception:  # the topic is all we have; say so
            log.exception("could not read the traffic policies kept in the store")
            return
        for endpoint, policy in stored.items():
            seen = self.policies.get(endpoint)
            if seen is None or seen.revision < policy.revision:
                self.policies[endpoint] = policy

    async def _assign(self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int]) -> None:
        tps = await partitions_of(consumer, [self._prefix + t for t in (TRAFFIC, *EVIDENCE_TOPICS)])
        consumer.assign(tps)
        windows = [r.window_start for r in self.rollouts.values() if r.active]
        to_end: list[TopicPartition] = []
        # One call per kind of seek: each of aiokafka's offset resets waits for the fetcher.
        evidence = [tp for tp in tps if tp.topic != self._prefix + TRAFFIC]
        found = await consumer.offsets_for_times({tp: int(min(windows) * 1000) for tp in evidence}) if windows else {}
        for tp in tps:
            if tp.topic == self._prefix + TRAFFIC:
                consumer.seek(tp, positions.get(tp, 0))  # offset 0: the partition was empty when we read it
            elif (hit := found.get(tp)) is not None:
                # Evidence of the active windows is on the topics: read it again. (Brokers that
                # cannot seek by time answer offset 0, which is slower but as correct.)
                consumer.seek(tp, hit.offset)
            else:
                to_end.append(tp)
        if to_end:
            await consumer.seek_to_end(*to_end)

    # --- input ----------------------------------------------------------------------------------

    async def _on_record(self, record: Any) -> None:
        topic = record.topic[len(self._prefix):]
        try:
            event, env = decode(topic, record.value, record.headers)
        except DecodeError as exc:
            self.stats["undecodable"] += 1
            log.warning("skipped undecodable record", topic=record.topic, offset=record.offset, reason=str(exc))
            return
        if env.id in self._own:
            self._own.discard(env.id)
            return
        await self.handle(event)

    async def handle(self, event: Event) -> None:
        """One event from any of the controller's topics."""
        match event:
            case PredictionLog():
                for r in self._active_with(f"{event.model}:{event.version}"):
                    self._evidence(r).add(self._evidence(r).logs, event)
            case UsageReport():
                for r in self._active_with(f"{event.model}:{event.version}"):
                    self._evidence(r).add(self._evidence(r).usage, event)
            case ShadowPrediction():
                # Blue-green's pairs (the canary shadowing the baseline), and the primary's answer of a
                # request another relation shadowed (the node does not log it twice).
                refs = {f"{event.shadow_model}:{event.shadow_version}", f"{event.primary_model}:{event.primary_version}"}
                for r in [r for r in self.rollouts.values() if r.active and refs & {r.canary, r.baseline}]:
                    self._evidence(r).add(self._evidence(r).shadows, event)
            case TrafficPolicy():
                self.policies[event.endpoint] = event
            case RolloutStep(command=True):
                await self._on_command(event)
            case RolloutStep():
                # A fact we did not write (another controller, or a tool): follow it all the same.
                r = apply(self.rollouts.get(event.endpoint), event)
                if r is not None:
                    self.rollouts[event.endpoint] = r

    def _active_with(self, ref: str) -> list[Rollout]:
        return [r for r in self.rollouts.values() if r.active and ref in (r.canary, r.baseline)]

    def _evidence(self, r: Rollout) -> Evidence:
        ev = self.evidence.get(r.rollout_id)
        if ev is None:
            ev = self.evidence[r.rollout_id] = Evidence(self._max_samples)
        return ev

    async def _on_command(self, cmd: RolloutStep) -> None:
        self.stats["commands"] += 1
        bound = log.bind(endpoint=cmd.endpoint, command=cmd.action, command_id=cmd.command_id)
        try:
            if cmd.action == "start":
                await self._check_canary(cmd.canary)
            facts = on_command(self.rollouts.get(cmd.endpoint), cmd, self.policies.get(cmd.endpoint), self._clock())
        except (RolloutError, Unsafe) as exc:
            self.stats["refused"] += 1
            bound.warning("command refused", reason=str(exc))
            return
        await self._commit(facts)

    async def _check_canary(self, canary: str) -> None:
        """The store's safety check on a start command's canary: a canary that is not deployed and serving would
        fail every request its first step routes to it. A store that cannot be read refuses (the command is
        applied again after a restart: `pending_commands`)."""
        if self._models is None:
            return
        try:
            models = await self._models()
        except Exception as exc:
            raise RolloutError(f"could not read the target state to check canary {canary}: {exc}") from None
        check_serving([canary], World(models={f"{m.name}:{m.version}": m for m in models}), role="canary")

    # --- decisions ------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Analyse every rollout whose interval is up, and publish what follows."""
        now = self._clock()
        for r in list(self.rollouts.values()):
            if not due(r, now):
                continue
            canary, baseline, pairs = self._evidence(r).window(r)
            analysis = analyze(canary, baseline, r.plan.thresholds, pairs, window_s=now - r.window_start)
            self.last_analysis[r.endpoint] = analysis
            facts = on_analysis(r, analysis, now)
            self.stats["decisions"] += 1
            log.info("rollout analysis", endpoint=r.endpoint, rollout_id=r.rollout_id, step=r.step,
                     weight=r.weight, verdict=str(analysis.verdict), reason=analysis.reason)
            await self._commit(facts)

    async def _commit(self, facts: list[RolloutStep]) -> None:
        """Publish the facts (the commit point), apply them, then publish the policy they imply."""
        if not facts:
            return
        for fact in facts:
            event_id = new_id()
            self._own.add(event_id)
            await self._pub.publish(fact, event_id=event_id)
            r = apply(self.rollouts.get(fact.endpoint), fact)
            if r is not None:
                self.rollouts[fact.endpoint] = r
            log.info("rollout step", endpoint=fact.endpoint, rollout_id=fact.rollout_id, action=fact.action,
                     step=fact.step, weight=fact.weight, reason=fact.reason)
        r = self.rollouts.get(facts[-1].endpoint)
        if r is not None:
            await self._persist(r)
            if r.active and r.rollout_id not in self.evidence:
                self.evidence[r.rollout_id] = Evidence(self._max_samples)
            if not r.active:
                self.evidence.pop(r.rollout_id, None)
            await self._publish_policy(r)

    async def _publish_policy(self, r: Rollout) -> None:
        current = self.policies.get(r.endpoint)
        policy = policy_for(r, current)
        if same_traffic(current, policy):
            return
        event_id = new_id()
        self._own.add(event_id)
        await self._pub.publish(policy, event_id=event_id)
        self.policies[r.endpoint] = policy
        if self._targets is not None:
            try:
                await self._targets.put_traffic(policy)
            except Exception:  # the bus has it; the nodes' reconciliation will catch up with the store
                log.exception("could not write the traffic policy to the store", endpoint=r.endpoint)


    async def _persist(self, r: Rollout) -> None:
        """The rollout's facts to the store, after the bus (the commit point): its durable home."""
        if self._targets is None:
            return
        try:
            await self._targets.put_rollout(r.endpoint, list(r.history))
        except Exception:  # the bus has them; the next fact writes the whole history again
            log.exception("could not write the rollout to the store", endpoint=r.endpoint)


_NO_POLICY = TrafficPolicy(endpoint="", at=0.0)


async def run_controller(settings: Settings, *, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """The controller with the store's target state as its TrafficSink, until `stop` is set."""
    cfg = KafkaConfig.from_settings(settings)
    async with contextlib.AsyncExitStack() as stack:
        targets: TrafficSink | None = None
        models = None
        try:
            from modelcd.store.blobs import open_store
            from modelcd.store.targets import TargetState
        except ImportError:  # pragma: no cover - the store ships with ingest
            log.warning("no store available: traffic policies go to the bus only")
        else:
            store = await stack.enter_async_context(
                open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url))
            targets = TargetState(store)
            models = targets.models
        controller = await stack.enter_async_context(
            RolloutController(cfg, targets=targets, tick=settings.rollout_tick,
                              max_samples=settings.rollout_max_samples, models=models))
        await controller.run(stop=stop, ready=ready)
