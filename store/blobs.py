"""The artifact & config store: packages and the target state, behind one async interface.

The store is the source of truth; events are the fast path. Two backends implement
`Store`: `LocalStore` (a directory, the embedded default) and `S3Store` (aioboto3).
`open_store(url)` picks one from a URL and is the way the rest of modelcd gets a store.

Invariants every backend keeps:
- keys are `/`-separated relative paths (`packages/ab/ab12….tar`); `..`, `.`, empty
  parts, a leading `/` and backslashes are rejected with `ValueError` before any I/O;
- `put` is atomic: a concurrent `get` returns the old bytes or the new, never a mix;
- `list(prefix)` is a plain string-prefix match, recursive, sorted by code point
  (which is S3's UTF-8 byte order), and never shows temporary files;
- `delete` of a missing key is a no-op.

One difference is inherent to a file system: in a `LocalStore` a key cannot be both an
object and a "directory" (`a` and `a/b`); such a `put` fails with `StoreError`.

Packages are content-addressed: `put_package` stores bytes under
`packages/<sha[:2]>/<sha>.tar` and returns the sha256; `get_package` verifies it.

Errors (`retriable` is a class attribute: retrying the same call may succeed):

    StoreError                  root; anything else the backend refused (retriable=False)
    ├── StoreNotFound           no object at this key; also a KeyError (retriable=False)
    ├── StoreIntegrityError     an object's bytes do not match its sha256 (retriable=False)
    └── StoreUnavailable        network failure, timeout, throttling, 5xx (retriable=True)

Invalid keys and URLs raise `ValueError`: they are bugs, not store conditions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, runtime_checkable
from urllib.parse import unquote, urlsplit

__all__ = [
    "LocalStore",
    "S3Store",
    "Store",
    "StoreError",
    "StoreIntegrityError",
    "StoreNotFound",
    "StoreUnavailable",
    "get_package",
    "open_store",
    "package_key",
    "put_package",
    "validate_key",
]


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Root of the store's errors."""

    retriable: ClassVar[bool] = False


class StoreNotFound(StoreError, KeyError):
    """No object at `key`. Also a `KeyError`, so `except KeyError` callers keep working."""

    retriable: ClassVar[bool] = False

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError.__str__ would repr() the key
        return f"no object at key {self.key!r}"


class StoreIntegrityError(StoreError):
    """The bytes stored at `key` do not hash to the `expected` sha256."""

    retriable: ClassVar[bool] = False

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"object {key!r} is corrupt: expected sha256 {expected}, got {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with a transient failure; retry later."""

    retriable: ClassVar[bool] = True


# --------------------------------------------------------------------------- keys

# Temporary files of LocalStore are named `<_TMP_MARK><name>.<random>`; no key part may
# start with the mark, so a temp file can never collide with, or be listed as, a key.
_TMP_MARK = ".~modelcd-tmp."


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a valid store key, else raise `ValueError` saying why."""
    if not isinstance(key, str):
        raise ValueError(f"store key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("store key must not be empty")
    if "\\" in key:
        raise ValueError(f"store key {key!r} contains a backslash; use '/' to separate parts")
    if "\0" in key:
        raise ValueError(f"store key {key!r} contains a NUL character")
    if key.startswith("/"):
        raise ValueError(f"store key {key!r} must be relative (no leading '/')")
    for part in key.split("/"):
        if not part:
            raise ValueError(f"store key {key!r} has an empty part ('//' or a trailing '/')")
        if part in (".", ".."):
            raise ValueError(f"store key {key!r} contains a {part!r} part")
        if part.startswith(_TMP_MARK):
            raise ValueError(f"store key {key!r} uses the reserved prefix {_TMP_MARK!r}")
    return key


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Store(Protocol):
    """An async key → bytes store. See the module docstring for the invariants and errors."""

    @property
    def url(self) -> str:
        """Where the store lives, for logs (never contains credentials)."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Write `data` at `key`, replacing any old object atomically."""
        ...

    async def get(self, key: str) -> bytes:
        """Return the object at `key`; raise `StoreNotFound` if there is none."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether an object is at `key`."""
        ...

    async def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with `prefix` (a string prefix, recursive)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object at `key`; a missing key is not an error."""
        ...

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` only if no object is there; return whether it was written."""
        ...


# --------------------------------------------------------------------------- local backend


