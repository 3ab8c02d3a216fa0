"""The node's local package cache: archives keyed by sha256 under `<home>/cache`, verified on every read.

Invariants:
- a file `<root>/<sha256>.tar` is either absent or complete (written to a temporary
  name and renamed), so a crash never leaves a half-written package behind;
- bytes are checked against their sha256 each time they are read, from the store or
  from disk; a corrupt cached copy is deleted and fetched again from the store;
- `prune(keep)` removes the packages no desired model refers to, so the cache's disk
  use follows the target state.

A reload after a budget eviction reads from here, not from the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

from modelcd.logs import get_logger
from modelcd.store.blobs import Store, get_package
from modelcd.store.package import Package, read_package

log = get_logger("modelcd.serving.cache")


class PackageCache:
    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store
        self.hits = 0
        self.misses = 0

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
        return self.root / f"{sha256}.tar"

    async def fetch(self, sha256: str) -> Package:
        """The validated package with this sha256, from disk if cached, else from the store (then cached).

        Raises the store's errors (StoreNotFound, StoreIntegrityError, StoreUnavailable) and PackageError.
        """
        data = await asyncio.to_thread(self._read_verified, sha256)
        if data is None:
            self.misses += 1
            data = await get_package(self.store, sha256)  # verifies the sha256
            await asyncio.to_thread(self._write, sha256, data)
        else:
            self.hits += 1
        return await asyncio.to_thread(read_package, data)

    def _read_verified(self, sha256: str) -> bytes | None:
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cached package is corrupt; fetching it again", sha256=sha256, path=str(path))
            path.unlink(missing_ok=True)
            return None
        return data

    def _write(self, sha256: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(sha256)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    async def prune(self, keep: set[str]) -> int:
        """Delete cached packages whose sha256 is not in `keep`; returns how many."""
        return await asyncio.to_thread(self._prune, keep)

    def _prune(self, keep: set[str]) -> int:
        if not self.root.is_dir():
            return 0
        removed = 0
        for p in self.root.iterdir():
            if p.suffix == ".tar" and p.stem not in keep:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def cached(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.stem for p in self.root.iterdir() if p.suffix == ".tar"}
