"""The deployment API: a raw ASGI app (no framework) in front of the deploy-request topic.

The API never deploys anything itself: it stages an uploaded archive under `uploads/` in the
store, publishes a DeployRequested (or RetireRequested) and answers 202 with the deployment id
and its `Location`. The pipeline behind the topic does the rest, so the HTTP door and the Kafka
door share one path.

Routes:
    POST   /deployments                          upload (multipart/form-data or application/x-tar)
                                                 or JSON {"package_uri": ...}        -> 202
    GET    /deployments[?model=&version=&status=&since=1h&limit=50]  recent deployments, newest first
    GET    /deployments/{id}[?after=REV&wait=S]  steps, status, nodes serving; with `after`, a long
                                                 poll that answers once the view moved past REV
    GET    /models                               every name:version in the target state
    GET    /models/{name}                        the versions of one model             -> 404 if none
    DELETE /models/{name}/versions/{version}[?force=true]   (or a body {"force": true, "reason": ...})
                                                 retire                                -> 202 / 404 / 409
                                                 (409 while an endpoint, rollout or shadow uses it:
                                                 the store's safety check, `modelcd.store.safety`)
    GET    /healthz                              liveness, no token needed
    /{prefix}/...                                routes mounted by whoever starts the API (`routes`):
                                                 `modelcd up` mounts /endpoints (traffic policies, shadow
                                                 relations, rollouts: modelcd.rollout.api)

Every error is `{"error": reason}` with a 4xx (503 when the store or broker is unreachable);
a bearer token (or the session cookie the console's login form sets: `session.py`) is required on
every route but /healthz when `settings.api_token` is set; a body
larger than `settings.max_upload_bytes` is refused with 413 before it is read in full.

The handler never does work proportional to an upload on the event loop: the multipart split, the
sha256 and the manifest peek (bounded: the first tar member only, `store.package.peek_manifest`) run
in a thread, so a large or hostile upload does not stall other requests. A `file://` package URI is
refused (400, one message whatever the path) unless it lies under MODELCD_FILE_URI_DIRS.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import msgspec

from modelcd.events.schemas import DeployRequested, Event, ModelState, RetireRequested, new_id
from modelcd.logs import get_logger
from modelcd.store.blobs import Store, StoreError, StoreNotFound, StoreUnavailable
from modelcd.store.package import peek_manifest
from modelcd.store.safety import Unsafe, World, check_retire, world
from modelcd.store.targets import TargetState
from modelcd.units import UnitError, parse_duration

from . import session
from .errors import ApiError
from .policy import (
    AcceptedRequest,
    accepted_decoder,
    accepted_encoder,
    check_api_file_uri,
    check_expiry,
    parse_package_uri,
    record_decoder,
    record_key,
    request_key,
    upload_key,
)
from .tracking import DeploymentView, TrackingView, view_of_record, view_of_request

log = get_logger("modelcd.ingest.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_encoder = msgspec.json.Encoder()
_MAX_WAIT_S = 25.0  # longest long-poll; below common proxy idle timeouts


class EventSink(Protocol):
    """Where the API publishes requests: a `Publisher`, or a fake in tests."""

    async def publish(self, event: Event, *, event_id: str | None = None) -> None: ...


Response = tuple[int, Any, list[tuple[bytes, bytes]]]


class Routes(Protocol):
    """A group of routes mounted under one path prefix (e.g. `/endpoints`), owned by another part.

    Two optional capabilities, found by name: `asgi(scope, receive, send, *, authorized)` answers
    the group's requests itself (HTML, forms, server-sent events: the console), told whether the
    caller presented the token or a session, and checking access itself; `run()` is background
    work the service runs beside the HTTP server and cancels first when it drains (so the
    group's long-lived streams end before the server waits for open requests).
    """

    async def handle(self, method: str, parts: list[str], body: Callable[[], Awaitable[bytes]],
                     query: dict[str, str]) -> Response: ...


# Builds a mounted group from the API's own target state and event sink (so it shares their checks and bus).
RoutesFactory = Callable[[TargetState, EventSink], Routes]
# Reads `modelcd.traffic` (policies and rollout facts, in order) for the safety check's rollouts in progress.
TrafficReader = Callable[[], Awaitable[Sequence[object]]]


async def retire_world(targets: TargetState, traffic: TrafficReader | None) -> World:
    """What the safety check needs to judge a retire: the target state, the policies, the rollouts in progress.

    The store's policies are the source of truth; the traffic topic (when a reader is given and
    answers) adds the rollouts in progress and any policy newer than the store's.
    """
    events: Sequence[object] = ()
    if traffic is not None:
        try:
            events = await traffic()
        except Exception as exc:  # the store's policies still protect every model routed or shadowed
            log.warning("could not read the traffic topic for the safety check", reason=str(exc))
    return world(await targets.models(), await targets.traffic(), events)


class DeployBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The JSON form of `POST /deployments`: deploy a package that already lives somewhere."""

    package_uri: str
    model: str = ""
    sha256: str | None = None
    owner: str | None = None
    expiry_seconds: int | None = None
    expiry: str | int | None = None  # a duration as the CLI takes it ("7d", "12h", 3600): the same as expiry_seconds
    pinned: bool = False