class LocalStore:
    """A `Store` in a directory: key `a/b` is the file `<root>/a/b`.

    `put` writes a temporary file in the target's directory, fsyncs it, `os.replace`s it
    onto the target and fsyncs the directory, so readers see whole objects only and a
    crash leaves the old object or the new one. Blocking I/O runs in `asyncio.to_thread`.
    Also an async context manager (a no-op) so it can be used like `S3Store`.
    """

    # Files are shared with other processes of the deployment (serving nodes read them).
    _FILE_MODE = 0o644

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def url(self) -> str:
        return self.root.absolute().as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    # -- public API

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        await asyncio.to_thread(self._put_sync, key, path, data, False)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        return await asyncio.to_thread(self._put_sync, key, path, data, True)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        return await asyncio.to_thread(self._get_sync, key, path)

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return await asyncio.to_thread(path.is_file)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(self._delete_sync, key, path)

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list_sync, prefix)

    # -- blocking parts, run in a thread

    def _put_sync(self, key: str, path: Path, data: bytes, if_absent: bool) -> bool:
        try:
            tmp = self._write_temp(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {key!r} in {self.url}: {exc}") from exc
        try:
            if if_absent:
                # link() fails if the target exists: an atomic create-if-absent on POSIX.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if path.is_dir():
                        raise StoreError(f"cannot write {key!r} in {self.url}: keys exist below it") from None
                    return False
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise StoreError(f"cannot write {key!r} in {self.url}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # still there after a failure, or after link()

    def _write_temp(self, path: Path, data: bytes) -> Path:
        tmp = path.with_name(f"{_TMP_MARK}{path.name}.{secrets.token_hex(6)}")
        # A concurrent delete may prune the directory between makedirs and open: retry.
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._FILE_MODE)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _get_sync(self, key: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreNotFound(key) from None
        except OSError as exc:
            raise StoreError(f"cannot read {key!r} in {self.url}: {exc}") from exc

    def _delete_sync(self, key: str, path: Path) -> None:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # `key` names a "directory", not an object: nothing to delete
        except OSError as exc:
            raise StoreError(f"cannot delete {key!r} in {self.url}: {exc}") from exc
        # Prune directories left empty so `a` can later be an object again; rmdir only
        # removes empty ones, so this never races away a concurrent writer's file.
        parent = path.parent
        root = self.root.absolute()
        while parent.absolute() != root and root in parent.absolute().parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _list_sync(self, prefix: str) -> list[str]:
        # Walk only below the prefix's directory part. If that part is not a valid key,
        # no valid key can start with the prefix.
        head, sep, _ = prefix.rpartition("/")
        if sep and not _is_valid_key(head):
            return []
        start = self.root.joinpath(*head.split("/")) if sep else self.root
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(_TMP_MARK)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in filenames:
                if name.startswith(_TMP_MARK):
                    continue
                key = base + name
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort()
        return keys


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3 backend


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


# Error codes S3 (and S3-compatibles) return for transient conditions.
_RETRIABLE_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ConditionalRequestConflict",  # a concurrent conditional write on the same key
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Store:
    """A `Store` in an S3 bucket: key `a/b` is the object `<prefix>/a/b`.

    Enter it once (`async with S3Store(...) as store`): the aioboto3 client is created in
    `__aenter__` and closed in `__aexit__`; calls outside that window raise `RuntimeError`.
    S3 PUTs are atomic per object. `put_if_absent` uses a conditional write
    (`If-None-Match: *`); against a server that answers it with 501 Not Implemented it
    falls back to HEAD-then-PUT, which is racy (best effort). With `create_bucket=True`
    a missing bucket is created on enter. botocore retries transient failures
    (`max_attempts` in all, with backoff) before `StoreUnavailable` is raised.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._create_bucket = create_bucket
        self._max_attempts = max_attempts
        self._base = f"{prefix}/" if prefix else ""
        self._state = _State.UNOPENED
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._conditional_writes = True

    @property
    def url(self) -> str:
        url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{url} (endpoint {self.endpoint_url})" if self.endpoint_url else url

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, state={self._state.value})"

    async def __aenter__(self) -> Self:
        if self._state is not _State.UNOPENED:
            raise RuntimeError(f"{self!r} can be entered only once")
        import aioboto3
        from aiobotocore.config import AioConfig

        session = aioboto3.Session(
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            region_name=self.region,
        )
        config = AioConfig(
            # A custom endpoint (MinIO, moto, …) rarely has wildcard DNS for buckets.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": self._max_attempts},
            connect_timeout=10,
            read_timeout=60,
        )
        try:
            self._client = await self._stack.enter_async_context(
                session.client("s3", endpoint_url=self.endpoint_url, config=config)
            )
            self._state = _State.OPEN
            if self._create_bucket:
                await self._ensure_bucket()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._client = None
        await self._stack.aclose()

    def _c(self) -> Any:
        if self._state is not _State.OPEN:
            raise RuntimeError(f"{self!r} is not open; use 'async with'")
        return self._client

    def _obj(self, key: str) -> str:
        return self._base + validate_key(key)

    async def _ensure_bucket(self) -> None:
        client = self._c()
        with _translate(None, self.url):
            try:
                await client.head_bucket(Bucket=self.bucket)
                return
            except _client_error() as exc:
                if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                await client.create_bucket(**kwargs)
            except _client_error() as exc:
                if _code(exc) not in ("BucketAlreadyOwnedByYou",):
                    raise

    # -- public API

    async def put(self, key: str, data: bytes) -> None:
        obj = self._obj(key)
        with _translate(key, self.url):
            await self._c().put_object(Bucket=self.bucket, Key=obj, Body=data)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        obj = self._obj(key)
        client = self._c()
        with _translate(key, self.url):
            if self._conditional_writes:
                try:
                    await client.put_object(Bucket=self.bucket, Key=obj, Body=data, IfNoneMatch="*")
                    return True
                except _client_error() as exc:
                    code = _code(exc)
                    if code in ("PreconditionFailed", "412"):
                        return False
                    if code not in ("NotImplemented", "501"):
                        raise
                    self._conditional_writes = False
            if await self.exists(key):
                return False
            await client.put_object(Bucket=self.bucket, Key=obj, Body=data)
            return True

    async def get(self, key: str) -> bytes:
        obj = self._obj(key)
        with _translate(key, self.url):
            resp = await self._c().get_object(Bucket=self.bucket, Key=obj)
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

    async def exists(self, key: str) -> bool:
        obj = self._obj(key)
        with _translate(key, self.url):
            try:
                await self._c().head_object(Bucket=self.bucket, Key=obj)
            except _client_error() as exc:
                if _code(exc) in _NOT_FOUND_CODES:
                    return False
                raise
            return True

    async def delete(self, key: str) -> None:
        obj = self._obj(key)
        with _translate(key, self.url):
            await self._c().delete_object(Bucket=self.bucket, Key=obj)

    async def list(self, prefix: str = "") -> list[str]:
        client = self._c()
        keys: list[str] = []
        with _translate(None, self.url):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base + prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self._base) :]
                    # Objects written by other tools may not be valid keys (`a//b`): skip them,
                    # so every listed key can be passed back to get().
                    if _is_valid_key(key):
                        keys.append(key)
        keys.sort()
        return keys


def _client_error() -> type[Exception]:
    from botocore.exceptions import ClientError

    return ClientError


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _translate(key: str | None, url: str) -> Iterator[None]:
    """Map botocore/aiohttp exceptions to the store's tree (S3Store only)."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

    what = f"{key!r} in {url}" if key is not None else url
    try:
        yield
    except StoreError:
        raise
    except ClientError as exc:
        code = _code(exc)
        if key is not None and code in _NOT_FOUND_CODES:
            raise StoreNotFound(key) from None
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        cls = StoreUnavailable if code in _RETRIABLE_CODES or status >= 500 else StoreError
        raise cls(f"S3 refused {what}: {code or status}: {exc}") from exc
    except (ConnectionError, HTTPClientError, aiohttp.ClientError, TimeoutError) as exc:
        raise StoreUnavailable(f"S3 unreachable for {what}: {exc}") from exc
    except BotoCoreError as exc:
        # IncompleteReadError, checksum mismatches, …: the transfer went wrong, not the data.
        raise StoreUnavailable(f"S3 transfer failed for {what}: {exc}") from exc


# --------------------------------------------------------------------------- packages

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Hash in a thread above this size: hashlib releases the GIL, the loop keeps answering.
_HASH_INLINE_MAX = 1 << 20


def package_key(sha256_hex: str) -> str:
    """The key of the package whose bytes hash to `sha256_hex`: `packages/<sha[:2]>/<sha>.tar`."""
    if not isinstance(sha256_hex, str) or not _SHA256.fullmatch(sha256_hex):
        raise ValueError(f"not a lowercase hex sha256: {sha256_hex!r}")
    return f"packages/{sha256_hex[:2]}/{sha256_hex}.tar"


async def _sha256(data: bytes) -> str:
    if len(data) <= _HASH_INLINE_MAX:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


async def put_package(store: Store, data: bytes) -> str:
    """Store a package under its content address and return its sha256 (idempotent).

    An object already at that key is left as it is, unread; `get_package` verifies.
    """
    sha = await _sha256(data)
    await store.put_if_absent(package_key(sha), data)
    return sha


async def get_package(store: Store, sha256_hex: str) -> bytes:
    """Return the package with this sha256; `StoreNotFound` if absent, `StoreIntegrityError` if corrupt."""
    key = package_key(sha256_hex)
    data = await store.get(key)
    actual = await _sha256(data)
    if actual != sha256_hex:
        raise StoreIntegrityError(key, sha256_hex, actual)
    return data


# --------------------------------------------------------------------------- opening


@contextlib.asynccontextmanager
async def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    create_bucket: bool = True,
) -> AsyncIterator[Store]:
    """Open the store at `url` for the duration of the `async with` block.

    `url` is `file:///abs/path`, a plain path, or `s3://bucket[/prefix]`. For S3,
    credentials and region come from the usual AWS environment/config, and
    `endpoint_url` (or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, read by botocore)
    points at an S3-compatible server. Raises `ValueError` for other schemes.
    """
    store: LocalStore | S3Store
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"store URL {url!r} names no bucket; expected s3://bucket/prefix")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        store = S3Store(
            parts.netloc,
            unquote(parts.path).strip("/"),
            endpoint_url=endpoint_url,
            region=region,
            create_bucket=create_bucket,
        )
    elif scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {url!r}: file URLs must be local (file:///abs/path)")
        store = LocalStore(Path(unquote(parts.path)))
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a path (C:\… on Windows)
        if not url:
            raise ValueError("store URL is empty")
        store = LocalStore(Path(url))
    else:
        raise ValueError(
            f"unsupported store URL {url!r}: use a directory path, file:///abs/path or s3://bucket/prefix"
        )
    async with store:
        yield store
