"""The sandbox: every step of a deployment that runs model code runs here, in a child process killed on its limits.

Ingest's own process never imports or runs model code: it reads archives as bytes, and hands the package
to a child process that does, in this order and reporting each phase as a JSON line on its stdout:

1. `warm`: the child has numpy, scikit-learn, skops, ONNX Runtime and skl2onnx imported; it then waits
   for its job on stdin (EOF, when ingest exits, ends it);
2. `ready`: it read the package and imported the runtime libraries it needs;
3. `checked`: the structural checks of the model files (`runtimes.checks`: tree indices in range, no
   cycles, features in range), before any model library loads them;
4. `compiled`: scikit-learn to ONNX (`runtimes.compile`: skl2onnx, then both models predict the samples
   and must agree), the compiled archive written next to the package;
5. `result`: serving validation of the package that will serve (compiled or not): `load_runtime` (the
   serving code), predict on the samples, compare with `outputs_match`, time, measure memory; the fallback
   model too, if any.

Where children come from (MODELCD_VALIDATION_WARM): by default each child is forked by the sandbox zygote
(`zygote.py`), one long-lived `python -m modelcd.ingest.sandbox --zygote` per ingest, started ahead of
need (`prestart`), which imported those libraries once; a child then costs a fork, not ~1 s of CPU for an
interpreter and its imports. If the zygote cannot start or dies, the next job restarts it; a zygote that
fails to start leaves that job (and those of the next `_ZYGOTE_RETRY_S`) to a child started the old way,
`python -m modelcd.ingest.sandbox -`, which imports the libraries itself (with the setting off, always).
Both kinds are the same child from `warm` on; what follows holds for both.

Limits: the child limits its own address space to MODELCD_VALIDATION_MEMORY (`RLIMIT_AS`) before it
reads the package. The parent's clock for each phase starts when the previous phase answered: checks and
compile each get MODELCD_COMPILE_TIMEOUT, serving validation MODELCD_VALIDATION_TIMEOUT. Interpreter
start-up and imports never count against the model. Past a limit the child's process group is
SIGKILLed; a child that dies (a signal, the OOM killer, a native crash) is reported with its signal and
the tail of its stderr. Each is a `DeploymentRejected` at the step of the phase: `ValidationFailed`
(checks), `CompileFailed` (compile), `ServingValidationFailed` (validation).

CPU: sandbox processes (the zygote and every child) run at niceness MODELCD_VALIDATION_NICE (19 by
default), so a serving node on the same cores wins the CPU while a deployment validates; not SCHED_IDLE,
which could starve a deployment for ever on a saturated host.

Each child runs one package and exits: nothing a model did survives into the next deployment (a forked
child never returns into the zygote). Its stdin and a private copy of its stdout are the only channel
(fd 1 points at stderr, so what a model library prints cannot corrupt a phase line; only the last 64 KiB
of stderr are kept); it runs in its own session, in a temporary working directory, with an environment
stripped of ingest's secrets (only `_CHILD_ENV`: no MODELCD_API_TOKEN, no AWS credentials, but `modelcd
up`'s run mark; the zygote's is the same, with the thread pools sized 1), and it never outlives ingest:
the parent-death signal (SIGKILL, on Linux) ties a started child or the zygote to ingest, and a forked
child to the zygote, which kills its children when ingest closes it (`close()` leaves no sandbox process
behind). The parent does not trust what it hands back: a compiled archive is read with `read_package`
again and compared with the original by the caller (`policy.check_compiled`).

Memory: `memory_bytes` is the resident growth while the serving model loads and predicts. After a
compile in the same process, freed allocator pages may be reused by that load, so it is a lower bound
for small models (large arrays are mmapped and measured in full), and never below the model file's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcd.events.schemas import Resources
from modelcd.logs import get_logger
from modelcd.runner import preexec_die_with_parent

from .errors import CompileFailed, DeploymentRejected, ServingValidationFailed, ValidationFailed
from .zygote import EXIT_STATUS_WAIT_S, THREAD_VARS, SandboxZygote, ZygoteError, ZygoteTimeout

log = get_logger("modelcd.ingest.sandbox")

_STARTUP_DEADLINE_S = 120.0  # interpreter + numpy + the model library, on a loaded 2-core host
_ZYGOTE_RETRY_S = 60.0  # after the zygote failed to start, jobs use started children this long before a retry
_TIMING_RUNS = 15
_TIMING_BUDGET_S = 1.0
_STDERR_TAIL = 600


@dataclass(frozen=True, slots=True)
class SandboxReport:
    runtime: str
    samples: int
    load_ms: float
    predict_us: float
    memory_bytes: int
    fallback_runtime: str | None = None

    def resources(self) -> Resources:
        return Resources(memory_bytes=self.memory_bytes, load_ms=round(self.load_ms, 3),
                         predict_us=round(self.predict_us, 3))


@dataclass(frozen=True, slots=True)
class CompileOutcome:
    """What the compile phase gave: the compiled archive (None: the package serves as it is) and why."""

    data: bytes | None
    reason: str


class _Process:
    """A sandbox child as ingest sees it: its pid, its stdout and stderr, how it ended. Two kinds: `_Started`
    (its own interpreter, ingest's child) and `_Forked` (forked by the zygote, which reports its end)."""

    pid: int
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    lost: str = ""  # why its exit status is unknown, when it is

    @property
    def returncode(self) -> int | None:
        """Its exit code (-N: killed by signal N) once it ended and that is known; else None."""
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        """Write to its stdin; `ConnectionError` if it is gone."""
        raise NotImplementedError

    async def wait(self) -> int | None:
        """Its exit code once it ended; None if that cannot be known (`lost` says why)."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL its process group (what the model spawned) and itself, if it has not ended."""
        raise NotImplementedError

    def release(self) -> None:
        """Close ingest's ends of its pipes."""


class _Started(_Process):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc, self.pid, self.stdout, self.stderr = proc, proc.pid, proc.stdout, proc.stderr

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def wait(self) -> int | None:
        return await self.proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class _Forked(_Process):
    """A child of the zygote: ingest holds the other ends of its three pipes; the zygote reaps it."""

    def __init__(self, zygote: SandboxZygote, pid: int, stdin: int, stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader, transports: list[asyncio.BaseTransport]) -> None:
        self.zygote, self.pid, self.stdout, self.stderr = zygote, pid, stdout, stderr
        self._stdin = stdin
        self._transports = transports
        self._code: int | None = None
        self._ended = False  # the zygote reported its end (or is gone): its pid is not ours to signal any more

    @classmethod
    async def fork(cls, zygote: SandboxZygote, cwd: str) -> _Forked:
        """Have the zygote fork a child with fresh pipes as its stdin, stdout and stderr; `ZygoteError` if not."""
        loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = await zygote.spawn(in_r, out_w, err_w, cwd)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):  # the child's ends: it has its own copies now
                os.close(fd)
        child = cls(zygote, pid, in_w, asyncio.StreamReader(limit=1 << 16), asyncio.StreamReader(limit=1 << 16),
                    [])  # the limit of asyncio's subprocess pipes, as for a started child
        pipes = [os.fdopen(out_r, "rb", buffering=0), os.fdopen(err_r, "rb", buffering=0)]
        try:
            for pipe, reader in zip(pipes, (child.stdout, child.stderr), strict=True):
                transport, _ = await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
                child._transports.append(transport)
        except BaseException:  # leave no child waiting for a job nobody will give it
            child.kill()
            child.release()
            for pipe in pipes:
                pipe.close()
            raise
        return child

    @property
    def returncode(self) -> int | None:
        return self._code

    async def send(self, data: bytes) -> None:
        if self._stdin < 0:
            raise BrokenPipeError("the sandbox child's stdin is closed")
        view = memoryview(data)
        while view:  # one short line into an empty pipe: written at once
            view = view[os.write(self._stdin, view):]
        os.close(self._stdin)  # the child reads one line; EOF after it
        self._stdin = -1

    async def wait(self) -> int | None:
        if not self._ended:
            status = await self.zygote.exit_status(self.pid, EXIT_STATUS_WAIT_S)
            if status is None:
                # Never reported: the zygote is gone (and this child with it, by its parent-death signal), or
                # the child closed its pipes and lives on. Kill its group in case, and stop waiting.
                self.kill()
                self.lost = ("the sandbox zygote exited (its children die with it)" if not self.zygote.alive
                             else f"its exit status was not reported within {EXIT_STATUS_WAIT_S:g} s")
            else:
                self._code = os.waitstatus_to_exitcode(status)
            self._ended = True
        return self._code

    def kill(self) -> None:
        if self._ended or self.zygote.exited(self.pid):
            return  # reaped: the pid may be another process's by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)

    def release(self) -> None:
        for transport in self._transports:
            transport.close()
        if self._stdin >= 0:
            os.close(self._stdin)
            self._stdin = -1
        self.zygote.forget(self.pid)


