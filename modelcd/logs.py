"""structlog, configured once per process.

JSON lines (orjson) when stderr is not a terminal, coloured console lines when it
is. Context (request id, deployment id, topic/partition/offset) is bound with
contextvars so every line of one unit of work carries it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_configured = False


def configure(level: str = "info", fmt: str = "auto") -> None:
    global _configured
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_out:
        processors = [*shared, structlog.processors.format_exc_info,
                      structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries (aiokafka, uvicorn, botocore) log through stdlib logging: keep them quiet but visible.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _configured = True


def get_logger(name: str | None = None, **bound: Any) -> Any:
    return structlog.get_logger(name, **bound) if name else structlog.get_logger(**bound)
