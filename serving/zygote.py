"""The zygote: a clean, single-threaded process that forks model workers for its node's front.

`python -m modelcd.serving.zygote CONFIG_JSON` is started by the front (workers.Zygote) with
an environment of its own (no `MODELCD_*` but the supervisor's run mark, no cloud credentials:
see `clean_env`), imports
numpy and the serving runtimes once, warms the scikit-learn load path up on a model built from
constants (`_warm_up`), and then forks one worker per request in a few milliseconds; the workers
share those pages copy-on-write. Invariants:

- the zygote runs no model code and starts no thread (the BLAS/OpenMP thread pools are
  sized 1 before numpy loads, pyarrow's jemalloc background thread is off), so `fork` is safe;
- its heap is built with the collector off and frozen (`gc.freeze`) before every fork: a
  worker's collector never walks the inherited objects, which would write into each one's GC
  header and copy every page of the shared heap into the worker (measured: 62 MiB private per
  worker without the freeze, 7 with it); the worker turns its own collector on;
- it keeps no descriptor of the front's but its control socket (0-2 aside): not the node's
  listening socket, whatever the event loop that spawned it let through;
- it dies with its front (parent-death signal), and when the front closes the control
  socket it kills every worker's process group and exits: no worker outlives its node;
- it reaps its children and reports each one's exit status (`{"op": "exit", "pid", "status"}`),
  which is how the front tells a segfault from an exit or a kill.

Control socket (AF_UNIX SOCK_SEQPACKET), one JSON object per message:
front → zygote `{"op": "spawn", "id", "spec"}` with the worker's channel fd attached;
zygote → front `{"op": "ready"}`, `{"op": "spawned", "id", "pid"}`, `{"op": "exit", "pid", "status"}`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys

from modelcd.runner import kill_and_reap, reap_exited, zygote_send

# Preloaded before the first fork: what every worker imports (scikit-learn is most of a load's time).
PRELOAD = ("numpy", "modelcd.store.package", "modelcd.runtimes.flavors", "sklearn.tree", "skops.io")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
# MODELCD_UP_RUN is no secret: it is how `modelcd up` finds what is left of its run after a crash.
KEEP_VARS = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV",
             "MODELCD_UP_RUN")


def clean_env(threads: int) -> dict[str, str]:
    """What a worker may see of the node's environment: locale and path, and nothing secret."""
    env = {k: os.environ[k] for k in KEEP_VARS if k in os.environ}
    for k in THREAD_VARS:
        env[k] = str(max(1, threads))
    # pyarrow (which scikit-learn imports) starts its jemalloc's background thread at import: off, so the
    # zygote stays single-threaded and forking it is safe.
    env["JE_ARROW_MALLOC_CONF"] = "background_thread:false"
    env["PYTHONNOUSERSITE"] = "1"
    return env



def _max_fd() -> int:
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    sys.path[:0] = [p for p in config["path"] if p not in sys.path]
    ctl = socket.socket(fileno=int(config["fd"]))
    # Nothing of the front's but the control socket: an event loop that does not close inherited descriptors
    # at spawn (uvloop's) handed the node's listening socket down to every worker, where a model could accept
    # the node's connections.
    os.closerange(3, ctl.fileno())
    os.closerange(ctl.fileno() + 1, _max_fd())
    from .worker_main import _prctl, child

    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the front
    if os.getppid() != int(config["parent"]):
        return 0  # the front died before the line above took effect
    # No collection while the preloaded heap is built: a collection frees objects in the middle of it, and the
    # holes it leaves are filled later by each worker's own objects, copying the pages around them.
    gc.disable()
    for module in config.get("preload", PRELOAD):
        with contextlib.suppress(ImportError):
            __import__(module)
    if config.get("warm_up", True):
        try:
            _warm_up()
        except Exception as exc:  # a library missing or changed: workers only pay the first load themselves
            sys.stderr.write(f"model-worker zygote: warm-up skipped: {exc!r}\n")
    gc.freeze()
    rpipe, wpipe = os.pipe()
    os.set_blocking(wpipe, False)
    signal.set_wakeup_fd(wpipe)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the front, which stops us in order
    children: set[int] = set()
    zygote_send(ctl, {"op": "ready", "pid": os.getpid()})
    try:
        while True:
            readable, _, _ = select.select([ctl, rpipe], [], [])
            if rpipe in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(rpipe, 4096)
                reap_exited(ctl, children)
            if ctl in readable:
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, 4)
                except OSError:
                    return 0
                if not msg:
                    return 0  # the front closed the control socket: stop every worker (finally)
                doc = json.loads(msg)
                if doc.get("op") != "spawn" or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    continue
                # Everything alive now is the workers' shared heap: in the permanent generation their collector
                # never walks (a walk writes into every object's GC header, copying each page on write).
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    gc.enable()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    os.close(rpipe)
                    os.close(wpipe)
                    ctl.close()
                    child(socket.socket(fileno=fds[0]), doc["spec"])
                os.close(fds[0])
                children.add(pid)
                zygote_send(ctl, {"op": "spawned", "id": doc["id"], "pid": pid})
    finally:
        kill_and_reap(children)


def _warm_up() -> None:
    """Load and run a tiny scikit-learn model the way a worker does, so that what the first load initializes
    lazily (skops' and scikit-learn's caches, numpy's dispatch, the runtime's code paths) is built once here and
    shared, instead of in every worker (measured: a third of a small model's load time). The model is built here
    from constants, not read from a package: no model code runs in the zygote, and no thread starts."""
    import numpy as np
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    from modelcd.runtimes.flavors import create_runtime, outputs_match
    from modelcd.store.package import TensorSpec

    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    model = LogisticRegression()
    model.coef_, model.intercept_ = np.array([[1.0, -1.0]]), np.zeros(1)
    model.classes_, model.n_features_in_ = np.array([0, 1]), 2
    runtime = create_runtime("sklearn", sio.dumps(model), model_file="warm-up.skops",
                             inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 2])])
    outputs_match(runtime.predict({"input": x}), runtime.predict({"input": x}), 0.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
