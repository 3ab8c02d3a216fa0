"""The front door's routing answers, as DNS: a tiny authoritative server on loopback that Caddy asks.

Why DNS: every change of a Caddy config (even a PATCH of one route) is a reload, and a reload
closes the clients' idle keep-alive connections; a client that sends its next request at that
moment gets a reset (measured: 3 failed requests per reload under a steady load). Caddy's
dynamic upstreams (`srv` source, with a resolver of our choosing) are the way it routes without
reloads, so Caddy's config is written once and the routing table lives here:

- `SRV _oip._tcp.<model or endpoint>.models.modelcd.` → the nodes that answer that name
  (`default.modelcd.` for everything else): one record per node, target `<id>.nodes.modelcd.`;
- `A <id>.nodes.modelcd.` → the node's IPv4 address; any other name: NXDOMAIN.

The wire format is RFC 1035 (one question per query, no compression in answers, TTL 0: Caddy's
`refresh` is the cache). Pure encoding and decoding functions; `DnsServer` is the UDP shell.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass

SRV, A, AAAA = 33, 1, 28
ZONE = "modelcd"


@dataclass(frozen=True, slots=True)
class Srv:
    target: str
    port: int


Answer = list[Srv] | list[str] | None  # SRV records, IPv4 addresses, or None: no such name


def parse_query(data: bytes) -> tuple[int, int, str, int, bytes]:
    """(id, flags, lowercased name without the final dot, qtype, the raw question section)."""
    if len(data) < 12:
        raise ValueError("short DNS message")
    qid, flags, qdcount = struct.unpack("!HHH", data[:6])
    if qdcount != 1:
        raise ValueError("one question per query")
    labels, i = [], 12
    while True:
        if i >= len(data):
            raise ValueError("truncated name")
        n = data[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(data[i:i + n].decode("ascii", "replace"))
        i += n
    qtype, _qclass = struct.unpack("!HH", data[i:i + 4])
    return qid, flags, ".".join(labels).lower(), qtype, data[12:i + 4]


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def build_response(qid: int, flags: int, question: bytes, qtype: int, answer: Answer) -> bytes:
    rd = flags & 0x0100
    rcode = 3 if answer is None else 0  # NXDOMAIN for a name we do not know
    records = b""
    count = 0
    for rec in answer or []:
        if isinstance(rec, Srv) and qtype == SRV:
            rdata = struct.pack("!HHH", 0, 10, rec.port) + encode_name(rec.target)
            records += b"\xc0\x0c" + struct.pack("!HHIH", SRV, 1, 0, len(rdata)) + rdata
            count += 1
        elif isinstance(rec, str) and qtype == A:
            rdata = bytes(int(x) for x in rec.split("."))
            records += b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 0, 4) + rdata
            count += 1
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, count, 0, 0)
    return header + question + records


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, resolve: Callable[[str, int], Answer]) -> None:
        self.resolve = resolve
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            qid, flags, name, qtype, question = parse_query(data)
            answer = self.resolve(name, qtype)
            reply = build_response(qid, flags, question, qtype, answer)
        except Exception:  # a malformed query gets no answer; the asker times out and retries
            self.errors += 1
            return
        self.queries += 1
        assert self.transport is not None
        self.transport.sendto(reply, addr)


class DnsServer:
    """UDP on 127.0.0.1:port (0: a free one); `resolve(name, qtype)` answers from the current routing table."""

    def __init__(self, resolve: Callable[[str, int], Answer], port: int = 0) -> None:
        self._protocol = _Protocol(resolve)
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self._protocol, local_addr=("127.0.0.1", self.port))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    @property
    def queries(self) -> int:
        return self._protocol.queries

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
