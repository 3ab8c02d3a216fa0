"""Which models a node's requests used last, kept across restarts: what it loads first when it starts again.

A node loads a hot set before it reports ready. Without history that is the newest models that fit the
budget, so a node holding a thousand small models loaded hundreds of them before it answered, while its
requests used a few. So the node saves, with each heartbeat, every model version's last request time
(`save`); when it starts again, the models requested within MODELCD_RECENT_WINDOW load before it
reports ready, and the rest of the hot set loads after, in the background (`split`).

Invariants:
- the file is replaced atomically (a temporary file, then a rename): a crash leaves the old one or
  the new one, never half of one;
- it only orders loads, never decides what serves: a missing, unreadable or foreign file is an
  empty history (logged), and a key the node no longer serves is ignored.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from modelcd.logs import get_logger

log = get_logger("modelcd.serving.recent")

FORMAT = 1


def load(path: Path) -> dict[str, float]:
    """{model key: last request time (epoch s)} as last saved; empty when there is none worth reading."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the node's request history", path=str(path), reason=str(exc))
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("last_used"), dict):
        log.warning("ignoring the node's request history", path=str(path), reason="not a history this node wrote")
        return {}
    return {k: float(v) for k, v in doc["last_used"].items()
            if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0}


def save(path: Path, last_used: Mapping[str, float]) -> None:
    """Write the history atomically (blocking: call it off the event loop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump({"format": FORMAT, "last_used": dict(last_used)}, fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def split(hot: Sequence[str], last_used: Mapping[str, float], pinned: set[str], *, now: float,
          window: float) -> tuple[list[str], list[str]]:
    """The hot set as (load before ready, load after ready), each in the hot set's order.

    Before ready: pinned models and those requested within `window` seconds. When nothing qualifies
    (a first start, no history) or `window` is 0, the whole hot set loads before ready, as it did.
    """
    if window <= 0:
        return list(hot), []
    first = [k for k in hot if k in pinned or now - last_used.get(k, float("-inf")) <= window]
    if not first:
        return list(hot), []
    chosen = set(first)
    return first, [k for k in hot if k not in chosen]
