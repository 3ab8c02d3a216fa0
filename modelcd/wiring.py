"""How the shell puts parts together (the top of `modelcd/`, beside cli and up).

One place for what one part's service gets from another, so `modelcd up`, the single-service
commands (`modelcd ingest`, `modelcd serve`) and the test harnesses wire the same system:

- `api_routes(settings)`: the route groups mounted on the deployment API beside its own
  (`/endpoints` from the rollout part, `/console` from the console part);
- `node_shadow`: the `ShadowFactory` a serving node gets (the shadow part's `attach`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelcd.settings import Settings


def api_routes(settings: Settings) -> Mapping[str, Any]:
    """{path prefix: RoutesFactory} for the deployment API."""
    from modelcd.console.api import console_routes
    from modelcd.rollout.api import api_routes as endpoint_routes

    return {**endpoint_routes(settings), "console": console_routes(settings)}


def node_shadow() -> Any:
    """The ShadowFactory every serving node started by the shell gets."""
    from modelcd.shadow.node import attach

    return attach
