"""Inside a model worker: confine the process, then load and run models for the front, one call at a time.

This module runs in a child forked by the zygote (serving/zygote.py); it is the only
place of a node where model code executes. Invariants:

- the worker is confined before it reads any frame: its own session (so the front can
  kill it and whatever it spawned with one `killpg`), SIGKILL when its parent dies,
  no core dumps, `RLIMIT_AS` (MODELCD_WORKER_MEMORY), a lower CPU priority
  (MODELCD_WORKER_NICE) so the front process wins the CPU from a spinning model, a private
  working directory (also HOME and TMPDIR), `no_new_privs`, no capabilities (even when the
  node runs as root), Landlock allowing writes only
  there (and to /dev), and a seccomp filter refusing fork/exec (MODELCD_WORKER_SPAWN);
  the environment is the zygote's, which holds no secret of the node (zygote.clean_env);
- calls are answered in the order they arrive (one thread): the front knows that the
  oldest unanswered call is the one running, which is how it tells a stuck worker
  from a busy one; predictions of one model already waiting together run as one call
  when the model proved row-independent at load (batching.py);
- a model's Python exception is an `err` answer (kind `invalid` for the request's
  fault, `predict` for the model's); only a native crash, `os._exit` or a kill ends the
  worker, and the front sees it as the end of the channel.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import batching
from .channel import PREFIX, FrameError, decode, encode

if TYPE_CHECKING:
    from modelcd.store.package import Package

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int, arg3: Any = 0) -> int:
    try:
        return int(_libc.prctl(option, value, arg3, 0, 0))
    except (OSError, AttributeError):  # not Linux: the other limits still apply
        return -1


def confine(spec: dict[str, Any]) -> list[str]:
    """Apply the worker's limits to this process (see the module docstring); returns what was not available."""
    missing = []
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = str(workdir)
    memory = int(spec.get("memory") or 0)
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    nice = int(spec.get("nice") or 0)
    if nice > 0:
        os.nice(nice)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if not drop_capabilities():
        missing.append("capabilities")
    if not landlock_writes(workdir):
        missing.append("landlock")
    if not spec.get("spawn", False) and not forbid_spawn():
        missing.append("seccomp")
    return missing


# ------------------------------------------------------------------ capabilities: none, even as root

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> bool:
    """Empty every capability set: a worker started by root cannot bypass file permissions or read the
    memory and environment of other processes (the front makes itself non-dumpable, see workers.Zygote)."""
    _prctl(47, 4)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    try:
        return int(_libc.capset(ctypes.byref(header), data)) == 0
    except AttributeError:
        return False


# ------------------------------------------------------------------ Landlock: writes only in the workdir

