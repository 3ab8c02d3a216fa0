"""The artifact & config store: one suite run against both backends (a directory, and S3 over HTTP via moto)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelcd.store.blobs import (
    LocalStore,
    S3Store,
    Store,
    StoreError,
    StoreIntegrityError,
    StoreNotFound,
    StoreUnavailable,
    get_package,
    open_store,
    package_key,
    put_package,
)

BAD_KEYS = ["", "/abs", "a/../b", "..", "a/./b", "a//b", "a/", "a\\b", ".~modelcd-tmp.x"]


@pytest.fixture(params=["local", "s3"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    """(url, endpoint_url) of an empty store of the requested backend."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    return request.getfixturevalue("s3_store_url"), request.getfixturevalue("s3_endpoint")


@pytest.fixture
async def store(store_target: tuple[str, str | None]) -> AsyncIterator[Store]:
    url, endpoint = store_target
    async with open_store(url, endpoint_url=endpoint) as s:
        yield s


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    async with LocalStore(tmp_path / "store") as s:
        yield s


# --------------------------------------------------------------------------- both backends


async def test_put_get_exists_overwrite(store: Store) -> None:
    """put stores bytes that get returns verbatim, exists sees them, and a second put replaces them."""
    assert not await store.exists("cfg/a.json")
    await store.put("cfg/a.json", b"one")
    assert await store.exists("cfg/a.json")
    assert await store.get("cfg/a.json") == b"one"
    await store.put("cfg/a.json", b"two")
    assert await store.get("cfg/a.json") == b"two"
    await store.put("empty", b"")
    assert await store.get("empty") == b""


async def test_get_missing_raises_not_found(store: Store) -> None:
    """get of an absent key raises StoreNotFound, which is also a KeyError and not retriable."""
    with pytest.raises(StoreNotFound) as info:
        await store.get("nope/missing.json")
    assert info.value.key == "nope/missing.json"
    assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    assert info.value.retriable is False
    assert "nope/missing.json" in str(info.value)


async def test_delete_is_idempotent(store: Store) -> None:
    """delete removes an object, and deleting it again (or a key never written) is a no-op."""
    await store.put("d/x", b"1")
    await store.delete("d/x")
    assert not await store.exists("d/x")
    with pytest.raises(StoreNotFound):
        await store.get("d/x")
    await store.delete("d/x")
    await store.delete("never/written")
    assert await store.list() == []


async def test_list_is_sorted_recursive_and_by_string_prefix(store: Store) -> None:
    """list returns sorted keys at any depth, filtered by a plain string prefix."""
    keys = ["b", "a/c/d", "ab", "a/b", "targets/models/m/1.json", "targets/traffic/e.json"]
    for k in keys:
        await store.put(k, k.encode())
    assert await store.list() == sorted(keys)
    assert await store.list("a/") == ["a/b", "a/c/d"]
    assert await store.list("a") == ["a/b", "a/c/d", "ab"]
    assert await store.list("targets/models/") == ["targets/models/m/1.json"]
    assert await store.list("targets/mo") == ["targets/models/m/1.json"]
    assert await store.list("zzz/") == []
    assert await store.list("../") == []


@pytest.mark.parametrize("bad", BAD_KEYS)
async def test_invalid_keys_are_rejected(store: Store, bad: str) -> None:
    """Keys with '..', '.', empty parts, a leading '/', backslashes or the temp mark raise ValueError."""
    with pytest.raises(ValueError, match="store key"):
        await store.put(bad, b"x")
    with pytest.raises(ValueError, match="store key"):
        await store.get(bad)
    with pytest.raises(ValueError, match="store key"):
        await store.exists(bad)
    with pytest.raises(ValueError, match="store key"):
        await store.delete(bad)
    with pytest.raises(ValueError, match="store key"):
        await store.put_if_absent(bad, b"x")


async def test_put_if_absent_writes_once(store: Store) -> None:
    """put_if_absent writes a new key and returns True, then leaves it untouched and returns False."""
    assert await store.put_if_absent("once", b"first") is True
    assert await store.put_if_absent("once", b"second") is False
    assert await store.get("once") == b"first"
    assert await store.list() == ["once"]


