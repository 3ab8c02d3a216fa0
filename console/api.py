"""The console's routes, mounted on the deployment API under `/console` (raw ASGI: HTML, a form, a stream).

    GET  /console                the page, rendered on the server from what the feed folded
    GET  /console/events         server-sent events: each section's new rendering as it changes
    GET  /console/login          the sign-in form (when MODELCD_API_TOKEN is set)
    POST /console/login          token=... -> a session cookie and back to /console; 401 with the form if wrong
    POST /console/logout         clears the cookie
    GET  /console/static/{file}  console.css and console.js (committed, no build step, no CDN)

Access: with a token configured, the page and the stream need the bearer token or the session
cookie the login form sets (`modelcd.ingest.session`: HttpOnly, SameSite=Strict, signed with the
token, compared in constant time); the page without one redirects to the form, the stream
answers 401. The buttons post to the API's own `/endpoints/{e}/rollout/{action}` with that
cookie, so an action from the console passes the very checks of the CLI and the HTTP API.

Lifecycle (`run()`, started by the ingest service beside the HTTP server): one `Feed` (the
process's only console consumer) and a render loop that coalesces changes, renders each changed
section once and fans it out through the `Hub`'s bounded per-browser queues. Cancelling `run()`
closes every stream.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from modelcd.events.bus import KafkaConfig
from modelcd.ingest.api import Receive, Response, RoutesFactory, Scope, Send
from modelcd.ingest.errors import ApiError
from modelcd.ingest.session import clear_cookie, issue, set_cookie, token_matches
from modelcd.logs import get_logger
from modelcd.runner import wait_for
from modelcd.settings import Settings

from . import render
from .fanout import Hub, frame
from .feed import Feed
from .state import SECTIONS, ConsoleState

log = get_logger("modelcd.console")

STATIC = {"console.css": b"text/css; charset=utf-8", "console.js": b"text/javascript; charset=utf-8"}
MAX_FORM_BYTES = 4096
COALESCE_S = 0.2  # changes within this window go out as one update per section (longer when rendering is slow)
TICK_S = 5.0  # relative times ("12 s ago", "retires in") are re-rendered this often while someone watches
PING_S = 15.0
SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                  b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                                  b"form-action 'self'; base-uri 'none'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class ConsoleRoutes:
    def __init__(self, *, token: str | None, view: render.View, cfg: KafkaConfig | None,
                 state: ConsoleState | None = None, hub: Hub | None = None) -> None:
        self.token = token or None
        self.view = view
        self.state = state or ConsoleState()
        self.hub = hub or Hub()
        self.feed = Feed(cfg, self.state, self.changed) if cfg is not None else None
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._rendered: dict[str, str] = {}

    # -- the mount protocol ----------------------------------------------------------------------

    async def handle(self, method: str, parts: list[str], body: Any, query: dict[str, str]) -> Response:
        raise ApiError(404, "the console answers through its own ASGI handler")  # never called: `asgi` exists

    async def run(self) -> None:
        """The feed and the render loop, until cancelled; then every stream ends."""
        try:
            async with asyncio.TaskGroup() as tg:
                if self.feed is not None:
                    tg.create_task(self.feed.run(), name="console-feed")
                tg.create_task(self._render_loop(), name="console-render")
        finally:
            self.hub.close()

    def changed(self, sections: frozenset[str]) -> None:
        """The feed folded events: re-render these sections (and the status line) soon."""
        self._dirty |= sections
        self._wake.set()

    async def asgi(self, scope: Scope, receive: Receive, send: Send, *, authorized: bool) -> None:
        method = scope["method"]
        parts = [p for p in scope["path"].strip("/").split("/")[1:] if p]
        try:
            match parts:
                case []:
                    ApiError.allow(method, "GET")
                    if not authorized:
                        return await _redirect(send, "/console/login")
                    return await _html(send, 200, self.page())
                case ["events"]:
                    ApiError.allow(method, "GET")
                    if not authorized:
                        return await _text(send, 401, "sign in at /console/login (or send the bearer token)")
                    return await self._stream(receive, send)
                case ["login"]:
                    ApiError.allow(method, "GET", "POST")
                    if self.token is None:
                        return await _redirect(send, "/console")
                    if method == "GET":
                        return await _html(send, 200, render.login_page())
                    return await self._login(scope, receive, send)
                case ["logout"]:
                    ApiError.allow(method, "POST")
                    return await _redirect(send, "/console/login", [(b"set-cookie", clear_cookie())])
                case ["static", name] if name in STATIC:
                    ApiError.allow(method, "GET")
                    data = resources.files(__package__).joinpath("static", name).read_bytes()
                    return await _respond(send, 200, data, STATIC[name], [(b"cache-control", b"no-cache")])
            await _text(send, 404, f"no console page {scope['path']}; the console is at /console")
        except ApiError as exc:
            await _text(send, exc.status, exc.reason, exc.headers)

    # -- pages -------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {"events": self.state.counters.events, "clients": len(self.hub.clients), "dropped": self.hub.dropped}

    def feed_status(self) -> str:
        return self.feed.status if self.feed is not None else "not connected to the bus"

    def page(self) -> str:
        return render.page(self.state, time.time(), self.view, feed=self.feed_status(), counters=self.counters())

    def section(self, name: str) -> str:
        return render.RENDERERS[name](self.state, time.time(), self.view)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.token is not None
        body = await _read_form(receive, MAX_FORM_BYTES)
        given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[-1]
        if not given or not token_matches(given, self.token):
            log.warning("console sign-in refused", client=(scope.get("client") or ("?",))[0])
            return await _html(send, 401, render.login_page("Wrong token: use the deployment API's "
                                                            "MODELCD_API_TOKEN."))
        cookie = set_cookie(issue(self.token, time.time()), secure=scope.get("scheme") == "https")
        await _redirect(send, "/console", [(b"set-cookie", cookie)])

    # -- live updates ------------------------------------------------------------------------------

    async def _render_loop(self) -> None:
        status = ""
        while True:
            try:
                await wait_for(self._wake.wait(), TICK_S)
            except TimeoutError:
                if self.hub.clients:
                    self._dirty |= {"deployments", "models", "endpoints", "fleet"}  # relative times moved on
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            started = time.perf_counter()
            if self.hub.clients:
                for name in SECTIONS:
                    if name in dirty:
                        html = self.section(name)
                        if html != self._rendered.get(name):
                            self._rendered[name] = html
                            self.hub.publish(name, frame(name, html))
                line = render.status_line(self.feed_status(), self.counters())
                if line != status:
                    status = line
                    self.hub.publish("status", frame("status", line))
            else:
                self._rendered.clear()  # nobody watches: the next browser gets a fresh snapshot anyway
            # Rendering shares the API's event loop: however busy the bus, it takes at most a quarter of it.
            await asyncio.sleep(max(COALESCE_S, 3 * (time.perf_counter() - started)))

    async def _stream(self, receive: Receive, send: Send) -> None:
        client = self.hub.connect()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"x-accel-buffering", b"no"),
                *SECURITY_HEADERS]})
            # The page may be older than this connection: start with every section as it is now.
            snapshot = [b"retry: 2000\n\n"] + [frame(name, self.section(name)) for name in SECTIONS]
            snapshot.append(frame("status", render.status_line(self.feed_status(), self.counters())))
            await send({"type": "http.response.body", "body": b"".join(snapshot), "more_body": True})
            self._wake.set()  # the status line counts this browser

            async def pump() -> None:
                while (data := await self.hub.next(client, PING_S)) is not None:
                    await send({"type": "http.response.body", "body": data, "more_body": True})

            async def gone() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(gone())
            try:
                done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (pumping, watching):
                    t.cancel()
                await asyncio.gather(pumping, watching, return_exceptions=True)
            if pumping in done and watching not in done:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the browser went away mid-write
        finally:
            self.hub.disconnect(client)
            self._wake.set()


def console_routes(settings: Settings) -> RoutesFactory:
    """The `/console` group for a deployment API, reading the bus `settings` names."""
    view = render.View(warn_share=settings.retirement_warn_share, heartbeat_s=settings.heartbeat_interval,
                       login_required=bool(settings.api_token))
    cfg = KafkaConfig.from_settings(settings)

    def factory(targets: Any, sink: Any) -> ConsoleRoutes:
        return ConsoleRoutes(token=settings.api_token, view=view, cfg=cfg)

    return factory


def api_routes(settings: Settings) -> dict[str, RoutesFactory]:
    return {"console": console_routes(settings)}


# --- HTTP plumbing ----------------------------------------------------------------------------------


async def _read_form(receive: Receive, limit: int) -> bytes:
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client disconnected before the form was complete")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"the sign-in form is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, ctype: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    extra = headers or []
    names = {k for k, _ in extra}
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra,
        *[(k, v) for k, v in SECURITY_HEADERS if k not in names]]})
    await send({"type": "http.response.body", "body": body})


async def _html(send: Send, status: int, html: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond(send, status, html.encode(), b"text/html; charset=utf-8", headers)


async def _text(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond(send, status, (text + "\n").encode(), b"text/plain; charset=utf-8", headers)


async def _redirect(send: Send, location: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond(send, 303, b"", b"text/plain; charset=utf-8", [(b"location", location.encode()), *(headers or [])])
