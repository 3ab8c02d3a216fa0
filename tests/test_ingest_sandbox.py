"""The serving-validation sandbox on its own: warm spare and cold start give the same verdicts, nothing leaks."""

from __future__ import annotations

import os

import pytest

from modelcd.ingest.errors import ValidationFailed
from modelcd.ingest.sandbox import Sandbox

from ._ingest import iris_package, with_tampered_member


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("warm", [True, False])
async def test_verdicts_warm_and_cold_and_no_child_left(warm: bool) -> None:
    """A warm spare and a cold start give the same verdicts, and closing leaves no child behind."""
    sandbox = Sandbox(timeout_s=60, memory_bytes=4 << 30, warm=warm)
    sandbox.prestart()
    try:
        for version in ("1", "2"):  # the second validation takes the spare the first one started
            report = await sandbox.validate(iris_package("sbx", version).data)
            assert report.samples > 0 and report.runtime in ("sklearn", "onnx")
        with pytest.raises(ValidationFailed, match="invalid package"):
            await sandbox.validate(with_tampered_member(iris_package("sbx", "3"), "model.skops"))
        spare = sandbox._spare  # noqa: SLF001 - the process the next validation would take
        assert (spare is not None) == warm
        pid = (await spare).proc.pid if spare is not None else None
    finally:
        await sandbox.close()
    assert sandbox._spare is None  # noqa: SLF001
    if pid is not None:
        assert not alive(pid) or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


async def test_child_environment_has_no_secrets_and_prints_do_not_break_the_protocol(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox child inherits no secret (API token, AWS keys: model code runs there) but up's run mark."""
    monkeypatch.setenv("MODELCD_API_TOKEN", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-too")
    monkeypatch.setenv("MODELCD_UP_RUN", "run-1")
    sandbox = Sandbox(timeout_s=60, memory_bytes=4 << 30, warm=True)
    sandbox.prestart()
    try:
        assert sandbox._spare is not None  # noqa: SLF001
        spare = await sandbox._spare  # noqa: SLF001
        environ = open(f"/proc/{spare.proc.pid}/environ", "rb").read()
        assert b"s3cret" not in environ and b"MODELCD_API_TOKEN" not in environ
        assert b"MODELCD_UP_RUN=run-1" in environ  # modelcd up's supervisor finds leftovers of its run by it
        report = await sandbox.validate(iris_package("sbx-env", "1").data)
        assert report.samples > 0
    finally:
        await sandbox.close()


async def test_sandbox_children_die_with_a_sigkilled_ingest() -> None:
    """A process holding a warm spare is SIGKILLed: the kernel kills the spare too (parent-death signal)."""
    import asyncio
    import signal
    import sys

    code = ("import asyncio\n"
            "from modelcd.ingest.sandbox import Sandbox\n"
            "async def main():\n"
            "    s = Sandbox(timeout_s=60, memory_bytes=4 << 30)\n"
            "    s.prestart()\n"
            "    print((await s._spare).proc.pid, flush=True)\n"
            "    await asyncio.sleep(3600)\n"
            "asyncio.run(main())\n")
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    spare = int(await asyncio.wait_for(holder.stdout.readline(), 120))
    assert alive(spare)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    def running(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    async with asyncio.timeout(30):
        while running(spare):
            await asyncio.sleep(0.05)