@dataclass(slots=True)
class _Child:
    proc: _Process
    tmp: tempfile.TemporaryDirectory[str]
    stderr: asyncio.Future[bytes]

    async def end(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.stderr.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.stderr
        self.proc.release()
        self.tmp.cleanup()


# (phase, the error it raises, its setting, what it does): the child answers the phases in this order.
_PHASES: dict[str, tuple[type[DeploymentRejected], str, str]] = {
    "checked": (ValidationFailed, "MODELCD_COMPILE_TIMEOUT", "the structural checks of the model"),
    "compiled": (CompileFailed, "MODELCD_COMPILE_TIMEOUT", "compiling the model"),
    "result": (ServingValidationFailed, "MODELCD_VALIDATION_TIMEOUT",
               "loading the model and predicting on its samples"),
}


@dataclass(slots=True)
class SandboxJob:
    """One package in one child: `checked()`, `compiled()`, `validated()`, in this order, then `close()`.

    Each call waits for its phase with its own time limit and raises the phase's `DeploymentRejected`
    when the child refuses, crashes or is killed; after a failure the job is over (`close()` still due).
    """

    child: _Child
    compile_timeout_s: float
    validation_timeout_s: float
    max_compiled_bytes: int
    _failed: bool = False

    async def checked(self) -> str:
        """The structural checks' summary; `ValidationFailed` if the model's structure is unsafe."""
        doc = await self._phase("checked", self.compile_timeout_s)
        return str(doc.get("detail", ""))

    async def compiled(self) -> CompileOutcome:
        """The compiled archive (or None, with the reason it was not compiled); `CompileFailed` on a crash."""
        doc = await self._phase("compiled", self.compile_timeout_s)
        if not doc.get("compiled"):
            return CompileOutcome(None, str(doc.get("reason", "")))
        path = Path(self.child.tmp.name) / "compiled.tar"
        try:
            data = await asyncio.to_thread(_read_bounded, path, self.max_compiled_bytes)
        except OSError as exc:
            raise CompileFailed(f"the sandbox reported a compiled package but it cannot be read: {exc}") from None
        return CompileOutcome(data, str(doc.get("reason", "")))

    async def validated(self) -> SandboxReport:
        """Serving validation's report; `ServingValidationFailed` with the reason otherwise."""
        doc = await self._phase("result", self.validation_timeout_s)
        return SandboxReport(runtime=doc["runtime"], samples=int(doc["samples"]), load_ms=float(doc["load_ms"]),
                             predict_us=float(doc["predict_us"]), memory_bytes=int(doc["memory_bytes"]),
                             fallback_runtime=doc.get("fallback_runtime"))

    async def close(self) -> None:
        """Kill the child if it is still running and remove its directory (idempotent)."""
        await self.child.end()

    async def _phase(self, phase: str, timeout: float) -> dict[str, Any]:
        error, setting, what = _PHASES[phase]
        if self._failed:
            raise error("the sandbox job already failed")
        self._failed = True  # until the phase answered well
        proc, stderr = self.child.proc, self.child.stderr
        try:
            doc = await _line(proc, stderr, timeout)
        except _Timeout:
            proc.kill()
            await proc.wait()
            raise error(f"killed after {timeout:g} s: {what} did not finish within {setting}") from None
        except _Died as exc:
            raise error(f"{what}: {exc}") from None
        if doc.get("phase") == "result" and phase != "result" and not doc.get("ok"):
            raise error(str(doc.get("reason") or f"{what} failed"))  # e.g. an invalid package, before any phase
        if doc.get("phase") != phase:
            raise error(f"the sandbox answered out of turn: expected {phase}, got {str(doc)[:200]}")
        if not doc.get("ok", True):
            raise error(str(doc.get("reason") or f"{what} failed"))
        self._failed = False
        return doc


@dataclass(slots=True)
class Sandbox:
    """Runs one package's job in one sandbox child each: forked by the zygote (started ahead of need,
    restarted if it dies), or started on its own when the zygote is off or cannot start."""

    timeout_s: float  # serving validation
    memory_bytes: int
    python: str = sys.executable
    warm: bool = True  # fork children from the zygote: validation without an interpreter's start-up
    compile_timeout_s: float = 60.0
    max_compiled_bytes: int = 8 << 30
    nice: int = 19  # niceness of every sandbox process (0: ingest's own)
    _zygote: SandboxZygote | None = field(default=None, repr=False)
    _starting: asyncio.Task[None] | None = field(default=None, repr=False)
    _retry_at: float = field(default=0.0, repr=False)  # no zygote (re)start before this (monotonic)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> Sandbox:
        return cls(timeout_s=settings.validation_timeout, memory_bytes=settings.validation_memory,
                   warm=settings.validation_warm, compile_timeout_s=settings.compile_timeout,
                   max_compiled_bytes=2 * settings.max_package_bytes + (1 << 20), nice=settings.validation_nice)

    def _argv(self, *args: str) -> list[str]:
        return [self.python, "-m", "modelcd.ingest.sandbox", *args, "--memory", str(self.memory_bytes),
                "--parent", str(os.getpid()), "--nice", str(self.nice)]

    def _preexec(self) -> Callable[[], None]:
        """Between fork and exec of a sandbox process: the kernel SIGKILLs it when ingest dies, however ingest
        dies (the runner's shared helper), and it runs at its niceness from its first instruction."""
        die_with_parent, nice = preexec_die_with_parent(), min(max(self.nice, 0), 19)

        def preexec() -> None:
            die_with_parent()
            if nice:
                os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), nice))

        return preexec

    async def _start(self) -> _Child:
        """A child with an interpreter of its own (no zygote): it imports the libraries itself."""
        tmp = tempfile.TemporaryDirectory(prefix="modelcd-sandbox-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv("-"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                cwd=tmp.name, start_new_session=True,  # its own process group: a kill takes its threads and children
                env=_child_env(),
                preexec_fn=self._preexec(),
            )
        except BaseException:
            tmp.cleanup()
            raise
        child = _Started(proc)
        return _Child(child, tmp, asyncio.ensure_future(_tail(child.stderr)))

    async def _fork(self, zygote: SandboxZygote) -> _Child:
        tmp = tempfile.TemporaryDirectory(prefix="modelcd-sandbox-")
        try:
            child = await _Forked.fork(zygote, tmp.name)
        except BaseException:
            tmp.cleanup()
            raise
        return _Child(child, tmp, asyncio.ensure_future(_tail(child.stderr)))

    async def _start_zygote(self) -> None:
        env = _child_env()
        env.update({k: "1" for k in THREAD_VARS})  # before numpy loads in the zygote: nothing to fork mid-pool
        env.update(_ZYGOTE_ENV)
        zygote = SandboxZygote(self._argv("--zygote"), env, self._preexec())
        await zygote.start(_STARTUP_DEADLINE_S)
        self._zygote = zygote

    async def _running_zygote(self) -> SandboxZygote | None:
        """The zygote, started (or restarted) if need be; None: this job takes a started child."""
        if not self.warm or self._closed:
            return None
        if self._zygote is not None and self._zygote.alive:
            return self._zygote
        if self._starting is None:
            if self._zygote is not None:
                log.warning("the sandbox zygote exited: restarting it", pid=self._zygote.pid)
                await self._zygote.close()
                self._zygote = None
            if time.monotonic() < self._retry_at:
                return None
            self._starting = asyncio.ensure_future(self._start_zygote())
        task = self._starting
        try:
            await asyncio.shield(task)  # a cancelled deployment leaves the start to the next one
        except asyncio.CancelledError:
            task_ = asyncio.current_task()
            if task_ is not None and task_.cancelling():
                raise  # this job is cancelled
            return None  # the start was, by close(): this job takes a started child
        except ZygoteTimeout:
            raise ValidationFailed(f"the sandbox did not start within {_STARTUP_DEADLINE_S:g} s") from None
        except ZygoteError as exc:
            log.warning("the sandbox zygote cannot start: started sandbox children instead",
                        error=str(exc), retry_in_s=_ZYGOTE_RETRY_S)
            self._retry_at = time.monotonic() + _ZYGOTE_RETRY_S
            return None
        finally:
            if task.done() and self._starting is task:
                self._starting = None
        return self._zygote

    async def _take(self) -> _Child:
        """A child forked by the zygote, or one started on its own if there is no zygote."""
        zygote = await self._running_zygote()
        if zygote is not None:
            try:
                return await self._fork(zygote)
            except ZygoteError as exc:  # it died just now: this job takes a started child, the next restarts it
                log.warning("the sandbox zygote did not fork: starting a sandbox child instead", error=str(exc))
        return await self._start()

    def prestart(self) -> None:
        """Start the zygote now, so the first deployment does not wait for its imports either."""
        if self.warm and not self._closed and self._starting is None and self._zygote is None:
            self._starting = asyncio.ensure_future(self._start_zygote())

    async def close(self) -> None:
        """Stop the zygote and every child it forked (ingest's shutdown); idempotent. A job can still run
        after, in a started child of its own."""
        self._closed = True
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(ZygoteError, asyncio.CancelledError):
                await starting
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            await zygote.close()

    async def start(self, package: bytes, *, compile: bool = False, checks: bool = True) -> SandboxJob:
        """Hand `package` to a child; the returned job answers its phases (and must be closed).

        `compile`: try scikit-learn → ONNX; `checks`: run the structural checks (off only to test the
        sandbox itself). Raises `ValidationFailed` if the child cannot take the job (it did not start).
        """
        child = await self._take()
        try:
            path = Path(child.tmp.name) / "package.tar"
            await asyncio.to_thread(path.write_bytes, package)
            try:
                warm = await _line(child.proc, child.stderr, _STARTUP_DEADLINE_S)
                if warm.get("phase") != "warm":
                    raise ValidationFailed(f"the sandbox answered out of turn: {str(warm)[:200]}")
                job = {"package": str(path), "compile": compile, "checks": checks,
                       "out": str(Path(child.tmp.name) / "compiled.tar")}
                await child.proc.send(json.dumps(job).encode() + b"\n")
                ready = await _line(child.proc, child.stderr, _STARTUP_DEADLINE_S)
            except _Timeout:
                raise ValidationFailed(f"the sandbox did not start within {_STARTUP_DEADLINE_S:g} s") from None
            except (_Died, ConnectionError) as exc:
                raise ValidationFailed(f"the sandbox died before its job began: {exc}") from None
            if ready.get("phase") == "result" and not ready.get("ok"):
                raise ValidationFailed(str(ready.get("reason")))
            if ready.get("phase") != "ready":
                raise ValidationFailed(f"the sandbox answered out of turn: {str(ready)[:200]}")
        except BaseException:
            await child.end()
            raise
        return SandboxJob(child, self.compile_timeout_s, self.timeout_s, self.max_compiled_bytes)

    async def validate(self, package: bytes, *, checks: bool = True) -> SandboxReport:
        """Check and validate a package as it is (no compile); raises the failing phase's `DeploymentRejected`."""
        job = await self.start(package, compile=False, checks=checks)
        try:
            await job.checked()
            await job.compiled()
            return await job.validated()
        finally:
            await job.close()


