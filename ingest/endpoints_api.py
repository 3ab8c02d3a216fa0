"""The deployment API's `/endpoints` routes: traffic policies, shadow relations and rollouts.

The same checks as `modelcd traffic|shadow|rollout` (serving/traffic_ops.py, shadow/relations.py):
the CLI and the API refuse the same requests with the same reasons. Policies are published to the
bus, then written to the store's target state (what nodes reconcile against); rollout actions are
commands the rollout controller answers on the traffic topic.

    GET    /endpoints                               every endpoint's policy
    GET    /endpoints/{e}/traffic                   its policy                             -> 404 if none
    PUT    /endpoints/{e}/traffic                   {"routes": [{"model", "version", "weight"}], "sticky_key", "force"}
    GET    /endpoints/{e}/shadows                   its shadow relations
    POST   /endpoints/{e}/shadows                   {"primary", "shadow", "sample_rate", "start", "until", "where"}
    DELETE /endpoints/{e}/shadows/{shadow}[?primary=P]
    GET    /endpoints/{e}/rollout                   current step, last analysis, history   -> 404 if none
    POST   /endpoints/{e}/rollout                   {"to", "plan", "steps", "interval", "log_rate", bounds}  -> 202
    POST   /endpoints/{e}/rollout/{pause|resume|abort|promote}   {"reason"}             -> 202
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from modelcd.events.schemas import Criterion, Event, Route, ShadowRelation, TrafficPolicy
from modelcd.serving.rollout import RolloutError, make_plan, parse_duration
from modelcd.serving.traffic_ops import (
    EndpointView, TrafficError, control_command, set_policy, start_command, status_dict,
)
from modelcd.shadow.relations import RelationError, add_relation, check_refs, parse_time, parse_where, remove_relation

from .errors import ApiError
from .targets import TargetState

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
    until: str | float | None = "14d"  # epoch seconds, ISO time, a duration from now, or "never"
    where: list[str] = []  # "header:x-country=DE", "input:age>=18" (as `modelcd shadow add --where`)
    criteria: list[Criterion] = []


class RolloutBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    to: str
    plan: str = "standard"
    steps: list[float] | None = None
    interval: str | float | None = None  # seconds or "10m"
    log_rate: float | None = None
    max_error_rate: float | None = None
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
    return ApiError(_STATUS[exc.kind] if isinstance(exc, TrafficError) else 400, str(exc))


def _when(value: str | float | None, now: float, default: float | None) -> float | None:
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    return parse_time(value, now)


class EndpointRoutes:
    """Handlers for `/endpoints/...`; `load_view` reads the traffic topic (policy and rollout)."""

    def __init__(self, targets: TargetState, sink: EventSink, load_view: ViewLoader) -> None:
        self.targets = targets
        self.sink = sink
        self.load_view = load_view

    async def handle(self, method: str, parts: list[str], body: Callable[[], Awaitable[bytes]],
                     query: dict[str, str]) -> Response:
        match parts:
            case []:
                ApiError.allow(method, "GET")
                policies = await self.targets.traffic()
                return 200, {"endpoints": [msgspec.to_builtins(p) for _, p in sorted(policies.items())
                                           if not p.deleted]}, []
            case [endpoint, "traffic"]:
                ApiError.allow(method, "GET", "PUT")
                if method == "GET":
                    return 200, msgspec.to_builtins(await self._policy(endpoint)), []
                req = _decode(await body(), PolicyBody, '{"routes": [{"model": "iris", "version": "1", '
                                                        '"weight": 100}]}')
                try:
                    policy = set_policy(await self.load_view(endpoint), req.routes, sticky_key=req.sticky_key,
                                        force=req.force, reason="set through the API")
                except TrafficError as exc:
                    raise _refused(exc) from None
                await self._save(policy)
                return 200, msgspec.to_builtins(policy), []
            case [endpoint, "shadows"]:
                ApiError.allow(method, "GET", "POST")
                if method == "GET":
                    return 200, {"endpoint": endpoint,
                                 "shadows": msgspec.to_builtins((await self._policy(endpoint)).shadows)}, []
                return await self._add_shadow(endpoint, await body())
            case [endpoint, "shadows", shadow]:
                ApiError.allow(method, "DELETE")
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
                await self.sink.publish(cmd)
                return 202, {"endpoint": endpoint, "action": action, "command_id": cmd.command_id,
                             "status_url": f"/endpoints/{endpoint}/rollout"}, []
        raise ApiError(404, "no such route under /endpoints; see GET /endpoints")

    async def _policy(self, endpoint: str) -> TrafficPolicy:
        policy = await self.targets.get_traffic(endpoint)
        if policy is None or policy.deleted:
            raise ApiError(404, f"no traffic policy for endpoint {endpoint!r}; PUT /endpoints/{endpoint}/traffic "
                                "sets one")
        return policy

    async def _save(self, policy: TrafficPolicy) -> None:
        # Bus first, then store: a refused publish changes nothing; the store is what nodes repair from.
        try:
            await self.sink.publish(policy)
        except Exception as exc:
            raise ApiError(503, f"could not publish the traffic policy to Kafka, retry later: {exc}") from exc
        await self.targets.put_traffic(policy)

    async def _add_shadow(self, endpoint: str, raw: bytes) -> Response:
        req = _decode(raw, ShadowBody, '{"primary": "iris", "shadow": "iris:2", "sample_rate": 0.1}')
        now = time.time()
        try:
            check_refs(req.primary, req.shadow)
            start = _when(req.start, now, now) or now
            relation = ShadowRelation(primary=req.primary, shadow=req.shadow, start=start,
                                      end=_when(req.until, now, None), sample_rate=req.sample_rate,
                                      criteria=[*req.criteria, *(parse_where(w) for w in req.where)])
            policy = add_relation(await self.targets.get_traffic(endpoint), endpoint, relation, now=now)
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
            plan = make_plan(req.plan, steps=req.steps, interval_s=interval, log_rate=req.log_rate,
                             max_error_rate=req.max_error_rate, max_latency_p50_ms=req.max_latency_p50_ms,
                             max_latency_p99_ms=req.max_latency_p99_ms, min_agreement=req.min_agreement,
                             output=req.output)
            cmd = start_command(await self.load_view(endpoint), req.to, plan, reason="started through the API")
        except (TrafficError, RolloutError) as exc:
            raise _refused(exc) from None
        await self.sink.publish(cmd)
        return 202, {"endpoint": endpoint, "rollout_id": cmd.rollout_id, "command_id": cmd.command_id,
                     "status_url": f"/endpoints/{endpoint}/rollout"}, []

