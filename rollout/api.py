"""The deployment API's `/endpoints` routes: traffic policies, shadow relations and rollouts.

The same checks as `modelcd traffic|shadow|rollout` (rollout/traffic_ops.py, shadow/relations.py):
the CLI and the API refuse the same requests with the same reasons. Policies are published to the
bus, then written to the store's target state (what nodes reconcile against); rollout actions are
commands the rollout controller answers on the traffic topic.

    GET    /endpoints                               every endpoint's policy
    GET    /endpoints/{e}/traffic                   its policy                             -> 404 if none
    PUT    /endpoints/{e}/traffic                   {"routes": [{"model", "version", "weight"}], "sticky_key", "force"}
    DELETE /endpoints/{e}                           the endpoint's policy and shadows go   -> 200 / 404 / 409
    GET    /endpoints/{e}/shadows                   its shadow relations                   -> 404 if no policy
    POST   /endpoints/{e}/shadows                   {"primary", "shadow", "sample_rate", "start", "end" (or
                                                    "until"), "where", "criteria"}         -> 201 with the policy
    DELETE /endpoints/{e}/shadows/{shadow}[?primary=P]                                     -> 200 / 404
    GET    /endpoints/{e}/rollout                   current step, last analysis, history   -> 404 if none
    POST   /endpoints/{e}/rollout                   {"to", "plan", "steps", "interval", "max_hold", "log_rate",
                                                    bounds}                                -> 202
    POST   /endpoints/{e}/rollout/{pause|resume|abort|promote}   {"reason"}             -> 202 / 404 / 409

Refusals: 400 for a bad body (weights not adding to 100, unknown plan, steps that do not
increase, ...), 404 for an endpoint with nothing on record, 409 when a rollout is in the way
(`"force": true` overrides it for PUT traffic) or a route, canary or shadow names a version that
is not deployed and serving (the store's safety check, `modelcd.store.safety`, as the CLI), 503
when the traffic topic cannot be read or written. Edits of one policy are serialized within the process, so two concurrent requests
never both publish revision N+1 (two API processes still race, as two CLI users do).

The deployment API (ingest) mounts these routes without importing this part: whoever starts it
passes `api_routes(settings)` (`modelcd up`, `modelcd ingest`), a `RoutesFactory` per prefix.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiokafka.errors import KafkaError

from modelcd.events.bus import KafkaConfig
from modelcd.events.schemas import Criterion, Event, Route, TrafficPolicy
from modelcd.ingest.api import RoutesFactory
from modelcd.ingest.errors import ApiError
from modelcd.settings import Settings
from modelcd.shadow.relations import RelationError, add_relation, make_relation, remove_relation
from modelcd.store.safety import World, endpoint_name_problem
from modelcd.store.targets import TargetState

from .machine import RolloutError, make_plan, parse_duration
from .traffic_ops import (
    EndpointView,
    TrafficError,
    control_command,
    delete_policy,
    load_view,
    with_store,
    set_policy,
    start_command,
    status_dict,
)

Response = tuple[int, Any, list[tuple[bytes, bytes]]]
ViewLoader = Callable[[str], Awaitable[EndpointView]]

_STATUS = {"invalid": 400, "conflict": 409, "not_found": 404}


class EventSink(Protocol):
    async def publish(self, event: Event, *, event_id: str | None = None) -> None: ...


class PolicyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    routes: list[Route]
    sticky_key: str | None = "x-modelcd-key"
    force: bool = False


class ShadowBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    primary: str
    shadow: str
    sample_rate: float = 1.0
    start: str | float | None = None  # epoch seconds, ISO time or a duration from now; default now
    # epoch seconds, ISO time, a duration from now, or "never"/null; default 14d. `end` is the
    # relation's own field name (what GET answers), `until` the CLI's.
    end: str | float | None | msgspec.UnsetType = msgspec.UNSET
    until: str | float | None | msgspec.UnsetType = msgspec.UNSET
    where: list[str] = []  # "header:x-country=DE", "input:age>=18" (as `modelcd shadow add --where`)
    criteria: list[Criterion] = []


class RolloutBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    to: str
    plan: str = "standard"
    steps: list[float] | None = None
    interval: str | float | None = None  # seconds or "10m"
    max_hold: str | float | None = None  # seconds or "30m": the longest a step holds without a verdict
    log_rate: float | None = None
    max_error_rate: float | None = None
    max_error_rate_increase: float | None = None
    max_latency_p50_ms: float | None = None
    max_latency_p99_ms: float | None = None
    min_agreement: float | None = None
    output: str | None = None


class ActionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str = ""


def _decode(body: bytes, kind: type[msgspec.Struct], example: str) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}; expected {example}") from None


def _refused(exc: TrafficError | RolloutError | RelationError) -> ApiError:
    return ApiError(_STATUS[exc.kind] if isinstance(exc, TrafficError | RelationError) else 400, str(exc))


class EndpointRoutes:
    """Handlers for `/endpoints/...`; `load_view` reads the traffic topic (policy and rollout)."""

    def __init__(self, targets: TargetState, sink: EventSink, load_view: ViewLoader) -> None:
        self.targets = targets
        self.sink = sink
        self._load_view = load_view
        self._edit = asyncio.Lock()  # one read-modify-write of a policy at a time

    async def handle(self, method: str, parts: list[str], body: Callable[[], Awaitable[bytes]],
                     query: dict[str, str]) -> Response:
        if parts and (problem := endpoint_name_problem(parts[0])) is not None:
            raise ApiError(400, problem)  # before it becomes a store key (a NUL, a backslash, 5,000 characters)
        match parts:
            case []:
                ApiError.allow(method, "GET")
                policies = await self.targets.traffic()
                return 200, {"endpoints": [msgspec.to_builtins(p) for _, p in sorted(policies.items())
                                           if not p.deleted]}, []
            case [endpoint]:
                ApiError.allow(method, "DELETE")
                async with self._edit:
                    try:
                        policy = delete_policy(await self.load_view(endpoint), reason="deleted through the API")
                    except TrafficError as exc:
                        raise _refused(exc) from None
                    await self._save(policy)
                return 200, msgspec.to_builtins(policy), []
            case [endpoint, "traffic"]:
                ApiError.allow(method, "GET", "PUT")
                if method == "GET":
                    return 200, msgspec.to_builtins(await self._policy(endpoint)), []
                req = _decode(await body(), PolicyBody, '{"routes": [{"model": "iris", "version": "1", '
                                                        '"weight": 100}]}')
                async with self._edit:
                    try:
                        policy = set_policy(await self.load_view(endpoint), req.routes, world=await self._world(),
                                            sticky_key=req.sticky_key, force=req.force, reason="set through the API")
                    except TrafficError as exc:
                        raise _refused(exc) from None
                    await self._save(policy)
                return 200, msgspec.to_builtins(policy), []
            case [endpoint, "shadows"]:
                ApiError.allow(method, "GET", "POST")
                if method == "GET":
                    return 200, {"endpoint": endpoint,
                                 "shadows": msgspec.to_builtins((await self._policy(endpoint)).shadows)}, []
                raw = await body()
                async with self._edit:
                    return await self._add_shadow(endpoint, raw)
            case [endpoint, "shadows", shadow]:
                ApiError.allow(method, "DELETE")
                async with self._edit:
                    return await self._remove_shadow(endpoint, shadow, query.get("primary"))
            case [endpoint, "rollout"]:
                ApiError.allow(method, "GET", "POST")
                if method == "GET":
                    view = await self.load_view(endpoint)
                    if view.rollout is None:
                        raise ApiError(404, f"no rollout of {endpoint!r} on record")
                    return 200, status_dict(view.rollout), []
                return await self._start(endpoint, await body())
            case [endpoint, "rollout", action]:
                ApiError.allow(method, "POST")
                req = _decode(await body(), ActionBody, '{"reason": "..."}')
                try:
                    cmd = control_command(await self.load_view(endpoint), action,
                                          reason=req.reason or f"{action} through the API")
                except TrafficError as exc:
                    raise _refused(exc) from None
                await self._publish(cmd, "rollout command")
                return 202, {"endpoint": endpoint, "action": action, "command_id": cmd.command_id,
                             "status_url": f"/endpoints/{endpoint}/rollout"}, []
        raise ApiError(404, "no such route under /endpoints; see GET /endpoints")

    async def load_view(self, endpoint: str) -> EndpointView:
        """The endpoint as the traffic topic has it; 503 when the broker cannot be read."""
        try:
            view = await self._load_view(endpoint)
        except (KafkaError, OSError) as exc:
            raise ApiError(503, f"could not read the traffic topic from Kafka, retry later: {exc}") from exc
        # What a short topic lost, from the store: the same merge as the CLI's (traffic_ops.with_store).
        return with_store(view, await self.targets.get_traffic(endpoint), await self.targets.get_rollout(endpoint))

    async def _world(self) -> World:
        """What the safety check needs of the target state: which versions serve."""
        return World(models={f"{m.name}:{m.version}": m for m in await self.targets.models()})

    async def _publish(self, event: Event, what: str) -> None:
        try:
            await self.sink.publish(event)
        except Exception as exc:
            raise ApiError(503, f"could not publish the {what} to Kafka, retry later: {exc}") from exc

    async def _policy(self, endpoint: str) -> TrafficPolicy:
        policy = await self.targets.get_traffic(endpoint)
        if policy is None or policy.deleted:
            raise ApiError(404, f"no traffic policy for endpoint {endpoint!r}; PUT /endpoints/{endpoint}/traffic "
                                "sets one")
        return policy

    async def _save(self, policy: TrafficPolicy) -> None:
        # Bus first, then store (as `modelcd traffic set`): a refused publish changes nothing; the
        # store is what nodes repair from.
        await self._publish(policy, "traffic policy")
        await self.targets.put_traffic(policy)

    async def _add_shadow(self, endpoint: str, raw: bytes) -> Response:
        req = _decode(raw, ShadowBody, '{"primary": "iris", "shadow": "iris:2", "sample_rate": 0.1}')
        if req.end is not msgspec.UNSET and req.until is not msgspec.UNSET:
            raise ApiError(400, "give the relation's end as `end` or as `until`, not both")
        end = req.end if req.end is not msgspec.UNSET else req.until if req.until is not msgspec.UNSET else "14d"
        now = time.time()
        try:
            relation = make_relation(req.primary, req.shadow, now=now, sample_rate=req.sample_rate, start=req.start,
                                     end=end, where=req.where, criteria=req.criteria)
            policy = add_relation(await self.targets.get_traffic(endpoint), endpoint, relation, now=now,
                                  world=await self._world())
        except RelationError as exc:
            raise _refused(exc) from None
        await self._save(policy)
        return 201, msgspec.to_builtins(policy), []

    async def _remove_shadow(self, endpoint: str, shadow: str, primary: str | None) -> Response:
        policy = await self._policy(endpoint)
        primaries = [primary] if primary else sorted({r.primary for r in policy.shadows if r.shadow == shadow})
        new: TrafficPolicy | None = policy
        for p in primaries:
            new = remove_relation(new, p, shadow, now=time.time()) or new  # type: ignore[arg-type]
        if new is policy or new is None:
            raise ApiError(404, f"no shadow relation {primary or '*'} -> {shadow} on endpoint {endpoint!r}")
        await self._save(new)
        return 200, msgspec.to_builtins(new), []

    async def _start(self, endpoint: str, raw: bytes) -> Response:
        req = _decode(raw, RolloutBody, '{"to": "iris:2", "plan": "fast"}')
        try:
            interval = parse_duration(req.interval) if isinstance(req.interval, str) else req.interval
            max_hold = parse_duration(req.max_hold) if isinstance(req.max_hold, str) else req.max_hold
            plan = make_plan(req.plan, steps=req.steps, interval_s=interval, log_rate=req.log_rate,
                             max_hold_s=max_hold, max_error_rate=req.max_error_rate,
                             max_error_rate_increase=req.max_error_rate_increase,
                             max_latency_p50_ms=req.max_latency_p50_ms,
                             max_latency_p99_ms=req.max_latency_p99_ms, min_agreement=req.min_agreement,
                             output=req.output)
            cmd = start_command(await self.load_view(endpoint), req.to, plan, world=await self._world(),
                                reason="started through the API")
        except (TrafficError, RolloutError) as exc:
            raise _refused(exc) from None
        await self._publish(cmd, "rollout command")
        return 202, {"endpoint": endpoint, "rollout_id": cmd.rollout_id, "command_id": cmd.command_id,
                     "status_url": f"/endpoints/{endpoint}/rollout"}, []



def endpoint_routes(load_view: ViewLoader) -> RoutesFactory:
    """The `/endpoints` routes for a deployment API, reading endpoint views with `load_view`."""

    def factory(targets: TargetState, sink: Any) -> EndpointRoutes:
        return EndpointRoutes(targets, sink, load_view)

    return factory


def api_routes(settings: Settings) -> dict[str, RoutesFactory]:
    """What `modelcd up` and `modelcd ingest` mount on the deployment API: `/endpoints`, reading the traffic topic."""
    return {"endpoints": endpoint_routes(functools.partial(load_view, KafkaConfig.from_settings(settings)))}
