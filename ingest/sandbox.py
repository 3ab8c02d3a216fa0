"""Serving validation in a separate process: load the package with the serving runtimes, predict on
its sample data, compare with the expected outputs, and measure what it costs.

The parent (`Sandbox.validate`) runs `python -m modelcd.ingest.sandbox -` and reads JSON lines
from its stdout. The next child is started as soon as one is taken, so it has already paid for
the interpreter and the imports of numpy, the serving runtimes and scikit-learn/ONNX Runtime
(about a second) when the next deployment arrives; it says `{"phase": "warm"}` and then waits
for the package path on its stdin (EOF, when ingest exits, ends it). Each child validates one
package and exits: nothing a model did survives into the next validation. The child:

1. limits its own address space to MODELCD_VALIDATION_MEMORY (`RLIMIT_AS`), before anything else;
2. imports the runtime library the package needs, then reports `{"phase": "ready"}`: from that
   line on the parent's clock (MODELCD_VALIDATION_TIMEOUT) runs, so interpreter start-up and
   library imports on a busy host never count against the model;
3. loads the model (`load_runtime`, the serving code), predicts on the samples, compares with
   `outputs_match`, times repeated predictions, and reports `{"phase": "result", ...}`.

A model that hangs is killed (SIGKILL to its process group) at the deadline; one that exceeds the
memory limit gets MemoryError or dies; one that crashes the interpreter dies with a signal. Each is
a `ServingValidationFailed` with the reason. A package with a fallback runtime (a compiled sklearn
model keeps the original) has the fallback checked too, since a node may serve it.
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

from .errors import ServingValidationFailed

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


@dataclass(slots=True)
class Sandbox:
    """Runs serving validation in a child process with a time and an address-space limit."""

    timeout_s: float
    memory_bytes: int
    python: str = sys.executable
    warm: bool = True  # keep the next child started: validation without the interpreter's start-up
    _spare: asyncio.Task[_Child] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> Sandbox:
        return cls(timeout_s=settings.validation_timeout, memory_bytes=settings.validation_memory,
                   warm=settings.validation_warm)

    async def _start(self) -> _Child:
        tmp = tempfile.TemporaryDirectory(prefix="modelcd-sandbox-")
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "modelcd.ingest.sandbox", "-", "--memory", str(self.memory_bytes),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=tmp.name, start_new_session=True,  # its own process group: a kill takes its threads and children
        )
        assert proc.stdout is not None and proc.stderr is not None
        return _Child(proc, tmp, asyncio.ensure_future(proc.stderr.read()))

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
        """Stop the spare child (ingest's shutdown); validation can still start a cold one after."""
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await (await spare).end()

    async def validate(self, package: bytes) -> SandboxReport:
        """Validate a package archive; raises `ServingValidationFailed` with the reason."""
        child = await self._take()
        try:
            path = Path(child.tmp.name) / "package.tar"
            await asyncio.to_thread(path.write_bytes, package)
            warm = await self._line(child.proc, child.stderr, _STARTUP_DEADLINE_S, "start")
            if warm.get("phase") != "warm":
                raise ServingValidationFailed(f"the sandbox answered out of turn: {warm}")
            assert child.proc.stdin is not None
            child.proc.stdin.write(f"{path}\n".encode())
            await child.proc.stdin.drain()
            return await self._converse(child.proc, child.stderr)
        finally:
            await child.end()

    async def _converse(self, proc: asyncio.subprocess.Process, stderr: asyncio.Future[bytes]) -> SandboxReport:
        ready = await self._line(proc, stderr, _STARTUP_DEADLINE_S, "start")
        if ready.get("phase") != "ready":
            return self._verdict(ready)
        deadline = self.timeout_s
        try:
            result = await self._line(proc, stderr, deadline, "load and predict")
        except _Timeout:
            _kill(proc)
            await proc.wait()
            raise ServingValidationFailed(
                f"killed after {deadline:g} s: loading the model and predicting on its samples did not finish "
                "within MODELCD_VALIDATION_TIMEOUT") from None
        return self._verdict(result)

    async def _line(self, proc: asyncio.subprocess.Process, stderr: asyncio.Future[bytes], timeout: float,
                    what: str) -> dict[str, Any]:
        assert proc.stdout is not None
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError:
            if what == "start":
                raise ServingValidationFailed(f"the sandbox did not start within {timeout:g} s") from None
            raise _Timeout from None
        if not raw:  # the child died without a word: a signal, the OOM killer, a hard crash
            code = await proc.wait()
            raise ServingValidationFailed(await _death(stderr, code))
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ServingValidationFailed(f"the sandbox wrote garbage: {raw[:200]!r}") from None
        return doc if isinstance(doc, dict) else {}

    @staticmethod
    def _verdict(doc: dict[str, Any]) -> SandboxReport:
        if doc.get("phase") != "result":
            raise ServingValidationFailed(f"the sandbox answered out of turn: {doc}")
        if not doc.get("ok"):
            raise ServingValidationFailed(str(doc.get("reason") or "serving validation failed"))
        return SandboxReport(runtime=doc["runtime"], samples=int(doc["samples"]), load_ms=float(doc["load_ms"]),
                             predict_us=float(doc["predict_us"]), memory_bytes=int(doc["memory_bytes"]),
                             fallback_runtime=doc.get("fallback_runtime"))


class _Timeout(Exception):
    pass


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def _death(stderr: asyncio.Future[bytes], code: int) -> str:
    try:
        tail = (await asyncio.wait_for(asyncio.shield(stderr), 5)).decode(errors="replace").strip()[-_STDERR_TAIL:]
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


def _say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


_LIBRARIES = {"sklearn": ("sklearn", "skops.io"), "onnx": ("onnxruntime",), "xgboost": ("xgboost",),
              "lightgbm": ("lightgbm",)}


def _child(path: str, memory: int) -> int:
    """Validate the package at `path`; "-": warm up first, then read the path from stdin."""
    import resource

    if memory > 0:
        # Address space, not RSS: the only limit an unprivileged process can set on itself that the
        # kernel enforces; an allocation past it fails (MemoryError) instead of swapping the host.
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    import importlib

    from modelcd.runtimes.flavors import ModelRuntimeError, load_runtime, outputs_match
    from modelcd.store.package import PackageError, read_package

    if path == "-":
        # The libraries nearly every package needs (scikit-learn, and ONNX Runtime it compiles to);
        # XGBoost and LightGBM are imported below when a package asks for them.
        for lib in (*_LIBRARIES["sklearn"], *_LIBRARIES["onnx"]):
            with contextlib.suppress(ImportError):
                importlib.import_module(lib)
        _say({"phase": "warm"})
        path = sys.stdin.readline().strip()
        if not path:
            return 0  # ingest went away before giving us a package
    try:
        pkg = read_package(Path(path).read_bytes())
    except PackageError as exc:
        _say({"phase": "result", "ok": False, "reason": f"invalid package: {exc.reason}"})
        return 0
    m = pkg.manifest
    for runtime in filter(None, (m.runtime, m.fallback_runtime)):
        for lib in _LIBRARIES.get(runtime, ()):
            with contextlib.suppress(ImportError):  # a missing library is reported by load_runtime
                importlib.import_module(lib)
    samples = pkg.samples()
    n = len(next(iter(samples.inputs.values())))
    _say({"phase": "ready"})

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
                                     description="Serving validation of one package (run by ingest).")
    parser.add_argument("package", help="package archive to validate, or - to warm up and read its path from stdin")
    parser.add_argument("--memory", type=int, default=0, help="address-space limit in bytes (0: none)")
    args = parser.parse_args(argv)
    return _child(args.package, args.memory)


if __name__ == "__main__":
    sys.exit(main())
