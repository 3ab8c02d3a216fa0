"""Events documented for outside clients: every field described (with its unit), docs/events.md in step."""

from __future__ import annotations

from pathlib import Path

import msgspec

from modelcd.events.codec import decode, encode
from modelcd.events.docs import EXAMPLES, render_markdown
from modelcd.events.schemas import ALL_EVENTS, TOPIC_EVENTS

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_of_every_event_has_a_description() -> None:
    """The JSON Schemas carry a description for every event and every field (what a consumer reads)."""
    missing = []
    for topic, union in TOPIC_EVENTS.items():
        for name, definition in msgspec.json.schema(union)["$defs"].items():
            if not definition.get("description"):
                missing.append(f"{topic}: {name}")
            for field, prop in definition.get("properties", {}).items():
                if field != "type" and not prop.get("description"):
                    missing.append(f"{topic}: {name}.{field}")
    assert missing == []


def test_times_and_durations_state_their_unit() -> None:
    """Fields holding times or durations say in their description what unit they are in."""
    for union in TOPIC_EVENTS.values():
        for name, definition in msgspec.json.schema(union)["$defs"].items():
            for field, prop in definition.get("properties", {}).items():
                if field in ("at", "requested_at", "deployed_at", "last_used") or field.endswith(("_ms", "_seconds")):
                    desc = prop["description"]
                    assert any(u in desc for u in ("epoch", "milliseconds", "seconds")), f"{name}.{field}: {desc}"


def test_docs_events_md_is_generated_from_the_schemas() -> None:
    """docs/events.md is what `modelcd schemas docs` renders (regenerate it after changing an event)."""
    assert (ROOT / "docs" / "events.md").read_text() == render_markdown(), \
        "docs/events.md drifted: run `modelcd schemas docs --out docs/events.md`"


def test_docs_examples_are_valid_records() -> None:
    """Every event type has an example on the page, and each decodes as a record of its topic."""
    assert set(EXAMPLES) == set(ALL_EVENTS)
    for event in EXAMPLES.values():
        key, value, headers = encode(event, "docs")
        decoded, env = decode(type(event).topic, value, headers)
        assert decoded == event and env.type == event.ce_type() and key == event.key().encode()


def test_docs_tell_a_pipeline_what_it_had_to_guess() -> None:
    """The page answers what a pipeline writer had to guess: key, ce_type, headers, deployment_id, paths."""
    page = render_markdown()
    for needle in ("keyed by the model name", "**the value's `type`**", "`GET /deployments/{id}`",
                   "absolute path **on the ingest host**", "`ce_id`", "seconds since the Unix epoch",
                   "modelcd logs export --since 1h --out logs.parquet"):
        assert needle in page
