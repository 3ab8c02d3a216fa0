"""`python -m modelcd.child KIND --name NAME --ready-fd N`: one component of `modelcd up` as a child.

`modelcd up` (modelcd/up.py) starts each service (ingest, serving nodes, the stream processors)
through this entry point, with every setting passed down as `MODELCD_*` variables. The child
writes `ready` on the pipe it was handed once it serves, drains on SIGTERM, and ends with
`os._exit` so a thread stuck in model code cannot hold the process open at exit (the
supervisor SIGKILLs its group at the deadline anyway). Batch services (`BATCH_KINDS`) run at
MODELCD_BATCH_NICE, so on one machine the serving nodes win the CPU from a deployment's work.

Test-only hooks (never set them in production; tests/test_up.py uses them):
- `MODELCD_TEST_CRASH=NAME@FILE`: the component NAME, once ready, calls `os.abort()` (SIGABRT,
  like a native crash) if FILE does not exist yet: it crashes once. First it starts a grandchild
  in a session of its own (as a sandbox is) that would sleep for ten minutes, and writes
  `{"pid": its pid, "orphan": the grandchild's pid}` to FILE.
- `MODELCD_TEST_STUCK=NAME`: the component NAME ignores SIGTERM and SIGINT, as a process stuck in
  native code would, so only the supervisor's SIGKILL at the deadline ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from modelcd.logs import configure
from modelcd.runner import die_with_parent, run_main
from modelcd.settings import Settings, SettingsError

ServiceFn = Callable[..., Awaitable[None]]


def services(settings: Settings) -> dict[str, tuple[ServiceFn, dict[str, Any]]]:
    """KIND -> (run function, extra kwargs): what each component runs, wired as `modelcd up` wires it."""
    from modelcd.fleet.frontdoor import run_frontdoor
    from modelcd.ingest.service import run_ingest
    from modelcd.retirement.service import run_retirement
    from modelcd.rollout.service import run_controller
    from modelcd.serving.node import run_node
    from modelcd.shadow.comparison import run_comparison
    from modelcd.wiring import api_routes, node_shadow

    return {
        "ingest": (run_ingest, {"routes": api_routes(settings)}),
        "serving": (run_node, {"shadow": node_shadow()}),
        "frontdoor": (run_frontdoor, {}),
        "shadow-comparison": (run_comparison, {}),
        "rollout-controller": (run_controller, {}),
        "retirement": (run_retirement, {}),
    }


KINDS = ("ingest", "serving", "frontdoor", "shadow-comparison", "rollout-controller", "retirement")
# Batch work: what may wait while a prediction is answered on the same machine (serving and the front
# door are the latency path).
BATCH_KINDS = frozenset({"ingest", "shadow-comparison", "rollout-controller", "retirement"})


def yield_to_serving(kind: str, settings: Settings) -> int:
    """Lower this process's CPU priority by MODELCD_BATCH_NICE if `kind` is batch work; returns the niceness."""
    if kind in BATCH_KINDS and settings.batch_nice > 0:
        return os.nice(settings.batch_nice)  # inherited by what it starts (ingest's sandboxes)
    return os.nice(0)


def _test_hooks(name: str, environ: dict[str, str]) -> tuple[Path | None, bool]:
    crash = environ.get("MODELCD_TEST_CRASH", "")
    crash_file = None
    if crash.partition("@")[0] == name and crash.partition("@")[2]:
        crash_file = Path(crash.partition("@")[2])
    return crash_file, environ.get("MODELCD_TEST_STUCK") == name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelcd.child", description=__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--name", help="component name in logs (default: KIND)")
    parser.add_argument("--ready-fd", type=int, help="pipe to write `ready` on once the service serves")
    args = parser.parse_args(argv)
    name = args.name or args.kind
    die_with_parent()  # already set by the supervisor's preexec_fn; again in case of another launcher
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"modelcd {name}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    structlog.contextvars.bind_contextvars(component=name)
    yield_to_serving(args.kind, settings)
    crash_file, stuck = _test_hooks(name, dict(os.environ))
    fn, kwargs = services(settings)[args.kind]

    async def run(stop: asyncio.Event) -> int:
        if stuck:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        ready = asyncio.Event()
        task = asyncio.ensure_future(fn(settings, stop=stop, ready=ready, **kwargs))
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if ready.is_set():
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)
            if crash_file is not None and not crash_file.exists():
                orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                          start_new_session=True)
                crash_file.write_text(json.dumps({"pid": os.getpid(), "orphan": orphan.pid}))
                os.abort()
        try:
            await task
        except OSError as exc:
            print(f"modelcd {name}: {exc}", file=sys.stderr)
            return 2
        return 0

    try:
        code = run_main(run)
    except BaseException:  # the service failed: say why, then exit without joining stuck threads
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no join of a thread stuck in model code


if __name__ == "__main__":
    main()