_LL_CREATE, _LL_ADD, _LL_RESTRICT = 444, 445, 446  # the same numbers on x86_64 and aarch64
_LL_WRITE_FILE, _LL_TRUNCATE = 1 << 1, 1 << 14
_LL_ABI1_WRITES = (1 << 1) | sum(1 << b for b in range(4, 13))  # write, remove, make char/dir/reg/sock/fifo/block/sym


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_writes(workdir: Path) -> bool:
    """Forbid creating, writing, renaming or deleting files anywhere but under `workdir` (and /dev).

    Reads stay allowed (the interpreter, libraries, the model's own package). False when the
    kernel has no Landlock.
    """
    abi = _libc.syscall(_LL_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False
    handled = _LL_ABI1_WRITES | (1 << 13 if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(handled)
    fd = _libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if fd < 0:
        return False
    try:
        for path, access in ((workdir, handled), (Path("/dev"), _LL_WRITE_FILE | (handled & _LL_TRUNCATE))):
            dfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(access, dfd)
                if _libc.syscall(_LL_ADD, fd, 1, ctypes.byref(rule), 0) != 0:
                    return False
            finally:
                os.close(dfd)
        return int(_libc.syscall(_LL_RESTRICT, fd, 0)) == 0
    finally:
        os.close(fd)


# ------------------------------------------------------------------ seccomp: no new processes

class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# (audit arch, clone, clone3, [fork, vfork, execve, execveat])
_ARCHES = {"x86_64": (0xC000003E, 56, 435, [57, 58, 59, 322]), "aarch64": (0xC00000B7, 220, 435, [221, 281])}
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38


def forbid_spawn() -> bool:
    """A seccomp filter: fork, vfork, execve and process-creating clone fail with EPERM; threads still start.

    clone3 answers ENOSYS (its flags are in memory a filter cannot read), so the C library
    falls back to clone, whose flags it can. False on an architecture it does not know.
    """
    arch = _ARCHES.get(os.uname().machine)
    if arch is None:
        return False
    audit, clone, clone3, denied = arch
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, errno_ret = 0x7FFF0000, 0x00050000
    # (code, k, jump-if-true label, jump-if-false label); labels resolve to relative offsets below.
    code: list[tuple[int, int, str | None, str | None]] = [(ld, 4, None, None), (jeq, audit, None, "allow"),
                                                            (ld, 0, None, None)]
    code += [(jeq, nr, "eperm", None) for nr in denied]
    code += [(jeq, clone3, "enosys", None), (jeq, clone, None, "allow"),
             (ld, 16, None, None),  # clone's flags: args[0], low 32 bits
             (jset, _CLONE_THREAD, "allow", "eperm")]
    labels = {"allow": len(code), "eperm": len(code) + 1, "enosys": len(code) + 2}
    tail = [(ret, allow), (ret, errno_ret | _EPERM), (ret, errno_ret | _ENOSYS)]
    prog = [(c, (labels[t] - i - 1) if t else 0, (labels[f] - i - 1) if f else 0, k)
            for i, (c, k, t, f) in enumerate(code)]
    prog += [(c, 0, 0, k) for c, k in tail]
    arr = (_SockFilter * len(prog))(*[_SockFilter(*p) for p in prog])
    fprog = _SockFprog(len(prog), arr)
    return _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog)) == 0


def default_loader(pkg: Package) -> Any:
    """The package's runtime (runtimes.flavors). Lives here, not in the registry, because workers import a
    loader by name: importing it must cost nothing the zygote did not preload (the registry's module pulls in
    the front's whole stack, Kafka client included: ~100 ms and several MiB of private memory per worker)."""
    from modelcd.runtimes.flavors import load_runtime

    return load_runtime(pkg.manifest, pkg.contents)


def resolve(spec: str) -> Any:
    """'package.module:function' -> the function (the front checked it resolves to its loader)."""
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load(pkg: Any, loader: str) -> tuple[Any, bool]:
    """The runtime, and whether its rows are independent on the package's samples (so it may batch)."""
    from modelcd.runtimes.flavors import outputs_match

    runtime = resolve(loader)(pkg)
    samples = pkg.samples()
    rows = batching.rows_of(samples.inputs)
    if rows is None or rows < 2:
        return runtime, False
    whole = runtime.predict(samples.inputs)
    parts = batching.split(whole, [1] * rows)
    if parts is None:
        return runtime, False
    for i, part in enumerate(parts):
        alone = runtime.predict({k: v[i:i + 1] for k, v in samples.inputs.items()})
        if outputs_match(part, alone, pkg.manifest.tolerance) is not None:
            return runtime, False
    return runtime, True