#: What the child inherits of ingest's environment: how to find Python and its libraries, locale, temp dir and
#: thread counts, and `modelcd up`'s run mark (its supervisor finds what is left of a run by it). Never ingest's
#: secrets (MODELCD_API_TOKEN, AWS_*, tokens): model code runs there.
_CHILD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
              "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "SYSTEMROOT",
              "MODELCD_UP_RUN")


#: Also in the zygote's environment: pyarrow (which scikit-learn imports) starts jemalloc's background thread
#: unless told not to.
_ZYGOTE_ENV = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _CHILD_ENV}


async def _tail(stream: asyncio.StreamReader, keep: int = 64 << 10) -> bytes:
    """Drain the child's stderr keeping only its last `keep` bytes: a model may write gigabytes there."""
    buf = bytearray()
    while chunk := await stream.read(1 << 16):
        buf += chunk
        if len(buf) > 2 * keep:
            del buf[:-keep]
    return bytes(buf[-keep:])


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


async def _line(proc: _Process, stderr: asyncio.Future[bytes], timeout: float) -> dict[str, Any]:
    """The child's next JSON line; `_Timeout` past `timeout`, `_Died` (with how) when it ended without one."""
    try:
        async with asyncio.timeout(timeout):  # not wait_for: it may swallow a cancellation on 3.11
            raw = await proc.stdout.readline()
    except TimeoutError:
        raise _Timeout from None
    except ValueError:  # a line past the stream's limit: not the protocol
        raise _Died("the sandbox wrote an oversized line") from None
    if not raw:  # the child died without a word: a signal, the OOM killer, a hard crash
        code = await proc.wait()
        raise _Died(await _death(stderr, code, proc.lost))
    try:
        doc = json.loads(raw)
    except ValueError:
        raise _Died(f"the sandbox wrote garbage: {raw[:200]!r}") from None
    return doc if isinstance(doc, dict) else {}


