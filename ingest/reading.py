"""Reading untrusted bytes without blocking the event loop: bounded in bytes and in time.

Everything here that can take long (a file read, gunzip, the tar walk, hashing) runs in a daemon thread
through `off_loop`, awaited with a time limit. Daemon, not the default executor: a read stuck in the
kernel (a hung network filesystem) must neither hold up the loop nor keep the process from exiting on
SIGINT (the executor's threads are joined at exit; a daemon thread is not).

Package URIs on the local host name regular files only: `read_regular_file` resolves the path, refuses
the virtual filesystems (/proc, /sys, /dev: a `/proc/self/fd/N` names whatever ingest has open), opens
with O_NONBLOCK (a FIFO does not block the open) and O_NOFOLLOW, and checks with `fstat` on the open
descriptor that it is a regular file before reading at most `limit` bytes. Through the HTTP door
(`allowed_dirs` given) the resolved path must also lie under an allowed directory, and every refusal is
the same `Unreadable` so an API caller learns nothing about what exists on the host; through the Kafka
door (pipelines, operators) the reason is specific.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .policy import VIRTUAL_ROOTS, is_under

T = TypeVar("T")
_CHUNK = 4 << 20


class OffLoopTimeout(Exception):
    """`off_loop` gave up waiting (the thread, a daemon, may still be running)."""


async def off_loop(fn: Callable[..., T], *args: Any, timeout: float, name: str = "read") -> T:
    """`fn(*args)` in a daemon thread; its result or exception, or `OffLoopTimeout` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            ok, value = True, fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, exc
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop closed meanwhile: nobody waits any more

    threading.Thread(target=run, name=f"modelcd-{name}", daemon=True).start()
    # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancellation that arrives as the result
    # does, and the caller's own deadline (MODELCD_DEPLOY_TIMEOUT) would then be lost.
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)
    except TimeoutError:
        raise OffLoopTimeout(f"{name} did not finish within {timeout:g} s") from None


class Unreadable(Exception):
    """The file cannot be read as a package; `reason` is safe to show to whoever asked (see the module doc)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLarge(Unreadable):
    pass


def read_regular_file(path: str, limit: int, allowed_dirs: Sequence[str] | None = None) -> bytes:
    """At most `limit` bytes of the regular file at `path`; `Unreadable` (or `TooLarge`) otherwise.

    `allowed_dirs` None: any regular file outside the virtual filesystems (the Kafka door), with a
    specific reason. Given: only under those directories (after resolving links), one reason for all.
    """
    opaque = allowed_dirs is not None

    def refuse(specific: str) -> Unreadable:
        return Unreadable("no package archive ingest may read at this path (through the deployment API, a file:// "
                          "URI must name a regular file under a directory listed in MODELCD_FILE_URI_DIRS)"
                          if opaque else specific)

    real = os.path.realpath(path)
    if any(is_under(p, root) for p in (path, real) for root in VIRTUAL_ROOTS):
        raise refuse(f"{path} is in a virtual filesystem ({', '.join(VIRTUAL_ROOTS)}): not a package archive")
    if allowed_dirs is not None and not any(is_under(real, d) for d in allowed_dirs):
        raise refuse(f"{path} is outside the allowed directories")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise refuse(f"no file {path} on the ingest host") from None
    except PermissionError:
        raise refuse(f"ingest may not read {path}") from None
    except OSError as exc:
        raise refuse(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"{path} is a {_kind(st.st_mode)}, not a regular file: a package URI names an archive file")
        if st.st_size > limit:
            if opaque:
                raise refuse("")
            raise TooLarge(f"archive too large: {st.st_size} bytes, the limit is {limit} (MODELCD_MAX_UPLOAD_BYTES)")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while we read
            raise refuse("") if opaque else TooLarge(f"archive too large: more than {limit} bytes "
                                                     "(MODELCD_MAX_UPLOAD_BYTES)")
        return b"".join(chunks)
    except OSError as exc:
        raise refuse(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"