class _Worker:
    """The loop's state: loaded models and what to send back."""

    def __init__(self, sock: socket.socket, batch: bool) -> None:
        from modelcd.runtimes.flavors import InvalidInputError

        self.sock = sock
        self.batch = batch
        self.models: dict[str, Any] = {}
        self.batchable: dict[str, bool] = {}
        self.out: list[bytes | memoryview] = []
        self.invalid = InvalidInputError

    def flush(self) -> None:
        if self.out:
            data, self.out = b"".join(self.out), []
            self.sock.sendall(data)

    def answer(self, ident: int, key: str, fn: Any) -> None:
        """Run `fn` and queue its answer; a model's exception is an `err` answer."""
        try:
            meta, arrays = fn()
            self.out += encode("ok", ident, key, meta, arrays)
        except self.invalid as exc:
            self.out += encode("err", ident, key, ["invalid", str(exc)])
        except MemoryError:
            self.out += encode("err", ident, key, ["predict", "MemoryError: the model exceeded its worker's memory "
                                                   "limit (MODELCD_WORKER_MEMORY)"])
        except Exception as exc:  # the model's own error: answered, the worker goes on
            self.out += encode("err", ident, key, ["predict", _reason(exc)])

    def predict(self, key: str, items: list[tuple[int, Any]]) -> None:
        runtime = self.models.get(key)
        if runtime is None:
            for ident, _ in items:
                self.out += encode("err", ident, key, ["unavailable", f"model {key} is not loaded in its worker"])
            return
        if len(items) > 1 and self.batchable.get(key):
            merged = batching.merge([arrays for _, arrays in items])
            if merged is not None:
                try:
                    parts = batching.split(runtime.predict(merged[0]), merged[1])
                except Exception:
                    parts = None  # one request's fault, maybe: answer each on its own below
                if parts is not None:
                    for (ident, _), part in zip(items, parts, strict=True):
                        self.out += encode("ok", ident, key, None, part)
                    return
        for ident, arrays in items:
            self.answer(ident, key, lambda a=arrays: (None, runtime.predict(a)))

    def other(self, op: str, ident: int, key: str, meta: Any, rest: memoryview) -> None:
        from modelcd.store.package import read_package

        if op == "load":
            def load() -> tuple[Any, None]:
                runtime, independent = _load(read_package(bytes(rest)), meta["loader"])
                self.models[key] = runtime
                self.batchable[key] = independent and self.batch
                return {"pid": os.getpid(), "batch": self.batchable[key]}, None

            self.answer(ident, key, load)
        elif op == "unload":
            runtime = self.models.pop(key, None)
            if runtime is not None and hasattr(runtime, "close"):
                runtime.close()
            self.out += encode("ok", ident, key)
        else:  # ping
            self.out += encode("ok", ident, key, {"pid": os.getpid()})


def serve(sock: socket.socket, spec: dict[str, Any]) -> int:
    """The worker's loop: read every frame waiting, answer them in order; returns when the front closes."""
    missing = confine(spec)
    if missing:
        sys.stderr.write(f"model worker {os.getpid()}: not available on this host: {', '.join(missing)}\n")
    import modelcd.runtimes.flavors  # noqa: F401 -- before the first frame, not inside a prediction's time

    sock.setblocking(True)
    worker = _Worker(sock, bool(spec.get("batch", True)))
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return 0  # the front closed the channel: stop
        buf += chunk
        while True:  # everything already waiting, without blocking
            try:
                more = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not more:
                break
            buf += more
        frames = []
        start = 0
        while len(buf) - start >= 8:
            hlen, plen = PREFIX.unpack_from(buf, start)
            end = start + 8 + hlen + plen
            if end > len(buf):
                break
            view = memoryview(bytes(buf[start + 8:end]))
            try:
                frames.append(decode(view[:hlen], view[hlen:]))
            except FrameError:
                return 3
            start = end
        del buf[:start]
        # In order; consecutive predictions of one model run as one call when they stack.
        i = 0
        while i < len(frames):
            op, ident, key, meta, arrays, rest = frames[i]
            if op != "predict":
                worker.other(op, ident, key, meta, rest)
                i += 1
                continue
            j = i
            while j < len(frames) and frames[j][0] == "predict" and frames[j][2] == key:
                j += 1
            worker.predict(key, [(f[1], f[4]) for f in frames[i:j]])
            i = j
        worker.flush()


def child(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Entry point in the forked child: never returns into the zygote's code."""
    code = 1
    try:
        code = serve(sock, spec)
    except BaseException as exc:  # noqa: BLE001 -- a broken channel or a failed confinement: say why, exit
        try:
            sys.stderr.write(f"model worker {os.getpid()}: {exc!r}\n")
            sys.stderr.flush()
        except Exception:
            pass
    finally:
        os._exit(code)