async def test_packages_are_content_addressed(store: Store) -> None:
    """The same bytes land under the same sha256 key once; get_package returns them."""
    data = b"a model package" * 1000
    sha = await put_package(store, data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert package_key(sha) == f"packages/{sha[:2]}/{sha}.tar"
    assert await put_package(store, data) == sha
    other = await put_package(store, data + b"!")
    assert other != sha
    assert await store.list("packages/") == sorted([package_key(sha), package_key(other)])
    assert await get_package(store, sha) == data


async def test_corrupt_package_raises_integrity_error(store: Store) -> None:
    """get_package refuses bytes that do not hash to the requested sha256."""
    sha = await put_package(store, b"good bytes")
    await store.put(package_key(sha), b"bad bytes")
    with pytest.raises(StoreIntegrityError) as info:
        await get_package(store, sha)
    assert info.value.expected == sha
    assert info.value.actual == hashlib.sha256(b"bad bytes").hexdigest()
    assert info.value.retriable is False


async def test_get_package_missing_and_bad_sha(store: Store) -> None:
    """get_package of an unknown sha raises StoreNotFound; a malformed sha raises ValueError."""
    with pytest.raises(StoreNotFound):
        await get_package(store, "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        await get_package(store, "ABC")


async def test_put_is_atomic_for_concurrent_readers(store: Store) -> None:
    """Readers racing a writer of two distinct multi-MB payloads only ever see one of them whole."""
    size = 4 * 1024 * 1024
    payloads = (b"A" * (size - 1) + b"a", b"B" * (size + 4093))  # different lengths too
    await store.put("big/object", payloads[0])
    writing = True
    seen: list[int] = []

    async def writer() -> None:
        nonlocal writing
        try:
            for i in range(1, 13):
                await store.put("big/object", payloads[i % 2])
        finally:
            writing = False

    async def reader() -> None:
        while writing:
            data = await store.get("big/object")  # never StoreNotFound after the first put
            assert data in payloads, f"partial read: {len(data)} bytes"
            seen.append(payloads.index(data))

    async with asyncio.timeout(120):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer())
            tg.create_task(reader())
            tg.create_task(reader())
    assert seen, "the readers never overlapped the writer"
    assert await store.get("big/object") == payloads[0]


async def test_url_names_the_store(store: Store, store_target: tuple[str, str | None]) -> None:
    """store.url says where the store lives, for logs."""
    url, _ = store_target
    if url.startswith("s3://"):
        assert store.url.startswith(url)
    else:
        assert store.url == Path(url).absolute().as_uri()


# --------------------------------------------------------------------------- local only


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


async def test_local_failed_write_leaves_no_temp_file(local_store: LocalStore) -> None:
    """A put that fails (a file blocks the directory, or a directory blocks the file) leaves no temp file."""
    await local_store.put("blocker", b"a file where a directory would go")
    with pytest.raises(StoreError, match="blocker/child"):
        await local_store.put("blocker/child", b"x")
    await local_store.put("dir/inner", b"y")
    # The temp file is written in `dir`'s parent, then the rename onto the directory fails.
    with pytest.raises(StoreError, match="'dir'"):
        await local_store.put("dir", b"z" * 100_000)
    with pytest.raises(StoreError, match="'dir'"):
        await local_store.put_if_absent("dir", b"z")
    assert _all_files(local_store.root) == ["blocker", "dir/inner"]
    assert await local_store.list() == ["blocker", "dir/inner"]


async def test_local_stray_temp_files_are_not_listed(local_store: LocalStore) -> None:
    """Temp files left by a crashed writer never appear in list and are not keys."""
    await local_store.put("m/obj", b"1")
    (local_store.root / "m" / ".~modelcd-tmp.obj.dead").write_bytes(b"partial")
    (local_store.root / ".~modelcd-tmp.top.dead").write_bytes(b"partial")
    assert await local_store.list() == ["m/obj"]
    assert await local_store.list("m/") == ["m/obj"]


async def test_local_delete_prunes_empty_directories(local_store: LocalStore) -> None:
    """Deleting the last key below `a/` lets `a` become an object again, as on S3."""
    await local_store.put("a/b/c", b"1")
    await local_store.delete("a/b/c")
    assert not (local_store.root / "a").exists()
    assert local_store.root.exists()
    await local_store.put("a", b"2")
    assert await local_store.get("a") == b"2"


async def test_local_directory_is_not_an_object(local_store: LocalStore) -> None:
    """A path that is a directory in the local backend reads as absent, as a common prefix does on S3."""
    await local_store.put("x/y", b"1")
    assert not await local_store.exists("x")
    with pytest.raises(StoreNotFound):
        await local_store.get("x")
    with pytest.raises(StoreNotFound):
        await local_store.get("x/y/z")
    await local_store.delete("x")
    assert await local_store.list() == ["x/y"]


async def test_local_files_are_readable_by_others(local_store: LocalStore) -> None:
    """Objects are written 0644, not the 0600 of a private temp file, so serving nodes can read them."""
    await local_store.put("p", b"1")
    assert (local_store.root / "p").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- S3 only


async def test_s3_unreachable_is_retriable(s3_endpoint: str) -> None:
    """An S3 endpoint that refuses connections raises StoreUnavailable, which is retriable."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("bucket-x", "p", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    async with store:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("k")
    assert info.value.retriable is True


async def test_s3_store_must_be_entered(s3_endpoint: str) -> None:
    """An S3Store is usable only inside its `async with`, and can be entered only once."""
    store = S3Store("bucket-y", endpoint_url=s3_endpoint, create_bucket=True)
    with pytest.raises(RuntimeError, match="not open"):
        await store.get("k")
    async with store:
        await store.put("k", b"v")
        assert await store.get("k") == b"v"
    with pytest.raises(RuntimeError, match="not open"):
        await store.get("k")
    with pytest.raises(RuntimeError, match="only once"):
        await store.__aenter__()


async def test_s3_prefix_isolates_stores(s3_store_url: str, s3_endpoint: str) -> None:
    """Two stores in one bucket under different prefixes do not see each other's keys."""
    async with open_store(s3_store_url, endpoint_url=s3_endpoint) as one:
        async with open_store(s3_store_url + "-other", endpoint_url=s3_endpoint) as two:
            await one.put("k", b"1")
            await two.put("k", b"2")
            assert await one.list() == ["k"]
            assert await one.get("k") == b"1"
            assert await two.get("k") == b"2"


# --------------------------------------------------------------------------- open_store


async def test_open_store_accepts_file_url_and_path(tmp_path: Path) -> None:
    """file:///abs/path and a plain path open the same LocalStore directory."""
    async with open_store(str(tmp_path / "s")) as a:
        await a.put("k", b"v")
    async with open_store((tmp_path / "s").as_uri()) as b:
        assert isinstance(b, LocalStore)
        assert await b.get("k") == b"v"


@pytest.mark.parametrize("url", ["http://example.com/x", "gs://bucket/p", "s3:///nobucket", "file://host/x", ""])
async def test_open_store_rejects_unsupported_urls(url: str) -> None:
    """Unsupported schemes and malformed URLs raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="store URL"):
        async with open_store(url):
            pass


def test_error_tree_and_retriable() -> None:
    """Every store error derives from StoreError; only StoreUnavailable is retriable."""
    for cls in (StoreNotFound, StoreIntegrityError, StoreUnavailable):
        assert issubclass(cls, StoreError)
    assert StoreError.retriable is False
    assert StoreUnavailable.retriable is True
    assert StoreNotFound.retriable is False and StoreIntegrityError.retriable is False


def test_package_key_rejects_non_sha() -> None:
    """package_key accepts only a lowercase 64-digit hex sha256."""
    sha = hashlib.sha256(b"").hexdigest()
    assert package_key(sha) == f"packages/{sha[:2]}/{sha}.tar"
    for bad in ("", sha.upper(), sha[:-1], "../" + sha[3:], os.sep * 64):
        with pytest.raises(ValueError):
            package_key(bad)
