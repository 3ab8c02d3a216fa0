"""The zygote and its workers driven directly (no node): what a worker inherits, and the spare workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from modelcd.serving.workers import Zygote

from ._serving import eventually, iris_package

LOADER = "modelcd.serving.worker_main:default_loader"


async def test_workers_fork_from_a_frozen_single_threaded_zygote(tmp_path: Path) -> None:
    """A worker inherits the zygote's heap frozen (its collector never walks those pages, so they stay shared)
    with its own collector on; the zygote starts no thread of its own (BLAS, OpenMP) in its warm-up."""
    zygote = Zygote(tmp_path / "workers")
    try:
        worker = await zygote.worker("gc:1")
        await worker.call("load", "gc:1", {"loader": "tests._models:gc_state_loader"},
                          payload=iris_package("gc", "1").data)
        _meta, out = await worker.call("predict", "gc:1", None, {"input": np.zeros((1, 4), dtype=np.float32)})
        assert int(out["frozen"][0]) > 10_000  # numpy, scikit-learn, skops: tens of thousands of objects
        assert int(out["enabled"][0]) == 1
        assert zygote._proc is not None
        pid = zygote._proc.pid
        threads = [Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task")
                   if int(t) != pid]
        # No thread but the main one: no BLAS/OpenMP pool, and not the jemalloc background thread pyarrow (imported
        # by scikit-learn's dataframe checks) starts at import unless told not to (zygote.clean_env).
        assert threads == [], threads
    finally:
        await zygote.close()


async def test_a_load_takes_the_spare_worker_and_a_new_spare_replaces_it(tmp_path: Path) -> None:
    """With one spare, a load gets the idle worker (already confined, in its own directory), a new spare is
    forked behind it, and a worker's directory is removed once it has ended; no process outlives close()."""
    zygote = Zygote(tmp_path / "workers", spares=1)
    try:
        await zygote.start()
        await eventually(lambda: zygote.idle == 1, what="a spare worker")
        spare = zygote._idle[0]
        worker = await zygote.worker("m:1")
        assert worker is spare and worker.name == "m:1" and zygote.taken == 1
        await eventually(lambda: zygote.idle == 1, what="a new spare worker")
        replacement = zygote._idle[0]
        assert replacement.pid != worker.pid and replacement.workdir != worker.workdir
        built = iris_package("m", "1")
        meta, _ = await worker.call("load", "m:1", {"loader": LOADER}, payload=built.data)
        assert meta["pid"] == worker.pid
        _meta, out = await worker.call("predict", "m:1", None, {"input": np.ones((2, 4), dtype=np.float32)})
        assert out["label"].shape == (2,)
        assert worker.workdir is not None and worker.workdir.is_dir()
        worker.kill("the test is done with it")
        await worker.closed
        await eventually(lambda: not worker.workdir.exists(), what="its directory removed")
    finally:
        await zygote.close()
    assert zygote.idle == 0
    await eventually(lambda: not Path(f"/proc/{replacement.pid}").exists()
                     or "Z" in Path(f"/proc/{replacement.pid}/stat").read_text().split()[2], what="the spare gone")


def test_a_worker_holds_no_descriptor_of_the_front_but_its_channel(tmp_path: Path) -> None:
    """The node's listening socket reached every model worker (uvloop, the node's loop, does not close inherited
    descriptors at spawn), so a model could accept the node's connections. Under uvloop, with a listening socket
    the front may pass down: the worker holds one socket, its channel."""
    import subprocess
    import sys

    script = f"""
import os, socket, uvloop
from pathlib import Path
from modelcd.serving.workers import Zygote

async def main():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    listening.set_inheritable(True)
    zygote = Zygote(Path({str(tmp_path / "workers")!r}))
    try:
        worker = await zygote.worker("m:1")
        try:  # answered: the worker runs (past what it closes after the fork)
            await worker.call("predict", "m:1", None, {{}})
        except Exception:
            pass
        links = [os.readlink(f"/proc/{{worker.pid}}/fd/{{fd}}") for fd in os.listdir(f"/proc/{{worker.pid}}/fd")]
        print(sum(link.startswith("socket:") for link in links))
    finally:
        await zygote.close()

uvloop.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1", out.stdout
