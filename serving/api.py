"""The node's HTTP surface: a raw ASGI app speaking the Open Inference Protocol (KServe V2) REST.

Routes:
    GET  /v2                                       server metadata
    GET  /v2/health/live | /v2/health/ready        200, or 503 while starting or stopping
    GET  /v2/models/{name}[/versions/{v}]          model metadata (loads the model if it was evicted)
    GET  /v2/models/{name}[/versions/{v}]/ready    200 if it answers now, else 503 (404 if unknown)
    POST /v2/models/{name}[/versions/{v}]/infer    inference; {name} may be an endpoint (traffic policy)
    POST /v2/repository/index                      every model version on this node with its state (the
                                                   repository extension's index; GET works too)
    GET  /metrics                                  Prometheus
    GET  /openapi.json                             OpenAPI 3 document of the above

A method a route does not take is a 405 with `Allow` (GET on `.../infer` included). A request
body may be `Content-Encoding: gzip` or `deflate`: it is inflated up to `max_request_bytes`
(more is a 413, so a small bomb cannot grow past the limit). Every inference response carries
the request id (the body's `id`, else the `x-request-id` header, else one the node makes) in its
`id` field and its `x-request-id` header: the id the prediction log records.

Bounds (each a `MODELCD_*` setting): a body over `max_request_bytes` is a 413, checked on
Content-Length before reading and while reading chunks; the bodies of requests in flight add
up to at most `max_inflight_bytes` (a new one beyond that is a 503 with Retry-After; one
request alone is always admitted), held until its response is sent; a response over
`max_response_bytes` is a 400 that says to ask for less. Every 503 carries Retry-After.

Known vs unknown: until the node has read the target state (not ready yet), a name it does
not know may simply not be read yet, so it answers 503 + Retry-After, never 404; a model
deployed here but not loaded yet gets `load_wait` seconds, then 503 + Retry-After while
the load goes on. A model the node evicted for its memory budget is reloaded within the
request (its own choice, not the client's problem).

Why raw ASGI: the request path is the product; a framework's routing, request objects
and middleware cost more than the model for microsecond models (bench/RESULTS.md).
The infer path does: one header scan, msgspec decode, a dict lookup, one numpy array
per input, predict, one encode. Only errors are logged (with the request id bound);
successful requests are counted in metrics and usage, and sampled into prediction logs.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from modelcd import __version__
from modelcd.events.schemas import PredictionLog
from modelcd.logs import get_logger

from .errors import (
    InvalidRequest,
    ModelLoading,
    ModelNotFound,
    NodeOverloaded,
    NodeStarting,
    NodeUnavailable,
    PredictTimeout,
    RequestTooLarge,
    ServingError,
)
from .hooks import PrimaryResult, ShadowHook
from .metrics import NodeMetrics
from .openapi import OPENAPI
from .protocol import ServerMetadata, decode_request, encode, encode_response, error_body, tensors_to_log
from .registry import ModelEntry, Registry
from .telemetry import Telemetry

log = get_logger("modelcd.serving.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
_HLEN = b"inference-header-content-length"
_REQUEST_ID = b"x-request-id"
_CONTENT_LENGTH = b"content-length"
_CONTENT_ENCODING = b"content-encoding"
_MODELS = "/v2/models/"
_OK = b"{}"
_JSON_RETRY = [*_JSON, (b"retry-after", b"1")]


# Request ids the node makes: 32 hex digits like a uuid4's, but a random per-process prefix and a counter
# instead of 16 fresh random bytes per request (uuid4 was ~5 % of the node's CPU at saturation). Unique on
# this node (the counter), and across nodes and restarts (64 random bits per process).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A request id unique per node process: `<16 hex random per process><16 hex counter>`."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class NodeState:
    """What the API reads about its node: readiness (set by the node, cleared first when stopping)."""

    def __init__(self) -> None:
        self.ready = False
        self.stopping = False


class InFlight:
    """Bytes of request bodies the node holds now, against a budget (one request alone always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def take(self, n: int) -> bool:
        if self.used and self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


class _Held:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class ServingApp:
    def __init__(self, registry: Registry, telemetry: Telemetry, metrics: NodeMetrics, state: NodeState, *,
                 node: str, max_body: int, log_rate: float, shadow: ShadowHook | None = None,
                 max_inflight: int | None = None, max_response: int | None = None, load_wait: float = 1.0) -> None:
        self.registry = registry
        self.telemetry = telemetry
        self.metrics = metrics
        self.state = state
        self.node = node
        self.max_body = max_body
        self.log_rate = log_rate
        self.shadow = shadow
        self.inflight = InFlight(max_inflight if max_inflight is not None else 8 * max_body)
        self.max_response = max_response
        self.load_wait = load_wait
        self._server_meta = encode(ServerMetadata(name="modelcd", version=__version__,
                                                  extensions=["binary_tensor_data", "model_repository_endpoints"]))
        self._openapi = encode(OPENAPI)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # uvicorn runs with lifespan="off"; tolerate servers that do not
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith(_MODELS) and path.endswith("/infer"):
            if method == "POST":
                await self._infer(scope, receive, send, path[len(_MODELS):-len("/infer")])
            else:
                await _not_allowed(send, method, path, b"POST")
            return
        if path == "/v2/repository/index":
            if method in ("POST", "GET"):
                await self._repository_index(receive)(send)
            else:
                await _not_allowed(send, method, path, b"POST, GET")
            return
        if method not in ("GET", "HEAD"):
            await _not_allowed(send, method, path, b"GET, HEAD")
            return
        if path.startswith(_MODELS):
            await self._model_get(send, path[len(_MODELS):])
        elif path == "/v2/health/live":
            await _respond(send, 200, _OK)
        elif path == "/v2/health/ready":
            if self.state.ready and not self.state.stopping:
                await _respond(send, 200, _OK)
            else:
                await _respond(send, 503, error_body("stopping" if self.state.stopping else
                                                     "starting: catching up on the target state"), _JSON_RETRY)
        elif path in ("/v2", "/v2/"):
            await _respond(send, 200, self._server_meta)
        elif path == "/metrics":
            await _respond(send, 200, self.metrics.render(), _TEXT)
        elif path == "/openapi.json":
            await _respond(send, 200, self._openapi)
        else:
            await _respond(send, 404, error_body(f"no route {path}; see /openapi.json"))

    # ------------------------------------------------------------------ inference

    async def _infer(self, scope: Scope, receive: Receive, send: Send, tail: str) -> None:
        held = _Held()
        try:
            await self._infer_held(scope, receive, send, tail, held)
        finally:
            self.inflight.release(held.n)

    async def _infer_held(self, scope: Scope, receive: Receive, send: Send, tail: str, held: _Held) -> None:
        t0 = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        header_length: int | None = None
        request_id: str | None = None
        entry: ModelEntry | None = None
        endpoint = ""
        encoding = ""
        log_rate = self.log_rate
        try:
            name, version = _split(tail)
            for k, v in headers:
                if k == _HLEN:
                    header_length = _int_header(v, "Inference-Header-Content-Length")
                elif k == _REQUEST_ID:
                    request_id = v.decode(errors="replace")
                elif k == _CONTENT_LENGTH:
                    length = _int_header(v, "Content-Length")
                    if length > self.max_body:
                        raise RequestTooLarge(self._too_large())
                    self._hold(held, length)
                elif k == _CONTENT_ENCODING:
                    encoding = v.decode(errors="replace").strip().lower()
            body = await self._body(receive, held)
            if body is None:
                return  # the client went away
            if encoding not in ("", "identity"):
                body = self._inflate(body, encoding, held)
            req, binary = decode_request(body, header_length)
            # The id the caller finds in the response (field and header) and in its prediction log.
            request_id = req.id or request_id or new_request_id()
            req.id = request_id
            entry, endpoint, route_rate = self._route(name, version, headers, req.parameters)
            if route_rate is not None:
                log_rate = route_rate
            loaded = entry.loaded or await self._acquire(entry)
            entry.last_used = time.monotonic()  # the budget evicts least recently used: a model in use stays
            inputs = loaded.codec.decode_inputs(req, binary)
            if req.outputs:
                loaded.codec.check_requested(req)
            shape = req.inputs[0].shape
            outputs = await self.registry.predict(entry, loaded, inputs, shape[0] if shape else 1)
            out, out_header_length = encode_response(outputs, req, entry.name, entry.version, self.max_response)
        except ServingError as exc:
            await self._failed(send, exc, entry, request_id, tail, t0, endpoint=endpoint, log_rate=log_rate)
            return
        except Exception as exc:  # a bug must still answer with a reason, and never kill the server
            log.exception("inference failed unexpectedly", request_id=request_id, target=tail)
            await self._failed(send, ServingError(f"internal error: {type(exc).__name__}: {exc}"), entry,
                               request_id, tail, t0, endpoint=endpoint, log_rate=log_rate)
            return
        rid = (_REQUEST_ID, request_id.encode(errors="replace"))
        if out_header_length is None:
            await _respond(send, 200, out, [*_JSON, rid])
        else:
            await _respond(send, 200, out, [(b"content-type", b"application/octet-stream"),
                                            (_HLEN, str(out_header_length).encode()), rid])
        elapsed = time.perf_counter() - t0
        m = entry.metrics
        m.requests.inc()
        m.latency.observe(elapsed)
        usage = entry.usage
        usage.count += 1
        usage.last_used = time.time()
        shadowed = 0
        if self.shadow is not None and self.shadow.rules:  # after the response: off the request's path
            params = req.parameters or {}
            shadowed = self.shadow.offer(PrimaryResult(
                request_id=request_id, model=entry.name, version=entry.version, inputs=inputs,
                outputs=outputs, latency_ms=elapsed * 1000, headers=headers, params=params,
                entity=str(params["entity_id"]) if "entity_id" in params else None))
        # A shadowed request's primary output is published in its ShadowPrediction: not logged twice.
        if log_rate and not shadowed and random.random() < log_rate:
            self.telemetry.offer(PredictionLog(
                request_id=request_id, model=entry.name, version=entry.version,
                endpoint=endpoint, node=self.node, inputs=tensors_to_log(inputs), outputs=tensors_to_log(outputs),
                latency_ms=elapsed * 1000))

    def _hold(self, held: _Held, size: int) -> None:
        """Count `size` bytes of this request against the in-flight budget (up to `size` in all)."""
        more = size - held.n
        if more <= 0:
            return
        if not self.inflight.take(more):
            raise NodeOverloaded(
                f"the node already holds {self.inflight.used} bytes of requests in flight "
                f"(MODELCD_MAX_INFLIGHT_BYTES={self.inflight.limit}); retry shortly, or send smaller requests")
        held.n = size

    async def _body(self, receive: Receive, held: _Held) -> bytes | None:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body: bytes = msg.get("body", b"")
        if not msg.get("more_body", False):
            if len(body) > self.max_body:
                raise RequestTooLarge(self._too_large())
            self._hold(held, len(body))
            return body
        chunks = [body]
        size = len(body)
        self._hold(held, size)
        while msg.get("more_body", False):
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise RequestTooLarge(self._too_large())
            self._hold(held, size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _inflate(self, body: bytes, encoding: str, held: _Held) -> bytes:
        """A gzip or deflate body inflated, never past `max_body` bytes (a 413 says so)."""
        if encoding in ("gzip", "x-gzip"):
            modes = [16 + zlib.MAX_WBITS]
        elif encoding == "deflate":
            modes = [zlib.MAX_WBITS, -zlib.MAX_WBITS]  # zlib-wrapped as RFC 9110 says; raw, as some clients send
        else:
            raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or "
                                      "identity")
        for i, wbits in enumerate(modes):
            inflater = zlib.decompressobj(wbits)
            try:
                out = inflater.decompress(body, self.max_body + 1)
            except zlib.error as exc:
                if i + 1 < len(modes):
                    continue
                raise InvalidRequest(f"the body is not valid {encoding} data: {exc}") from None
            if len(out) > self.max_body or inflater.unconsumed_tail:
                raise RequestTooLarge(f"the inflated {encoding} body exceeds {self.max_body} bytes "
                                      "(MODELCD_MAX_REQUEST_BYTES); send smaller batches")
            if not inflater.eof:
                raise InvalidRequest(f"the {encoding} body is truncated")
            self._hold(held, len(out) + len(body))
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    def _repository_index(self, receive: Receive) -> Callable[[Send], Awaitable[None]]:
        """POST /v2/repository/index: [{name, version, state, reason}] (`{"ready": true}` keeps the ready ones)."""

        async def answer(send: Send) -> None:
            body = b""
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                if len(body) > 65536:
                    await _respond(send, 413, error_body("a repository index request is at most 64 KiB"))
                    return
                if not msg.get("more_body", False):
                    break
            ready_only = False
            if body.strip():
                try:
                    query = msgspec.json.decode(body)
                except msgspec.DecodeError as exc:
                    await _respond(send, 400, error_body(f"the body is not valid JSON: {exc}"))
                    return
                if not isinstance(query, dict) or not isinstance(query.get("ready", False), bool):
                    await _respond(send, 400, error_body('expected {"ready": true|false} or an empty body'))
                    return
                ready_only = query.get("ready", False)
            rows = []
            for entry in sorted(self.registry.entries.values(), key=lambda e: (e.name, e.version)):
                state, reason = _repository_state(entry)
                if ready_only and state != "READY":
                    continue
                rows.append({"name": entry.name, "version": entry.version, "state": state, "reason": reason})
            await _respond(send, 200, encode(rows))

        return answer

    def _too_large(self) -> str:
        return (f"request body exceeds {self.max_body} bytes (MODELCD_MAX_REQUEST_BYTES); send smaller batches, "
                "or binary tensors")

    def _route(self, name: str, version: str | None, headers: Any,
               parameters: Any) -> tuple[ModelEntry, str, float | None]:
        """The registry's route; an unknown name while the node is still reading the target state is a 503."""
        try:
            return self.registry.route(name, version, headers, parameters)
        except ModelNotFound as exc:
            if self.state.ready or self.state.stopping:
                raise
            raise NodeStarting(f"the node is starting and has not read the target state yet, so it cannot tell "
                               f"whether {name!r} is deployed here ({exc.reason}); retry shortly") from None

    async def _acquire(self, entry: ModelEntry) -> Any:
        """The loaded model; one deployed but not loaded yet gets `load_wait` seconds, then a 503 + Retry-After.

        A load cut short by the wait goes on (the registry shields it), so the retry finds it loaded.
        A model the node evicted for its memory budget is reloaded within the request.
        """
        if entry.evicted:
            return await self.registry.acquire(entry)
        task = asyncio.ensure_future(self.registry.acquire(entry))
        done, _ = await asyncio.wait({task}, timeout=self.load_wait)
        if task in done:
            return task.result()
        task.cancel()
        raise ModelLoading(f"model {entry.key} is deployed on this node and still loading (status {entry.status}); "
                           "retry shortly", retry_after=1.0)

    async def _failed(self, send: Send, exc: ServingError, entry: ModelEntry | None, request_id: str | None,
                      target: str, t0: float, *, endpoint: str = "", log_rate: float = 0.0) -> None:
        headers = _error_headers(exc)
        if request_id:
            headers = [*headers, (_REQUEST_ID, request_id.encode(errors="replace"))]
        await _respond(send, exc.status, error_body(exc.reason), headers)
        kind = ("invalid" if isinstance(exc, InvalidRequest) else "timeout" if isinstance(exc, PredictTimeout)
                else "unavailable" if exc.status == 503 else "predict")
        if entry is None:
            self.metrics.unrouted.labels("not_found" if isinstance(exc, ModelNotFound) else kind).inc()
        else:
            entry.metrics.errors(kind).inc()
            entry.metrics.latency.observe(time.perf_counter() - t0)
            entry.usage.errors += 1
            if exc.status < 500:  # the caller's mistake: rollout analysis must not blame the model for it
                entry.usage.client_errors += 1
            entry.usage.last_used = time.time()
            # Sampled like the successes, so a caller can find its refused request (and why) by its id.
            if log_rate and random.random() < log_rate:
                self.telemetry.offer(PredictionLog(
                    request_id=request_id or new_request_id(), model=entry.name, version=entry.version,
                    endpoint=endpoint, node=self.node, latency_ms=(time.perf_counter() - t0) * 1000,
                    error=exc.reason, status=exc.status))
        if exc.status >= 500 and not isinstance(exc, (NodeUnavailable, ModelLoading)):  # states, counted in metrics
            log.warning("inference failed", request_id=request_id, target=target, status=exc.status,
                        reason=exc.reason)

    # ------------------------------------------------------------------ models

    async def _model_get(self, send: Send, tail: str) -> None:
        ready = tail.endswith("/ready")
        if ready:
            tail = tail[:-len("/ready")]
        try:
            name, version = _split(tail)
            entry, _, _ = self._route(name, version, (), None)
            if ready:
                if entry.status == "ready" or (entry.evicted and entry.status != "failed"):
                    await _respond(send, 200, _OK)  # loaded, or evicted and reloaded from cache on demand
                else:
                    await _respond(send, 503, error_body(f"model {entry.key} is {entry.status}"
                                                         + (f": {entry.error}" if entry.error else "")),
                                   _JSON_RETRY)
                return
            loaded = entry.loaded or await self._acquire(entry)
            if version is None and name in self.registry.by_name:
                meta = loaded.codec.metadata(name, [e.version for e in self.registry.by_name[name]],
                                             loaded.manifest.runtime)
                await _respond(send, 200, encode(meta))
            else:
                await _respond(send, 200, loaded.metadata)
        except ServingError as exc:
            await _respond(send, exc.status, error_body(exc.reason), _error_headers(exc))


class UnsupportedEncoding(InvalidRequest):
    status = 415


def _repository_state(entry: ModelEntry) -> tuple[str, str]:
    """Triton's repository states: READY, LOADING or UNAVAILABLE, with the reason."""
    if entry.status == "ready" or (entry.evicted and entry.status not in ("failed", "quarantined")):
        return "READY", ""
    if entry.status in ("queued", "loading", "restarting"):
        return "LOADING", entry.status
    if entry.status in ("failed", "quarantined"):
        return "UNAVAILABLE", entry.error or entry.status
    return "UNAVAILABLE", "not loaded yet: loads on its first request"


async def _not_allowed(send: Send, method: str, path: str, allow: bytes) -> None:
    await _respond(send, 405, error_body(f"{method} {path}: method not allowed; use {allow.decode()}"),
                   [*_JSON, (b"allow", allow)])


def _error_headers(exc: ServingError) -> list[tuple[bytes, bytes]]:
    """JSON, plus Retry-After on a 503 (the error's own delay, else 1 s)."""
    if exc.status != 503:
        return _JSON
    return [*_JSON, (b"retry-after", str(max(1, math.ceil(exc.retry_after or 1))).encode())]


def _split(tail: str) -> tuple[str, str | None]:
    """'name' | 'name/versions/v' -> (name, version)."""
    if "/" not in tail:
        if not tail:
            raise ModelNotFound("no model name in the path")
        return tail, None
    parts = tail.split("/")
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    raise ModelNotFound(f"no route /v2/models/{tail}; expected /v2/models/{{name}}[/versions/{{version}}]")


def _int_header(value: bytes, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"header {name} is not an integer: {value!r}") from None


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
