"""The sandbox: every step of a deployment that runs model code runs here, in a child process killed on its limits.

Ingest's own process never imports or runs model code: it reads archives as bytes, and hands the package
to a child, `python -m modelcd.ingest.sandbox -`, which does, in this order and reporting each phase as
a JSON line on its stdout:

1. `warm`: the interpreter has started and imported numpy, scikit-learn, skops, ONNX Runtime and skl2onnx
   (the child is started ahead of need: the next one is started as soon as one is taken, so a
   deployment does not wait for an interpreter); it then waits for its job on stdin (EOF, when ingest
   exits, ends it);
2. `ready`: it read the package and imported the runtime libraries it needs;
3. `checked`: the structural checks of the model files (`runtimes.checks`: tree indices in range, no
   cycles, features in range), before any model library loads them;
4. `compiled`: scikit-learn to ONNX (`runtimes.compile`: skl2onnx, then both models predict the samples
   and must agree), the compiled archive written next to the package;
5. `result`: serving validation of the package that will serve (compiled or not): `load_runtime` (the
   serving code), predict on the samples, compare with `outputs_match`, time, measure memory; the fallback
   model too, if any.

Limits: the child limits its own address space to MODELCD_VALIDATION_MEMORY (`RLIMIT_AS`) before
anything else. The parent's clock for each phase starts when the previous phase answered: checks and
compile each get MODELCD_COMPILE_TIMEOUT, serving validation MODELCD_VALIDATION_TIMEOUT. Interpreter
start-up and imports never count against the model. Past a limit the child's process group is
SIGKILLed; a child that dies (a signal, the OOM killer, a native crash) is reported with its signal and
the tail of its stderr. Each is a `DeploymentRejected` at the step of the phase: `ValidationFailed`
(checks), `CompileFailed` (compile), `ServingValidationFailed` (validation).

Each child runs one package and exits: nothing a model did survives into the next deployment. Its stdin
and a private copy of its stdout are the only channel (fd 1 points at stderr, so what a model library
prints cannot corrupt a phase line; only the last 64 KiB of stderr are kept); it runs in its own
session, in a temporary working directory, with an environment stripped of ingest's secrets (only
`_CHILD_ENV`: no MODELCD_API_TOKEN, no AWS credentials, but `modelcd up`'s run mark), and it never
outlives ingest (the parent-death signal, SIGKILL, on Linux). The parent does not trust what it hands
back: a compiled archive is read with `read_package` again and
compared with the original by the caller (`policy.check_compiled`).

Memory: `memory_bytes` is the resident growth while the serving model loads and predicts. After a
compile in the same process, freed allocator pages may be reused by that load, so it is a lower bound
for small models (large arrays are mmapped and measured in full).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcd.events.schemas import Resources
from modelcd.runner import preexec_die_with_parent

from .errors import CompileFailed, DeploymentRejected, ServingValidationFailed, ValidationFailed

_STARTUP_DEADLINE_S = 120.0  # interpreter + numpy + the model library, on a loaded 2-core host
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


@dataclass(slots=True)
class _Child:
    proc: asyncio.subprocess.Process
    tmp: tempfile.TemporaryDirectory[str]
    stderr: asyncio.Future[bytes]

    async def end(self) -> None:
        if self.proc.returncode is None:
            _kill(self.proc)
            await self.proc.wait()
        self.stderr.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.stderr
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
            _kill(proc)
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
    """Starts sandbox children (a warm spare ahead of need) and runs one package's job in each."""

    timeout_s: float  # serving validation
    memory_bytes: int
    python: str = sys.executable
    warm: bool = True  # keep the next child started: validation without the interpreter's start-up
    compile_timeout_s: float = 60.0
    max_compiled_bytes: int = 8 << 30
    _spare: asyncio.Task[_Child] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> Sandbox:
        return cls(timeout_s=settings.validation_timeout, memory_bytes=settings.validation_memory,
                   warm=settings.validation_warm, compile_timeout_s=settings.compile_timeout,
                   max_compiled_bytes=2 * settings.max_package_bytes + (1 << 20))

    async def _start(self) -> _Child:
        tmp = tempfile.TemporaryDirectory(prefix="modelcd-sandbox-")
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "modelcd.ingest.sandbox", "-", "--memory", str(self.memory_bytes),
            "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=tmp.name, start_new_session=True,  # its own process group: a kill takes its threads and children
            env=_child_env(),
            # The kernel SIGKILLs the child when ingest dies, however it dies (the runner's shared helper).
            preexec_fn=preexec_die_with_parent(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        return _Child(proc, tmp, asyncio.ensure_future(_tail(proc.stderr)))

    async def _take(self) -> _Child:
        """The spare child if it is alive, else a new one; starts the next spare either way."""
        spare, self._spare = self._spare, None
        child = None
        if spare is not None:
            try:
                child = await spare
            except OSError:
                child = None
            if child is not None and child.proc.returncode is not None:
                await child.end()
                child = None
        if child is None:
            child = await self._start()
        if self.warm:
            self._spare = asyncio.ensure_future(self._start())
        return child

    def prestart(self) -> None:
        """Start the spare now, so the first deployment does not wait for an interpreter either."""
        if self.warm and self._spare is None:
            self._spare = asyncio.ensure_future(self._start())

    async def close(self) -> None:
        """Stop the spare child (ingest's shutdown); a job can still start a cold one after."""
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await (await spare).end()

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
                assert child.proc.stdin is not None
                job = {"package": str(path), "compile": compile, "checks": checks,
                       "out": str(Path(child.tmp.name) / "compiled.tar")}
                child.proc.stdin.write(json.dumps(job).encode() + b"\n")
                await child.proc.stdin.drain()
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


async def _line(proc: asyncio.subprocess.Process, stderr: asyncio.Future[bytes], timeout: float) -> dict[str, Any]:
    """The child's next JSON line; `_Timeout` past `timeout`, `_Died` (with how) when it ended without one."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):  # not wait_for: it may swallow a cancellation on 3.11
            raw = await proc.stdout.readline()
    except TimeoutError:
        raise _Timeout from None
    except ValueError:  # a line past the stream's limit: not the protocol
        raise _Died("the sandbox wrote an oversized line") from None
    if not raw:  # the child died without a word: a signal, the OOM killer, a hard crash
        code = await proc.wait()
        raise _Died(await _death(stderr, code))
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


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def _death(stderr: asyncio.Future[bytes], code: int) -> str:
    try:
        async with asyncio.timeout(5):
            tail = (await asyncio.shield(stderr)).decode(errors="replace").strip()[-_STDERR_TAIL:]
    except TimeoutError:
        tail = ""
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
                    "memory_bytes": max(_rss_bytes() - rss0, 0)}
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
    parser.add_argument("package", help="package archive to validate, or - to warm up and read the job from stdin")
    parser.add_argument("--memory", type=int, default=0, help="address-space limit in bytes (0: none)")
    parser.add_argument("--parent", type=int, default=0, help="pid of the ingest that started it (a label)")
    args = parser.parse_args(argv)
    return _child(args.package, args.memory)


if __name__ == "__main__":
    sys.exit(main())
