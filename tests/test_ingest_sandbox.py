"""The serving-validation sandbox on its own: children forked by the zygote and started ones give the same verdicts;
each job gets a fresh, confined, low-priority process; the zygote is restarted or replaced when it fails; nothing
leaks."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from modelcd.ingest.errors import ValidationFailed
from modelcd.ingest.sandbox import Sandbox, _Died, _line

from ._ingest import iris_package, with_tampered_member


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command: [state, ppid, pgrp, session, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


async def gone(pid: int) -> None:
    async with asyncio.timeout(30):
        while alive(pid):
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("warm", [True, False])
async def test_verdicts_forked_and_started_and_no_process_left(warm: bool) -> None:
    """A child forked by the zygote and a started one give the same verdicts; `close()` leaves no sandbox
    process (the zygote included) behind."""
    sandbox = Sandbox(timeout_s=60, memory_bytes=4 << 30, warm=warm)
    sandbox.prestart()
    try:
        for version in ("1", "2"):
            report = await sandbox.validate(iris_package("sbx", version).data)
            assert report.samples > 0 and report.runtime in ("sklearn", "onnx")
        with pytest.raises(ValidationFailed, match="invalid package"):
            await sandbox.validate(with_tampered_member(iris_package("sbx", "3"), "model.skops"))
        zygote = sandbox._zygote  # noqa: SLF001
        assert (zygote is not None) == warm
        idle = await sandbox._take()  # noqa: SLF001 - a child waiting for a job, never given one
    finally:
        await sandbox.close()
    assert sandbox._zygote is None  # noqa: SLF001
    if zygote is not None:
        assert zygote.spawned == 4 and not alive(zygote.pid)
        await gone(idle.proc.pid)  # the zygote killed the child it forked as it stopped
    await idle.end()
    assert not alive(idle.proc.pid)


async def test_jobs_are_forked_by_one_zygote_each_in_a_fresh_confined_low_priority_process() -> None:
    """Two jobs get two processes, both children of the same single-threaded zygote (not of ingest), each in its
    own session and private directory, with the address-space limit, at the configured niceness."""
    memory = 3 << 30
    sandbox = Sandbox(timeout_s=60, memory_bytes=memory, nice=7)
    sandbox.prestart()
    children = []
    try:
        for _ in range(2):
            child = await sandbox._take()  # noqa: SLF001
            children.append(child)
            assert (await _line(child.proc, child.stderr, 60))["phase"] == "warm"  # limits are set by then
        zygote = sandbox._zygote  # noqa: SLF001
        assert zygote is not None and zygote.threads == 1
        assert children[0].proc.pid != children[1].proc.pid
        for child in children:
            pid = child.proc.pid
            _state, ppid, pgrp, session = proc_stat(pid)[:4]
            assert int(ppid) == zygote.pid != os.getpid()
            assert int(pgrp) == int(session) == pid  # its own session: killpg takes what the model spawns
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7
            assert os.readlink(f"/proc/{pid}/cwd") == child.tmp.name
            limits = Path(f"/proc/{pid}/limits").read_text()
            assert f"Max address space         {memory}" in limits
        assert os.getpriority(os.PRIO_PROCESS, zygote.pid) == 7
        assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # ingest itself keeps its priority
        # A third one runs a whole job, at the same zygote.
        report = await sandbox.validate(iris_package("sbx-fresh", "1").data)
        assert report.samples > 0 and sandbox._zygote is zygote and zygote.spawned == 3  # noqa: SLF001
    finally:
        for child in children:
            await child.end()
        await sandbox.close()
    for child in children:
        assert not alive(child.proc.pid)


async def test_a_killed_zygote_fails_its_jobs_clearly_and_is_restarted() -> None:
    """SIGKILL the zygote: the job in its child fails at once saying so (no phase timeout), and the next
    deployment gets a new zygote."""
    sandbox = Sandbox(timeout_s=60, memory_bytes=4 << 30)
    sandbox.prestart()
    try:
        child = await sandbox._take()  # noqa: SLF001
        assert (await _line(child.proc, child.stderr, 60))["phase"] == "warm"
        first = sandbox._zygote  # noqa: SLF001
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(_Died, match="the sandbox zygote exited"):
            await _line(child.proc, child.stderr, 60)
        await child.end()
        await gone(child.proc.pid)  # its parent-death signal
        report = await sandbox.validate(iris_package("sbx-restart", "1").data)
        assert report.samples > 0
        second = sandbox._zygote  # noqa: SLF001
        assert second is not None and second.pid != first.pid and second.alive
    finally:
        await sandbox.close()
    assert not alive(second.pid)


async def test_a_zygote_that_cannot_start_leaves_the_job_to_a_started_child(tmp_path: Path) -> None:
    """The interpreter refuses to be a zygote (it exits at once): the deployment is validated by a child started
    on its own, and the zygote is not retried for every job."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase " $* " in *" --zygote "*) exit 3;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    sandbox = Sandbox(timeout_s=60, memory_bytes=4 << 30, python=str(python))
    sandbox.prestart()
    try:
        report = await sandbox.validate(iris_package("sbx-nozygote", "1").data)
        assert report.samples > 0
        assert sandbox._zygote is None and sandbox._retry_at > 0  # noqa: SLF001
        child = await sandbox._take()  # noqa: SLF001 - within the retry delay: a started child, at once
        assert int(proc_stat(child.proc.pid)[1]) == os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, child.proc.pid) == 19  # started children are niced too
        await child.end()
    finally:
        await sandbox.close()


async def test_child_environment_has_no_secrets_and_prints_do_not_break_the_protocol(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the zygote nor a child inherits a secret (API token, AWS keys: model code runs there), but up's
    run mark."""
    monkeypatch.setenv("MODELCD_API_TOKEN", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-too")
    monkeypatch.setenv("MODELCD_UP_RUN", "run-1")
    sandbox = Sandbox(timeout_s=60, memory_bytes=4 << 30, warm=True)
    sandbox.prestart()
    try:
        child = await sandbox._take()  # noqa: SLF001
        assert sandbox._zygote is not None  # noqa: SLF001
        for pid in (sandbox._zygote.pid, child.proc.pid):  # noqa: SLF001
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"s3cret" not in environ and b"MODELCD_API_TOKEN" not in environ
            assert b"MODELCD_UP_RUN=run-1" in environ  # modelcd up's supervisor finds leftovers of its run by it
        await child.end()
        report = await sandbox.validate(iris_package("sbx-env", "1").data)
        assert report.samples > 0
    finally:
        await sandbox.close()


async def test_sandbox_processes_die_with_a_sigkilled_ingest() -> None:
    """A process holding the zygote and a child waiting for its job is SIGKILLed: the kernel kills the zygote
    (parent-death signal), and the child with it."""
    code = ("import asyncio\n"
            "from modelcd.ingest.sandbox import Sandbox\n"
            "async def main():\n"
            "    s = Sandbox(timeout_s=60, memory_bytes=4 << 30)\n"
            "    s.prestart()\n"
            "    child = await s._take()\n"
            "    print(s._zygote.pid, child.proc.pid, flush=True)\n"
            "    await asyncio.sleep(3600)\n"
            "asyncio.run(main())\n")
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    async with asyncio.timeout(120):
        while True:  # past its log lines
            line = await holder.stdout.readline()
            assert line, "the holder exited"
            if line.split()[0].isdigit():
                break
    zygote, child = map(int, line.split())
    assert alive(zygote) and alive(child)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    await gone(zygote)
    await gone(child)
