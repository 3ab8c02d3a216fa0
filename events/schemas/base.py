"""The base of every event: a frozen, keyword-only, tagged msgspec Struct.

Invariants (see docs/schema-evolution in msgspec):
- the tag is the CloudEvents `ce_type` and carries the schema version
  (`modelcd.model.state.v1`); a change that breaks old readers is a new tag;
- new fields get defaults, field types never change, unknown fields are allowed
  (readers on an older version ignore them);
- `key()` returns the Kafka key, chosen so one entity's events stay in order.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar

import msgspec


def Doc(description: str) -> msgspec.Meta:  # noqa: N802 - reads as an annotation: Annotated[int, Doc("...")]
    """A field's meaning and unit, exported as its `description` in the JSON Schema (the wire format is unchanged)."""
    return msgspec.Meta(description=description)


def now() -> float:
    """Seconds since the epoch: every timestamp in modelcd events is one of these."""
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=False):
    """Base of all modelcd events."""

    topic: ClassVar[str] = ""

    def key(self) -> str:  # pragma: no cover - every event overrides it
        raise NotImplementedError

    @classmethod
    def ce_type(cls) -> str:
        return cls.__struct_config__.tag  # type: ignore[return-value]

    @classmethod
    def schema_version(cls) -> int:
        return int(cls.ce_type().rsplit(".v", 1)[1])


class TensorData(msgspec.Struct, frozen=True, kw_only=True):
    """A named tensor as the Open Inference Protocol writes it."""

    name: Annotated[str, Doc("Tensor name.")]
    datatype: Annotated[
        str,
        Doc("Open Inference Protocol datatype (BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64, BYTES)."),
    ]
    shape: Annotated[list[int], Doc("Shape, e.g. [rows, columns].")]
    data: Annotated[list[Any], Doc("Values flattened row-major.")]
