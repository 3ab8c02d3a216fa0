"""`make bench` / `make bench-quick`: run every scenario, print a summary, rewrite bench/RESULTS.md and the plots.

Run: python bench/run.py [--quick] [--only serving,churn] [--report-only]

Each scenario is its own script (bench/bench_*.py) run as a child with `--json bench/out/NAME.json`;
a scenario that fails or times out is reported as such and the others still run. Then the JSON
files become the generated part of bench/RESULTS.md (between its markers; the hand-run sections
below them are kept) and PNGs under bench/plots/. `--report-only` re-renders from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import render
from bench.report import goals_table, splice

OUT = HERE / "out"
PLOTS = HERE / "plots"

# name: (script, full arguments, quick arguments, timeout in s for full)
SCENARIOS: dict[str, tuple[str, list[str], list[str], int]] = {
    "serving": ("bench_serving.py", ["--seconds", "5"],
                ["--seconds", "2", "--models", "logreg", "--batches", "1,64", "--servers", "modelcd,mlserver,floor"],
                1500),
    "propagation": ("bench_propagation.py", ["--nodes", "1,2,3", "--n", "20"], ["--nodes", "1,2", "--n", "3"], 900),
    "churn": ("bench_churn.py", ["--phase", "20", "--rate", "300", "--large-mb", "200"], ["--phase", "6"], 900),
    "scale": ("bench_scale.py", ["--counts", "10,100,1000,10000", "--budget", "4GiB", "--ingest-n", "20",
                                 "--timeout", "900"],
              ["--counts", "10", "--budget", "128MiB", "--ingest-n", "3", "--timeout", "120"], 3600),
    "shadow": ("bench_shadow.py", ["--loads", "0.25", "--modes", "0,1,3", "--rounds", "4", "--heavy-trees", "0"],
               ["--seconds", "2", "--rounds", "2", "--loads", "0.25", "--heavy-trees", "0", "--step-seconds", "1"],
               900),
    "bus": ("bench_bus.py", ["--phase", "8"], ["--phase", "2"], 600),
    "retirement": ("bench_retirement.py", ["--reports", "20000"], ["--reports", "3000"], 600),
}

TITLES = {
    "serving": "1. Serving vs peers (bench/bench_serving.py)",
    "propagation": "2. Deploy propagation (bench/bench_propagation.py)",
    "churn": "3. Churn isolation (bench/bench_churn.py)",
    "scale": "4. Scale in models (bench/bench_scale.py)",
    "shadow": "5. Shadow overhead (bench/bench_shadow.py)",
    "bus": "6. Bus (bench/bench_bus.py, bench/bench_retirement.py)",
}


def run_scenario(name: str, quick: bool, python: str) -> dict[str, Any]:
    script, full, small, timeout = SCENARIOS[name]
    out = OUT / f"{name}.json"
    out.unlink(missing_ok=True)
    args = small if quick else full
    extra = ["--profile", str(OUT / "profile-serving.txt")] if name == "serving" else []
    cmd = [python, str(HERE / script), *args, *extra, "--json", str(out)]
    print(f"\n=== {name}: {' '.join(['python', f'bench/{script}', *args])}", flush=True)
    t0 = time.monotonic()
    log = OUT / f"{name}.log"
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout / (3 if quick else 1),
                                  cwd=ROOT, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    took = time.monotonic() - t0
    print(log.read_text()[-3000:], flush=True)
    status = {"name": name, "rc": rc, "seconds": took, "args": args}
    if rc != 0 or not out.exists():
        status["error"] = f"exit {rc}; last lines of bench/out/{name}.log:\n" + "\n".join(
            log.read_text().splitlines()[-8:])
    (OUT / f"{name}.status.json").write_text(json.dumps(status))
    return status


def load(name: str) -> dict[str, Any] | None:
    p = OUT / f"{name}.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    if isinstance(d.get("command"), str):
        d["command"] = d["command"].replace(str(ROOT) + "/", "")
    return d


def build_report(quick: bool, command: str, load_before: tuple[float, ...], load_after: tuple[float, ...],
                 elapsed: float) -> tuple[str, str]:
    """(generated RESULTS.md part, printed summary)."""
    from bench import plots

    PLOTS.mkdir(exist_ok=True)
    sections, goals = [], []
    meta: dict[str, Any] = {}
    for name in ("serving", "propagation", "churn", "scale", "shadow", "bus"):
        d = load(name)
        status_p = OUT / f"{name}.status.json"
        status = json.loads(status_p.read_text()) if status_p.exists() else {}
        body, g, pngs = "", [], []
        try:
            if name == "bus":
                ret = load("retirement")
                if d or ret:
                    body, g = render.section_bus(d or {}, ret)
                    pngs = plots.bus(d, PLOTS) if d else []
            elif d is not None:
                body, g = getattr(render, f"section_{name}")(d)
                pngs = getattr(plots, name)(d, PLOTS)
                if name == "serving" and d.get("profile") and Path(d["profile"]).exists():
                    from bench.report import collapsed_top

                    body += "\n\n" + render.section_profile(collapsed_top(Path(d["profile"]).read_text(), 40))
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            body = f"(could not render: {type(e).__name__}: {e})"
        if d:
            meta = meta or d.get("machine", {})
        cmd = f"    {d['command']}" if d else ""
        err = status.get("error")
        parts = [f"### {TITLES[name]}", ""]
        if cmd:
            parts += [cmd, f"    ({status.get('seconds', d.get('elapsed_s', 0) if d else 0):.0f} s)", ""]
        if err:
            parts += ["**This scenario did not finish:**", "", "```", err, "```", ""]
        if body:
            parts += [body, ""]
        parts += [f"![{name}](plots/{p})" for p in pngs]
        sections.append("\n".join(parts))
        goals += g
    meta["date"] = datetime.datetime.fromtimestamp(max((p.stat().st_mtime for p in OUT.glob("*.json")), default=time.time()),
                                                   datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = render.header(meta, command, load_before, load_after, elapsed)
    kind = "quick run (`make bench-quick`: shorter phases, fewer cases)" if quick else "full run (`make bench`)"
    text = "\n\n".join([f"## Latest {kind}", head, "### Goals", goals_table(goals), *sections])
    summary = goals_table(goals)
    return text, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (under 5 minutes in all)")
    ap.add_argument("--only", default="", help="comma list of scenarios (default: all)")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md and the plots from bench/out")
    ap.add_argument("--no-write", action="store_true", help="print the summary, leave RESULTS.md alone")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    t0 = time.monotonic()
    if not args.report_only:
        for name in names:
            run_scenario(name, args.quick, sys.executable)
    command = "make bench-quick" if args.quick else "make bench"
    if args.only:
        command = f"python bench/run.py {'--quick ' if args.quick else ''}--only {args.only}"
    run_meta = OUT / "run.json"
    if args.report_only and run_meta.exists():  # the header describes the run, not this re-rendering
        meta = json.loads(run_meta.read_text())
        command, load_before, elapsed, args.quick = (meta["command"], tuple(meta["load_before"]), meta["elapsed_s"],
                                                     meta["quick"])
        load_after = tuple(meta["load_after"])
    else:
        elapsed, load_after = time.monotonic() - t0, os.getloadavg()
        run_meta.write_text(json.dumps({"command": command, "load_before": load_before, "load_after": load_after,
                                        "elapsed_s": elapsed, "quick": args.quick}))
    text, summary = build_report(args.quick, command, load_before, load_after, elapsed)
    print("\n" + summary)
    if not args.no_write:
        path = HERE / "RESULTS.md"
        path.write_text(splice(path.read_text(), text))
        print(f"\nwrote {path.relative_to(ROOT)} and {PLOTS.relative_to(ROOT)}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