def _read_bounded(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"the compiled package is larger than {limit} bytes")
    return data


async def _death(stderr: asyncio.Future[bytes], code: int | None, lost: str = "") -> str:
    try:
        async with asyncio.timeout(5):
            tail = (await asyncio.shield(stderr)).decode(errors="replace").strip()[-_STDERR_TAIL:]
    except TimeoutError:
        tail = ""
    if code is None:  # not the model's doing as far as we know: the zygote went away under it
        return f"the sandbox ended ({lost or 'its exit status is unknown'})" + (f": {tail}" if tail else "")
    if code < 0:
        how = f"killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (out of memory? MODELCD_VALIDATION_MEMORY limits the sandbox)"
    else:
        how = f"exit code {code}"
    return f"the model crashed the sandbox ({how})" + (f": {tail}" if tail else "")


# --- the child -----------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the peak
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_PROTOCOL: Any = None  # the child's channel to ingest: the original stdout, kept from model code


def _say(doc: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(doc) + "\n")
    _PROTOCOL.flush()


def _keep_protocol_channel() -> None:
    """Move the protocol to a private copy of stdout and point fd 1 at stderr: whatever a model library
    prints goes to the stderr tail, and cannot forge or corrupt a phase line."""
    global _PROTOCOL
    _PROTOCOL = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