def _expiry(seconds: int | None, duration: str | int | None) -> int | None:
    """The request's expiry period in seconds, from `expiry_seconds` or an `expiry` duration (7d, 12h)."""
    if duration is None or duration == "":
        return seconds
    if seconds is not None:
        raise ApiError(400, "give expiry_seconds or expiry, not both")
    try:
        value = parse_duration(duration, positive=True)
    except UnitError as exc:
        raise ApiError(400, f"expiry: {exc}") from None
    if not value.is_integer():
        raise ApiError(400, f"expiry: {duration!r} is not a whole number of seconds")
    return int(value)


_deploy_body = msgspec.json.Decoder(DeployBody)


class RetireBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The optional JSON body of `DELETE /models/{name}/versions/{version}` (the query works as well)."""

    force: bool = False
    reason: str = ""


_retire_body = msgspec.json.Decoder(RetireBody)


def _decode_retire(raw: bytes) -> RetireBody:
    if not raw.strip():
        return RetireBody()
    try:
        return _retire_body.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}; expected {{\"force\": true, \"reason\": \"...\"}} "
                            "or nothing") from None
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")  # a deployment id, safe as a store key


@dataclass
class ApiConfig:
    api_token: str | None
    max_upload_bytes: int
    file_uri_dirs: tuple[str, ...] = ()  # where file:// package URIs may point through this API (none: refused)


class DeploymentApi:
    """The ASGI callable. Collaborators are injected so tests run it without a broker."""

    def __init__(self, config: ApiConfig, store: Store, sink: EventSink, view: TrackingView,
                 *, health: Callable[[], dict[str, Any]] | None = None,
                 routes: Mapping[str, RoutesFactory] | None = None, traffic: TrafficReader | None = None) -> None:
        self.config = config
        self.traffic = traffic
        self.store = store
        self.targets = TargetState(store)
        self.sink = sink
        self.view = view
        self._health = health or (lambda: {})
        # Mounted groups (/endpoints from the rollout part); a prefix nobody mounted answers 404.
        self.mounted: dict[str, Routes] = {prefix: make(self.targets, sink) for prefix, make in (routes or {}).items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw = self.mounted.get(scope["path"].strip("/").split("/", 1)[0])
        if raw is not None and hasattr(raw, "asgi"):
            await raw.asgi(scope, receive, send, authorized=self._authorized(scope))
            return
        request_id = new_id()[:16]
        started = time.perf_counter()
        status = 500
        try:
            status, body, headers = await self._route(scope, receive)
        except ApiError as exc:
            status, body, headers = exc.status, {"error": exc.reason}, exc.headers
        except StoreUnavailable as exc:
            status, body, headers = 503, {"error": f"the store is unreachable, retry later: {exc}"}, []
        except StoreError as exc:
            status, body, headers = 503, {"error": f"the store refused the request: {exc}"}, []
        except Exception as exc:  # noqa: BLE001 - one broken request must never take the API down
            log.exception("request failed", request_id=request_id, path=scope.get("path"))
            status, body, headers = 500, {"error": f"internal error ({type(exc).__name__}); see the ingest log, "
                                                   f"request id {request_id}"}, []
        await _respond(send, status, body, headers)
        log.info("request", request_id=request_id, method=scope.get("method"), path=scope.get("path"),
                 status=status, ms=round((time.perf_counter() - started) * 1000, 2))

    # -- routing -----------------------------------------------------------------------------------

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        method: str = scope["method"]
        parts = [unquote(p) for p in scope["path"].strip("/").split("/")] if scope["path"].strip("/") else []
        if parts == ["healthz"]:
            ApiError.allow(method, "GET")
            return 200, {"status": "ok", **self._health()}, []
        self._authorize(scope)
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        match parts:
            case ["deployments"]:
                ApiError.allow(method, "GET", "POST")
                if method == "GET":
                    return 200, {"deployments": self._recent_deployments(query)}, []
                return await self._deploy(scope, receive, query)
            case ["deployments", deployment_id]:
                ApiError.allow(method, "GET")
                return await self._get_deployment(deployment_id, query)
            case ["models"]:
                ApiError.allow(method, "GET")
                return 200, {"models": [self._model_json(m) for m in await self._models()]}, []
            case ["models", name]:
                ApiError.allow(method, "GET")
                versions = [self._model_json(m) for m in await self._models() if m.name == name]
                if not versions:
                    raise ApiError(404, f"no model named {name!r}; GET /models (`modelcd models`) lists the deployed ones")
                return 200, {"name": name, "versions": versions}, []
            case ["models", name, "versions", version]:
                ApiError.allow(method, "DELETE")
                return await self._retire(name, version, query,
                                          await _read_body(scope, receive, self.config.max_upload_bytes))
            case [prefix, *rest] if prefix in self.mounted:
                return await self.mounted[prefix].handle(
                    method, rest, lambda: _read_body(scope, receive, self.config.max_upload_bytes), query)
        known = ", ".join(["/deployments", "/models", *(f"/{p}" for p in self.mounted), "/healthz"])
        raise ApiError(404, f"no route {scope['path']}; see {known}")

    def _authorize(self, scope: Scope) -> None:
        if not self._authorized(scope):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <MODELCD_API_TOKEN>'",
                           headers=[(b"www-authenticate", b'Bearer realm="modelcd"')])

    def _authorized(self, scope: Scope) -> bool:
        """No token configured, the bearer token, or a live session cookie from the console's login form."""
        token = self.config.api_token
        if not token:
            return True
        given = _header(scope, b"authorization") or b""
        scheme, _, value = given.partition(b" ")
        if scheme.lower() == b"bearer" and session.token_matches(value.strip(), token):
            return True
        cookie = session.from_cookie_header(_header(scope, b"cookie"))
        return cookie is not None and session.valid(token, cookie, time.time())

    async def run_mounted(self) -> None:
        """The mounted groups' background work (`run()`), until cancelled; a group without any adds nothing."""
        async with asyncio.TaskGroup() as tg:
            for prefix, group in self.mounted.items():
                if hasattr(group, "run"):
                    tg.create_task(group.run(), name=f"api-{prefix}")

    # -- POST /deployments ----------------------------------------------------------------------------

    async def _deploy(self, scope: Scope, receive: Receive,
                      query: dict[str, str]) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        ctype = (_header(scope, b"content-type") or b"").decode("latin-1")
        mime = ctype.split(";", 1)[0].strip().lower()
        body = await _read_body(scope, receive, self.config.max_upload_bytes)
        deployment_id = new_id()
        staged: tuple[str, bytes] | None = None
        if mime == "application/json":
            try:
                req = _deploy_body.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ApiError(400, f"malformed JSON body: {exc}; expected {{\"package_uri\": \"s3://...\"}}") from None
            expiry_seconds = _expiry(req.expiry_seconds, req.expiry)
            try:
                check_api_file_uri(parse_package_uri(req.package_uri), self.config.file_uri_dirs)
                check_expiry(expiry_seconds)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            if req.sha256 is not None and not _SHA.fullmatch(req.sha256):
                raise ApiError(400, f"sha256 must be 64 lowercase hex digits, got {req.sha256!r}")
            event = DeployRequested(deployment_id=deployment_id, model=req.model, package_uri=req.package_uri,
                                    sha256=req.sha256, owner=req.owner, expiry_seconds=expiry_seconds,
                                    pinned=req.pinned, requested_by="api")
        else:
            if mime == "multipart/form-data":
                archive = await asyncio.to_thread(_multipart_file, body, ctype)
            elif mime in ("application/x-tar", "application/octet-stream", "application/gzip",
                          "application/x-gtar"):
                archive = body
            else:
                raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}: upload the archive as "
                                    "application/x-tar or multipart/form-data, or send JSON {\"package_uri\": ...}")
            if not archive:
                raise ApiError(400, "empty upload: the body holds no package archive")
            expiry = query.get("expiry_seconds")
            try:
                expiry_seconds = int(expiry) if expiry else None
            except ValueError:
                raise ApiError(400, f"expiry_seconds must be an integer, got {expiry!r}") from None
            expiry_seconds = _expiry(expiry_seconds, query.get("expiry"))
            try:
                check_expiry(expiry_seconds)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            sha, name = await asyncio.to_thread(_hash_and_peek, archive)
            key = upload_key(deployment_id)
            staged = (key, archive)
            event = DeployRequested(deployment_id=deployment_id, model=query.get("model") or name,
                                    package_uri=f"store:{key}", sha256=sha, owner=query.get("owner"),
                                    expiry_seconds=expiry_seconds, pinned=query.get("pinned") in ("1", "true"),
                                    requested_by="api")
        # The request is on record before anything else (ingest resumes it after a restart that lost the
        # topic; gc tells an upload in flight from an orphan by it). An upload is staged, not yet a
        # package: the pipeline moves it to packages/ only once it validated, and deletes it at the end.
        await self._accept(event)
        if staged is not None:
            await self.store.put(*staged)
        self.view.requested(deployment_id, event.model)
        try:
            await self.sink.publish(event)
        except Exception as exc:
            if staged is not None:
                await self.store.delete(staged[0])
            await self.store.delete(request_key(deployment_id))
            raise ApiError(503, f"could not publish the deploy request to Kafka, retry later: {exc}") from exc
        log.info("deploy requested", deployment_id=deployment_id, model=event.model, package_uri=event.package_uri)
        location = f"/deployments/{deployment_id}"
        return 202, {"deployment_id": deployment_id, "status_url": location, "model": event.model}, [
            (b"location", location.encode())]

    # -- GET /deployments ------------------------------------------------------------------------------

    def _recent_deployments(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """Newest first, filtered by `model`, `version`, `status`, `since` (a duration: 1h, 7d); at most `limit`."""
        try:
            limit = int(query.get("limit", "50"))
            since = time.time() - parse_duration(query["since"]) if "since" in query else None
        except (ValueError, UnitError) as exc:
            raise ApiError(400, f"limit must be a whole number and since a duration (1h, 7d): {exc}") from None
        if limit < 1:
            raise ApiError(400, "limit must be at least 1")
        views = self.view.deployments()
        picked = [v for v in views
                  if (not query.get("model") or v.model == query["model"])
                  and (not query.get("version") or v.version == query["version"])
                  and (not query.get("status") or v.status == query["status"])
                  and (since is None or (v.requested_at or v.finished_at or 0) >= since)]
        picked.sort(key=lambda v: v.requested_at or v.finished_at or 0, reverse=True)
        out = []
        for v in picked[:limit]:
            row = msgspec.to_builtins(v)
            row.pop("steps", None)
            out.append(row)
        return out

    # -- GET /deployments/{id} ---------------------------------------------------------------------

    async def _get_deployment(self, deployment_id: str,
                              query: dict[str, str]) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        if "after" in query:
            try:
                after = int(query["after"])
                wait = min(float(query.get("wait", "10")), _MAX_WAIT_S)
            except ValueError:
                raise ApiError(400, "after must be an integer revision and wait a number of seconds") from None
            await self.view.wait_changed(after, wait)
        view = self.view.deployment(deployment_id) or await self._stored_deployment(deployment_id)
        if view is None:
            raise ApiError(404, f"no deployment {deployment_id!r}: GET /deployments (`modelcd deployments --since 1d`) lists recent ones")
        return 200, msgspec.to_builtins(view), []

    async def _accept(self, event: DeployRequested | RetireRequested) -> None:
        await self.store.put(request_key(event.deployment_id),
                             accepted_encoder.encode(AcceptedRequest(request=event, accepted_at=time.time())))

    async def _stored_deployment(self, deployment_id: str) -> DeploymentView | None:
        """A deployment the topics no longer hold (a broker that lost them, or retention): its record in the
        store if it ended, else the request accepted and not ended yet. The store is its durable home."""
        if not _ID.fullmatch(deployment_id):
            return None
        try:
            record = record_decoder.decode(await self.store.get(record_key(deployment_id)))
        except StoreNotFound:
            pass
        except msgspec.DecodeError:
            log.warning("unreadable deployment record", deployment_id=deployment_id)
        else:
            return view_of_record(record, self.view)
        try:
            accepted = accepted_decoder.decode(await self.store.get(request_key(deployment_id)))
        except (StoreNotFound, msgspec.DecodeError):
            return None
        return view_of_request(accepted, self.view)

    # -- models -------------------------------------------------------------------------------------

    async def _models(self) -> list[ModelState]:
        return sorted(await self.targets.models(), key=lambda m: (m.name, _version_key(m.version)))

    def _model_json(self, m: ModelState) -> dict[str, Any]:
        return {
            "name": m.name, "version": m.version, "state": m.target, "owner": m.owner,
            "expiry_seconds": m.expiry_seconds, "pinned": m.pinned, "runtime": m.runtime, "flavor": m.flavor,
            "sha256": m.sha256, "package_uri": m.package_uri, "deployment_id": m.deployment_id,
            "deployed_at": m.deployed_at, "reason": m.reason,
            "memory_bytes": m.resources.memory_bytes, "predict_us": m.resources.predict_us,
            "nodes_serving": self.view.nodes_serving(m.name, m.version, m.sha256) if m.target == "serving" else 0,
            "nodes_quarantined": self.view.nodes_quarantined(m.name, m.version, m.sha256)
            if m.target == "serving" else 0,
        }

    async def _retire(self, name: str, version: str, query: dict[str, str],
                      raw: bytes = b"") -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        """Retire name:version unless something uses it: `?force=true` (or a JSON body `{"force": true,
        "reason": ...}`) retires it anyway."""
        body = _decode_retire(raw)
        if await self.targets.get_model(name, version) is None:
            raise ApiError(404, f"no model {name}:{version} is deployed; GET /models (`modelcd models`) lists them")
        force = body.force or query.get("force", "").lower() in ("1", "true", "yes")
        try:
            broken = check_retire(f"{name}:{version}", await retire_world(self.targets, self.traffic), force=force,
                                  force_hint=f'?force=true or {{"force": true}} (`modelcd retire {name} {version} --force`)')
        except Unsafe as exc:
            raise ApiError(409, str(exc)) from None
        if body.reason:
            query = {**query, "reason": body.reason}
        reason = query.get("reason", "retired through the API")
        if broken:
            reason += " (forced: " + "; ".join(f"it {u.what}" for u in broken) + ")"
        event = RetireRequested(model=name, version=version, reason=reason, requested_by="api", force=force)
        await self._accept(event)
        self.view.requested(event.deployment_id, name)
        try:
            await self.sink.publish(event)
        except Exception as exc:
            await self.store.delete(request_key(event.deployment_id))
            raise ApiError(503, f"could not publish the retire request to Kafka, retry later: {exc}") from exc
        location = f"/deployments/{event.deployment_id}"
        return 202, {"deployment_id": event.deployment_id, "status_url": location}, [(b"location", location.encode())]


# --- HTTP plumbing ------------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return bytes(v)
    return None


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    declared = _header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                    "(MODELCD_MAX_UPLOAD_BYTES)")
        except ValueError:
            raise ApiError(400, "malformed Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            # Chunked uploads have no Content-Length: stop reading at the limit.
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes (MODELCD_MAX_UPLOAD_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]]) -> None:
    payload = _encoder.encode(body)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The part named `package` of a multipart/form-data body, else its one file part; two of either is a 400."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ApiError(400, "multipart/form-data without a boundary parameter")
    delimiter = b"--" + match.group(1).encode("latin-1")
    named: list[bytes] = []
    files: list[bytes] = []
    closed = False
    for raw in body.split(delimiter)[1:]:
        if raw.startswith(b"--"):
            closed = True
            break  # the closing delimiter
        part = raw.removeprefix(b"\r\n")
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "malformed multipart body: a part has no header/body separator")
        content = content.removesuffix(b"\r\n")
        disposition = next((line for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-disposition:")), b"")
        if re.search(rb'(?<![a-z])name="package"', disposition):
            named.append(content)
        elif b"filename=" in disposition:
            files.append(content)
    if not closed:  # a body cut short: its last part would be staged as a package, cut short too
        raise ApiError(400, "malformed multipart body: no closing boundary (the upload was cut short?)")
    # One archive per deployment: of two, which one the caller meant is a guess, and the other would be lost.
    chosen = named or files
    if len(chosen) > 1:
        which = "fields 'package'" if named else "file parts (and no field 'package')"
        raise ApiError(400, f"multipart body holds {len(chosen)} {which}: send one package archive per request, as "
                            "the field 'package'")
    if not chosen:
        raise ApiError(400, "multipart body holds no file part; send the archive as the field 'package'")
    return chosen[0]


class _NameOnly(msgspec.Struct):
    name: str = ""


_name_only = msgspec.json.Decoder(_NameOnly)


def _hash_and_peek(archive: bytes) -> tuple[str, str]:
    """The archive's sha256 and its model name (run in a thread: both read bytes an upload controls)."""
    return hashlib.sha256(archive).hexdigest(), _peek_name(archive)


def _peek_name(archive: bytes) -> str:
    """The model name from the archive's manifest, best effort, so requests for one model share a
    partition (and so are handled in order). Bounded work: only the first member is decompressed
    (`peek_manifest`). Any problem is left for the pipeline to report."""
    manifest = peek_manifest(archive)
    if manifest is None:
        return ""
    try:
        return _name_only.decode(manifest).name
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return ""


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)
