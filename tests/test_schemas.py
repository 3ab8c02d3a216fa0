"""Schemas: the checked-in JSON Schema files match the Structs; every event is versioned."""

from __future__ import annotations

import jsonschema
import msgspec

from modelcd.events.schemas import ALL_EVENTS, SCHEMA_DIR, TOPIC_EVENTS, render, schema_documents
from tests.test_bus import one_of_each


def test_checked_in_schemas_do_not_drift() -> None:
    """Each generated schema equals the checked-in file; run `modelcd schemas export` after a change."""
    docs = schema_documents()
    assert set(docs) == {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    for name, doc in docs.items():
        assert (SCHEMA_DIR / name).read_text() == render(doc), f"{name} drifted: run `modelcd schemas export`"


def test_every_event_has_a_versioned_type() -> None:
    """ce_type names the schema version and is unique per event class."""
    types = [cls.ce_type() for cls in ALL_EVENTS]
    assert len(types) == len(set(types))
    for cls in ALL_EVENTS:
        assert cls.ce_type().startswith("modelcd.") and cls.schema_version() >= 1
        assert cls.topic in TOPIC_EVENTS


def test_events_validate_against_their_schema() -> None:
    """An encoded event of each type is valid under its topic's JSON Schema (what outside readers use)."""
    docs = schema_documents()
    for event in one_of_each():
        doc = docs[f"{type(event).topic}.schema.json"]
        jsonschema.validate(msgspec.json.decode(msgspec.json.encode(event)), doc)


def test_unknown_fields_are_tolerated() -> None:
    """A newer writer's extra field does not break an older reader (schema evolution)."""
    from modelcd.events.codec import decode
    raw = b'{"type":"modelcd.model.state.v1","name":"a","version":"1","target":"serving","new_field":1}'
    event, _ = decode("modelcd.model-state", raw)
    assert event.name == "a"  # type: ignore[attr-defined]