_LIBRARIES = {"sklearn": ("sklearn", "skops.io"), "onnx": ("onnxruntime",), "xgboost": ("xgboost",),
              "lightgbm": ("lightgbm",)}


def _child(path: str, memory: int) -> int:
    """Run one job; `path` "-": warm up first, then read the job (JSON) from stdin; else validate that file."""
    import resource

    _keep_protocol_channel()
    if memory > 0:
        # Address space, not RSS: the only limit an unprivileged process can set on itself that the
        # kernel enforces; an allocation past it fails (MemoryError) instead of swapping the host.
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    import importlib

    from modelcd.runtimes.checks import StructureError, check_package_models
    from modelcd.runtimes.compile import compile_package
    from modelcd.runtimes.flavors import ModelRuntimeError, load_runtime, outputs_match
    from modelcd.store.package import PackageError, read_package

    job: dict[str, Any] = {"package": path, "compile": False, "checks": True, "out": ""}
    if path == "-":
        # The libraries nearly every package needs (scikit-learn, ONNX Runtime it compiles to, skl2onnx);
        # XGBoost and LightGBM are imported below when a package asks for them.
        for lib in (*_LIBRARIES["sklearn"], *_LIBRARIES["onnx"], "skl2onnx"):
            with contextlib.suppress(ImportError):
                importlib.import_module(lib)
        _say({"phase": "warm"})
        line = sys.stdin.readline().strip()
        if not line:
            return 0  # ingest went away before giving us a package
        job = json.loads(line)
    try:
        pkg = read_package(Path(job["package"]).read_bytes())
    except PackageError as exc:
        _say({"phase": "result", "ok": False, "reason": f"invalid package: {exc.reason}"})
        return 0
    m = pkg.manifest
    for runtime in filter(None, (m.runtime, m.fallback_runtime, "onnx" if job["compile"] else None)):
        for lib in _LIBRARIES.get(runtime, ()):
            with contextlib.suppress(ImportError):  # a missing library is reported by load_runtime
                importlib.import_module(lib)
    _say({"phase": "ready"})

    # 3. structural checks, before any model library sees the model
    if job["checks"]:
        try:
            detail = check_package_models(m, pkg.contents)
        except StructureError as exc:
            _say({"phase": "checked", "ok": False, "reason": f"unsafe model structure: {exc.reason}"})
            return 0
        except MemoryError:
            _say({"phase": "checked", "ok": False, "reason": f"the structural check exceeded the sandbox memory "
                                                            f"limit of {memory} bytes (MODELCD_VALIDATION_MEMORY)"})
            return 0
        _say({"phase": "checked", "ok": True, "detail": detail})
    else:
        _say({"phase": "checked", "ok": True, "detail": "structural checks off (MODELCD_STRUCTURAL_CHECKS=false)"})

    # 4. compile
    if job["compile"]:
        try:
            result = compile_package(pkg)
        except MemoryError:
            _say({"phase": "compiled", "ok": False, "reason": f"compiling exceeded the sandbox memory limit of "
                                                             f"{memory} bytes (MODELCD_VALIDATION_MEMORY)"})
            return 0
        except Exception as exc:  # noqa: BLE001 - compile_package reports what it foresaw; this is the rest
            _say({"phase": "compiled", "ok": False, "reason": f"compiling failed: {type(exc).__name__}: {exc}"})
            return 0
        if result.compiled:
            Path(job["out"]).write_bytes(result.package.data)
            pkg = read_package(result.package.data)
            m = pkg.manifest
        _say({"phase": "compiled", "ok": True, "compiled": result.compiled, "reason": result.reason})
    else:
        _say({"phase": "compiled", "ok": True, "compiled": False,
              "reason": "compile disabled (MODELCD_COMPILE_ONNX=false)"})

    # 5. serving validation of what will serve
    samples = pkg.samples()
    n = len(next(iter(samples.inputs.values())))

    def check(runtime: str | None) -> dict[str, Any]:
        name = runtime or m.runtime
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        try:
            rt = load_runtime(m, pkg.contents, runtime=runtime)
        except ModelRuntimeError as exc:
            return {"ok": False, "reason": f"the model does not load ({name}): {exc}"}
        load_ms = (time.perf_counter() - t0) * 1000
        try:
            try:
                actual = rt.predict(samples.inputs)
            except ModelRuntimeError as exc:
                return {"ok": False, "reason": f"the model fails on its sample inputs ({name}): {exc}"}
            if reason := outputs_match(samples.outputs, actual, m.tolerance):
                return {"ok": False, "reason": f"the model's outputs ({name}) differ from the expected outputs "
                                               f"within tolerance {m.tolerance}: {reason}"}
            times = []
            budget = time.perf_counter() + _TIMING_BUDGET_S
            for _ in range(_TIMING_RUNS):
                t = time.perf_counter()
                rt.predict(samples.inputs)
                times.append((time.perf_counter() - t) * 1e6)
                if time.perf_counter() > budget:
                    break
            return {"ok": True, "runtime": name, "load_ms": load_ms, "predict_us": statistics.median(times),
                    # Never below the model file's size: pages freed by the compile (or a runtime without an
                    # arena) can make a small model's resident growth 0, and a budget charging 0 admits any.
                    "memory_bytes": max(_rss_bytes() - rss0, len(pkg.model_bytes))}
        finally:
            rt.close()

    try:
        primary = check(None)
        if primary["ok"] and m.fallback_runtime:
            fallback = check(m.fallback_runtime)
            if not fallback["ok"]:
                primary = {**fallback, "reason": f"the fallback model fails: {fallback['reason']}"}
            else:
                primary["fallback_runtime"] = m.fallback_runtime
    except MemoryError:
        primary = {"ok": False, "reason": f"the model exceeded the sandbox memory limit of {memory} bytes "
                                          "(MODELCD_VALIDATION_MEMORY)"}
    except Exception as exc:  # noqa: BLE001 - anything a model does is reported, never a traceback
        primary = {"ok": False, "reason": f"the model failed: {type(exc).__name__}: {exc}"}
    _say({"phase": "result", "samples": n, **primary})
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modelcd.ingest.sandbox",
                                     description="Check, compile and validate one package (run by ingest).")
    parser.add_argument("package", nargs="?", default="-",
                        help="package archive to validate, or - to warm up and read the job from stdin")
    parser.add_argument("--memory", type=int, default=0, help="address-space limit in bytes (0: none)")
    parser.add_argument("--parent", type=int, default=0,
                        help="pid of the ingest that started it (a label; the zygote exits if it is gone)")
    parser.add_argument("--nice", type=int, default=0, help="niceness to run at (0: the parent's)")
    parser.add_argument("--zygote", action="store_true",
                        help="be the zygote: import the libraries, then fork one child per job (zygote.py)")
    parser.add_argument("--ctl-fd", type=int, default=-1, help="the zygote's control socket (from ingest)")
    args = parser.parse_args(argv)
    if args.nice > 0:
        # Before any import: the zygote's imports yield to serving too, and every child inherits it.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), min(args.nice, 19)))
    if args.zygote:
        import socket

        from .zygote import serve

        # Not ONNX Runtime: its import starts a thread (a fork could copy a lock it holds); each child imports
        # it (~20 ms once the rest is loaded).
        preload = ("numpy", *_LIBRARIES["sklearn"], "skl2onnx", "modelcd.runtimes.checks",
                   "modelcd.runtimes.compile", "modelcd.runtimes.flavors", "modelcd.store.package")
        return serve(socket.socket(fileno=args.ctl_fd), args.parent, preload, lambda: _child("-", args.memory))
    return _child(args.package, args.memory)


if __name__ == "__main__":
    sys.exit(main())
