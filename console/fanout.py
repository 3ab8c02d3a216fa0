"""Fan-out of rendered sections to the browsers watching: one bounded queue per browser.

The feed renders a section once per change and `publish`es the frame; every connected
`Client` gets it through its own queue. A browser that does not read fast enough (a slow link,
a sleeping laptop) never holds anyone up and never grows memory:

- each queue holds at most `maxsize` frames; a frame that finds it full is dropped and counted
  (`Client.dropped`, `Hub.dropped`), and its section is remembered in `Client.missed`;
- once that browser's queue runs empty, `next` sends it the *latest* rendering of each
  section it missed, so a dropped update costs freshness, never correctness (every frame is a
  whole section, so the latest one supersedes everything dropped before it);
- `close()` ends every stream (the service drains: streams must not hold the HTTP drain up).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson

from modelcd.runner import wait_for

CLOSED = object()


def frame(section: str, html: str) -> bytes:
    """One server-sent event replacing `section`'s content (JSON on one `data:` line)."""
    return b"event: section\ndata: " + orjson.dumps({"id": section, "html": html}) + b"\n\n"


PING = b": ping\n\n"


@dataclass(eq=False)
class Client:
    queue: asyncio.Queue[tuple[str, bytes] | object]
    missed: set[str] = field(default_factory=set)
    dropped: int = 0


class Hub:
    def __init__(self, *, maxsize: int = 32) -> None:
        self.maxsize = maxsize
        self.clients: set[Client] = set()
        self.latest: dict[str, bytes] = {}
        self.dropped = 0
        self.closed = False

    def connect(self) -> Client:
        client = Client(asyncio.Queue(maxsize=self.maxsize))
        if self.closed:
            client.queue.put_nowait(CLOSED)
        self.clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        self.clients.discard(client)

    def publish(self, section: str, data: bytes) -> None:
        """Queue `data` (a frame of `section`) for every client; never waits."""
        self.latest[section] = data
        for c in self.clients:
            try:
                c.queue.put_nowait((section, data))
            except asyncio.QueueFull:
                c.dropped += 1
                self.dropped += 1
                c.missed.add(section)

    async def next(self, client: Client, timeout: float) -> bytes | None:
        """The next frame for `client`, `PING` after `timeout` seconds of silence, None once closed."""
        if client.queue.empty() and client.missed:
            section = min(client.missed)
            client.missed.discard(section)
            return self.latest[section]
        try:
            item = await wait_for(client.queue.get(), timeout)
        except TimeoutError:
            return PING
        if item is CLOSED:
            return None
        # A queued frame of a missed section is older than the one dropped (queues keep publish order):
        # the section stays missed until its latest rendering was sent.
        _section, data = item  # type: ignore[misc]
        return data

    def close(self) -> None:
        """End every stream, now and for clients connecting later."""
        self.closed = True
        for c in self.clients:
            while True:
                try:
                    c.queue.put_nowait(CLOSED)
                    break
                except asyncio.QueueFull:
                    c.queue.get_nowait()  # the stream ends anyway: make room for the end
