"""CloudEvents (Kafka protocol binding, binary mode) over msgspec JSON.

The event body is the Struct as JSON in the record value; `ce_*` attributes are
record headers. Encoders and decoders are built once per topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from .schemas import TOPIC_EVENTS, Event, new_id

SPECVERSION = b"1.0"
CONTENT_TYPE = b"application/json"

_encoder = msgspec.json.Encoder()
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    topic: msgspec.json.Decoder(union) for topic, union in TOPIC_EVENTS.items()
}


class DecodeError(ValueError):
    """A record that is not a valid event of its topic (a poison record)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """The CloudEvents attributes of one record."""

    id: str
    type: str
    source: str
    time: str


def encode(event: Event, source: str, *, event_id: str | None = None) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """-> (key, value, headers) for a Kafka record."""
    headers = [
        ("ce_specversion", SPECVERSION),
        ("ce_id", (event_id or new_id()).encode()),
        ("ce_source", source.encode()),
        ("ce_type", event.ce_type().encode()),
        ("ce_time", datetime.now(UTC).isoformat().encode()),
        ("content-type", CONTENT_TYPE),
    ]
    return event.key().encode(), _encoder.encode(event), headers


def decode(topic: str, value: bytes | None, headers: Any = ()) -> tuple[Event, Envelope]:
    """Decode a record of `topic` into its Struct, or raise DecodeError with the reason."""
    decoder = _decoders.get(topic)
    if decoder is None:
        raise DecodeError(f"unknown topic {topic!r}")
    if value is None:
        raise DecodeError("empty record (tombstone)")
    hdr = {k: v for k, v in (headers or ())}
    try:
        event = decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(str(exc)) from None
    ce_type = hdr.get("ce_type")
    if ce_type is not None and ce_type.decode(errors="replace") != event.ce_type():
        raise DecodeError(f"ce_type header {ce_type!r} does not match body type {event.ce_type()!r}")
    env = Envelope(
        id=_h(hdr, "ce_id") or "",
        type=event.ce_type(),
        source=_h(hdr, "ce_source") or "",
        time=_h(hdr, "ce_time") or "",
    )
    return event, env


def _h(hdr: dict[str, bytes], name: str) -> str | None:
    raw = hdr.get(name)
    return None if raw is None else raw.decode(errors="replace")


def to_json(event: Event) -> bytes:
    return _encoder.encode(event)
