"""Reading package URIs: regular files only, bounded; the HTTP door's refusals all read the same; off_loop
never blocks the loop and gives up on time."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from modelcd.ingest.reading import OffLoopTimeout, TooLarge, Unreadable, off_loop, read_regular_file


def refusal(path: str, allowed: tuple[str, ...] | None = None, limit: int = 1 << 20) -> str:
    with pytest.raises(Unreadable) as info:
        read_regular_file(path, limit, allowed)
    return info.value.reason


def test_fifo_proc_fd_device_and_directory_refused(tmp_path: Path) -> None:
    """A FIFO (no writer: an open would block), /proc/self/fd/N, /dev/zero and a directory are refused at once."""
    fifo = tmp_path / "p.tar"
    os.mkfifo(fifo)
    read_end, write_end = os.pipe()
    try:
        assert "FIFO" in refusal(str(fifo))
        assert "virtual filesystem" in refusal(f"/proc/self/fd/{read_end}")
        assert "virtual filesystem" in refusal("/dev/zero")
        assert "directory" in refusal(str(tmp_path))
        link = tmp_path / "link.tar"
        link.symlink_to(f"/proc/self/fd/{read_end}")  # a link into /proc is resolved first
        assert "virtual filesystem" in refusal(str(link))
        assert "no file" in refusal(str(tmp_path / "missing.tar"))
    finally:
        os.close(read_end)
        os.close(write_end)


def test_regular_file_read_and_bounded(tmp_path: Path) -> None:
    """A regular file is read; one over the limit is TooLarge through the Kafka door."""
    f = tmp_path / "m.tar"
    f.write_bytes(b"x" * 100)
    assert read_regular_file(str(f), 100) == b"x" * 100
    with pytest.raises(TooLarge):
        read_regular_file(str(f), 99)


def test_http_door_refusals_are_all_the_same(tmp_path: Path) -> None:
    """Through the HTTP door: missing, outside, FIFO, directory, too large and a link out of the allowed
    directory all get one message; a regular file inside is read."""
    allowed = tmp_path / "pkgs"
    allowed.mkdir()
    (allowed / "ok.tar").write_bytes(b"ok")
    (allowed / "big.tar").write_bytes(b"x" * 100)
    os.mkfifo(allowed / "fifo.tar")
    (allowed / "dir.tar").mkdir()
    (tmp_path / "secret.tar").write_bytes(b"s")
    (allowed / "out.tar").symlink_to(tmp_path / "secret.tar")
    dirs = (str(allowed),)
    assert read_regular_file(str(allowed / "ok.tar"), 10, dirs) == b"ok"
    reasons = {refusal(str(p), dirs, limit=10) for p in (
        allowed / "missing.tar", tmp_path / "secret.tar", allowed / "fifo.tar", allowed / "dir.tar",
        allowed / "big.tar", allowed / "out.tar", Path("/etc/passwd"), Path("/proc/self/environ"))}
    assert len(reasons) == 1 and "MODELCD_FILE_URI_DIRS" in reasons.pop()


async def test_off_loop_times_out_and_the_loop_keeps_running() -> None:
    """A call stuck in a thread is abandoned at its timeout (its daemon thread does not hold the loop)."""
    release = threading.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.ensure_future(ticker())
    try:
        with pytest.raises(OffLoopTimeout):
            await off_loop(release.wait, timeout=0.5, name="stuck")
    finally:
        release.set()
        t.cancel()
    assert ticks > 0
    assert await off_loop(sum, [1, 2, 3], timeout=5) == 6
    with pytest.raises(ZeroDivisionError):
        await off_loop(lambda: 1 / 0, timeout=5)
