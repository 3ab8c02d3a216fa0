"""The scenarios' JSON (bench/out/*.json) as RESULTS.md sections and goal verdicts. Pure: no I/O.

Each `section_*` takes one scenario's JSON and returns (markdown, goals). A missing or failed
scenario renders as a line saying so, never as an empty table. `tests/test_bench_report.py`
renders every section from made-up figures.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.report import fmt, goal, quantile, ratio, table

GiB = 2**30
MiB = 2**20


def _med(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def section_serving(d: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows, goals = [], []
    res = d["results"]
    by = {(r["server"], r["model"], r["batch"]): r for r in res}
    combos = sorted({(r["model"], r["batch"]) for r in res}, key=lambda c: (c[0], c[1]))
    servers = [s for s in ("modelcd", "frontdoor", "mlserver", "kserve", "floor") if any(r["server"] == s for r in res)]
    for model, batch in combos:
        base = by.get(("modelcd", model, batch))
        for s in servers:
            r = by.get((s, model, batch))
            if r is None:
                continue
            failed = r["saturation"]["failed"] + r["at25"]["failed"] + r["at50"]["failed"]
            rows.append((model, batch, s, r["saturation"]["rps"],
                         f"{ratio(base['saturation']['rps'], r['saturation']['rps']):.2f}x" if base else "-",
                         r["at25"]["offered"], r["at25"]["p50"], r["at25"]["p99"], r["at50"]["offered"],
                         r["at50"]["p50"], r["at50"]["p99"], failed))
    text = [table(["model", "rows/request", "server", "saturation (req/s)", "modelcd / this", "25 %: offered",
                   "p50 ms", "p99 ms", "50 %: offered", "p50 ms", "p99 ms", "failed"], rows)]
    # Goals: the worst combination decides.
    vs_ml, p99_ml, vs_floor = [], [], []
    for model, batch in combos:
        m, ml, fl = by.get(("modelcd", model, batch)), by.get(("mlserver", model, batch)), by.get(("floor", model, batch))
        if m and ml:
            vs_ml.append((ratio(m["saturation"]["rps"], ml["saturation"]["rps"]), f"{model} x{batch}"))
            p99_ml.append((max(ratio(m["at25"]["p99"], ml["at25"]["p99"]), ratio(m["at50"]["p99"], ml["at50"]["p99"])),
                           f"{model} x{batch}"))
        if m and fl:
            vs_floor.append((ratio(fl["saturation"]["rps"], m["saturation"]["rps"]), f"{model} x{batch}"))
    if vs_ml:
        worst = min(vs_ml)
        goals.append(goal("throughput vs MLServer (worst model/batch)", worst[0], 5.0, higher_is_better=True,
                          unit="x", source=f"serving, {worst[1]}"))
        worst_p = max(p99_ml)
        goals.append(goal("p99 vs MLServer at 25 %/50 % load (worst; < 1 = lower)", worst_p[0], 1.0,
                          higher_is_better=False, unit="x", source=f"serving, {worst_p[1]}"))
    if vs_floor:
        worst = max(vs_floor)
        goals.append(goal("per-request cost vs the floor (worst)", worst[0], 1.3, higher_is_better=False, unit="x",
                          source=f"serving, {worst[1]}"))
    text.append("")
    text.append("modelcd / this > 1 means modelcd answers more. "
                + "; ".join(f"modelcd vs MLServer {c}: {v:.1f}x throughput" for v, c in vs_ml))
    return "\n".join(text), goals


def section_propagation(d: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for r in d["results"]:
        s = r["steps"]
        rows.append((r["nodes"], r["n"], r["total"]["median"] * 1000, r["total"]["p95"] * 1000,
                     r["first_node"]["median"] * 1000, r["queue_api"]["median"] * 1000,
                     s.get("validate", 0) * 1000, s.get("compile", 0) * 1000, s.get("serving-validation", 0) * 1000,
                     s.get("publish", 0) * 1000, r["to_nodes"]["median"] * 1000, r["to_nodes"]["p95"] * 1000))
    text = table(["nodes", "n", "request → every node: median ms", "p95 ms", "→ first node median ms",
                  "queue+api ms", "validate ms", "compile ms", "serving-validation ms", "publish ms",
                  "completed → every node: median ms", "p95 ms"], rows)
    worst = max((r["total"]["median"] for r in d["results"]), default=math.nan)
    goals = [goal("propagation median to every node (worst node count)", worst, 0.5, higher_is_better=False, unit="s",
                  source="propagation")]
    nodes_part = max((r["to_nodes"]["median"] for r in d["results"]), default=math.nan)
    text += ("\n\nAnchor: TF Serving's file-system poll (1 s by default) alone adds 0.5 s on average before it "
             f"starts loading. Here the part after ingest (ModelState → every node loaded) has a median of at most "
             f"{nodes_part * 1000:.0f} ms; the rest is ingest's pipeline (each step is in the table).")
    return text, goals


def churn_ratios(d: dict[str, Any]) -> dict[str, float]:
    phases = d["phases"]
    quiet = _med([p["p99"] for p in phases if p["phase"] == "quiet"])
    churn = _med([p["p99"] for p in phases if p["phase"] == "churn"])
    large = _med([p["p99"] for p in phases if p["phase"] == "large"])
    return {"quiet": quiet, "churn": churn, "large": large, "churn_ratio": ratio(churn, quiet),
            "large_ratio": ratio(large, quiet)}


def section_churn(d: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows = [(p["phase"], f"{p['start']:.0f}–{p['end']:.0f}", p["n"], p["rps"], p["p50"], p["p99"], p["failed"])
            for p in d["phases"]]
    r = churn_ratios(d)
    text = [table(["phase", "seconds", "requests", "req/s sent", "p50 ms", "p99 ms", "failed"], rows), ""]
    text.append(f"Offered {fmt(d['rate'])} req/s on the hot model throughout. p99 churn / quiet = "
                f"{fmt(r['churn_ratio'])} (median of the phases' p99s: {fmt(r['churn'])} vs {fmt(r['quiet'])} ms); "
                f"{d.get('churn_deployed', 0)} deployments requested during the churn phases, "
                f"{d.get('churn_completed', 0)} completed by the end of the run.")
    goals = [goal("churn p99 ratio (1 deployment/s vs none)", r["churn_ratio"], 1.1, higher_is_better=False, unit="x",
                  source="churn")]
    large = d.get("large") or {}
    if d.get("large_mb"):
        how = (f"deployed and serving after {large.get('seconds', math.nan):.0f} s" if large.get("ok")
               else f"did not finish: {large.get('error', '?')}")
        text.append(f"Large model: a random forest package of {d['large_mb']:.0f} MB, {how}; p99 during it / quiet = "
                    f"{fmt(r['large_ratio'])}.")
        goals.append(goal(f"p99 ratio while a {d['large_mb']:.0f} MB model loads", r["large_ratio"], 1.1,
                          higher_is_better=False, unit="x", source="churn"))
    return "\n".join(text), goals


def section_scale(d: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows, goals = [], []
    for r in d["results"]:
        rows.append((r["n"], r.get("loaded"), r.get("evicted"), r.get("load_s"), r.get("per_minute"),
                     r["before"].get("pss", 0) / MiB, r["after"].get("pss", 0) / MiB, r["after"].get("processes"),
                     r.get("per_model_pss", 0) / MiB, r["hot"]["p99"], r.get("first_request_ms"),
                     r.get("first_request_model_state", r.get("first_request_error", "-")),
                     r.get("restart_to_ready_s"), r.get("restart_loaded"), r.get("restart_hot_set_s"),
                     r.get("restart_hot_set_loaded")))
    text = [table(["models", "loaded", "evicted", "seconds to load", "loads/min", "node PSS before MiB",
                   "after MiB", "processes", "PSS per model MiB", "hot p99 ms meanwhile", "first request ms",
                   "that model was", "restart-to-ready s", "loaded at ready", "hot set loaded s", "hot set"], rows),
            "", "Restart: the models its requests used load before the node reports ready (serving/recent.py); the "
                "rest of its hot set (the newest that fit the budget) after, in the background (last two columns)."]
    res = {r["n"]: r for r in d["results"]}
    # Per-model cost from the largest N that all stayed resident (with evictions, PSS covers only what is loaded).
    resident = [n for n, r in res.items() if not r.get("evicted")] or list(res)
    biggest = max(resident) if resident else 0
    per_model = res[biggest].get("per_model_pss", math.nan) if res else math.nan
    if res:
        at1000 = res.get(1000)
        goals.append(goal("1,000 models: restart-to-ready", at1000.get("restart_to_ready_s") if at1000 else None, 5.0,
                          higher_is_better=False, unit="s", source="scale"))
        need = per_model * 10_000 / GiB if not math.isnan(per_model) else math.nan
        at10k = res.get(10_000)
        goals.append(goal("10,000 models within a 4 GiB node (GiB; extrapolated from PSS per model when not run)",
                          (at10k["after"]["pss"] / GiB) if at10k else need, 4.0, higher_is_better=False, unit="GiB",
                          source=f"scale, {'measured' if at10k else f'{per_model / MiB:.1f} MiB/model at N={biggest}'}"))
        cold = [r.get("first_request_ms") for r in d["results"] if r.get("first_request_model_state") in
                ("evicted", "never loaded")]
        goals.append(goal("a cold (evicted) model's first request", max(cold) if cold else None, 50.0,
                          higher_is_better=False, unit="ms", source="scale"))
        ingest = next((r["ingest"] for r in d["results"] if r.get("ingest")), None)
        goals.append(goal("deployments per minute, one ingest (through the API)", ingest["per_minute"] if ingest
                          else None, 100.0, higher_is_better=True, unit="/min",
                          source=f"scale, {ingest['n']} at once" if ingest else "scale"))
        if ingest:
            text += ["", f"One ingest, {ingest['n']} deployments through the API at once: {ingest['seconds']:.1f} s, "
                         f"{ingest['per_minute']:.0f} deployments/min."]
    return "\n".join(text), goals


def shadow_summary(d: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per load share and mode: median served, p50, p99 over rounds; and the baseline rounds' p99 spread."""
    out: dict[str, dict[str, float]] = {}
    for share, modes in d["comparison"].items():
        base = modes.get("0", [])
        base_p99 = [r["p99"] for r in base]
        for mode, runs in modes.items():
            out[f"{share}/{mode}"] = {"p99": _med([r["p99"] for r in runs]), "p50": _med([r["p50"] for r in runs]),
                                      "rps": _med([r["rps"] for r in runs]),
                                      "p99_ratio": ratio(_med([r["p99"] for r in runs]), _med(base_p99)),
                                      "noise": ratio(max(base_p99, default=math.nan), min(base_p99, default=math.nan))}
    return out


def section_shadow(d: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    s = shadow_summary(d)
    rows = []
    goals = []
    for key, v in s.items():
        share, mode = key.split("/")
        rows.append((f"{float(share):.0%} of {fmt(d['capacity'])} req/s", mode, v["rps"], v["p50"], v["p99"],
                     v["p99_ratio"], v["noise"]))
        if mode != "0" and abs(float(share) - 0.25) < 1e-9:
            goals.append(goal(f"shadow overhead, {mode} x 100 % shadow at 25 %: p99 ratio vs the no-shadow rounds' "
                              "own max/min spread", v["p99_ratio"], v["noise"], higher_is_better=False, unit="x",
                              source="shadow"))
    text = table(["load", "shadows", "served req/s", "p50 ms", "p99 ms", "p99 / no shadow",
                  "no-shadow rounds' p99 max/min (noise)"], rows)
    return text + "\n\nThe script's own report (pause ramps and all rounds) follows.\n\n" + demote(d.get("markdown", "")), goals


def section_bus(d: dict[str, Any], retirement: dict[str, Any] | None) -> tuple[str, list[dict[str, Any]]]:
    text, goals = [], []
    if d:
        rows = [(p["phase"], p["offered"], p["rps"], p["p50"], p["p99"], p["logs_per_s"], p["dropped"], p["failed"])
                for p in d["phases"]]
        text.append(table(["phase", "offered req/s", "served req/s", "p50 ms", "p99 ms", "prediction logs/s published",
                           "telemetry dropped", "failed"], rows))
        fixed = [p for p in d["phases"] if p["offered"]]
        r = ratio(_med([p["p99"] for p in fixed if p["log_rate"] == 1.0]),
                  _med([p["p99"] for p in fixed if p["log_rate"] == 0.0]))
        text += ["", f"p99 with every prediction logged / none logged, same offered load: {fmt(r)}."]
        goals.append(goal("p99 with 100 % prediction logging vs none (fixed load)", r, 1.1, higher_is_better=False,
                          unit="x", source="bus"))
    if retirement:
        text += ["", f"Retirement: one worker folded {retirement['reports']:,} usage reports ({retirement['models']} "
                     f"models) in {retirement['elapsed_s']:.2f} s = **{retirement['per_second']:,.0f} reports/s** "
                     f"(`{retirement['command']}`)."]
    return "\n".join(text), goals


def section_profile(top: dict[str, list[tuple[str, float]]]) -> str:
    """py-spy's view of the modelcd node (front and model workers) at saturation: where the time goes."""
    if not top.get("own"):
        return "No profile (py-spy found no samples)."
    samples = int(top.get("samples", [("", 0.0)])[0][1])
    # The trunk (process, runpy, the event loop's run) is in most stacks and says nothing: left out.
    total = [t for t in top["total"] if t[1] < 0.6 and not t[0].startswith("process ")][:12]
    rows = [(i + 1, f"`{o[0]}`", f"{o[1]:.1%}", f"`{t[0]}`", f"{t[1]:.1%}")
            for i, (o, t) in enumerate(zip(top["own"][:12], total, strict=False))]
    return (f"Profile: py-spy (`record --subprocesses -r 200 -f raw`) on the modelcd node and its model workers "
            f"during an extra saturation run ({samples:,} samples, idle time excluded); the top frames by own "
            "time and by total time (frames in more than 60 % of the stacks left out):\n\n" + table(["#", "own time: frame", "share", "total time: frame", "share"],
                                                    rows))


def demote(markdown: str) -> str:
    """A script's own section inside ours: its headings one level down."""
    return "\n".join("#" + line if line.startswith("##") else line for line in markdown.splitlines())


def header(meta: dict[str, Any], command: str, load_before: tuple[float, ...], load_after: tuple[float, ...],
           elapsed_s: float) -> str:
    v = ", ".join(f"{k} {val}" for k, val in meta.get("versions", {}).items())
    return (f"Generated by `{command}` on {meta.get('date', '?')} in {elapsed_s / 60:.0f} min. Machine: {meta.get('cpu')}, "
            f"{meta.get('cores')} cores, {meta.get('memory_gib')} GiB, Linux {meta.get('kernel')}; CPython "
            f"{meta.get('python')}; {v}; load generator {meta.get('load_generator')}; code at commit "
            f"{meta.get('commit')}.\n\nLoad average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
            f"after: {' '.join(f'{x:.2f}' for x in load_after)}. The machine is shared (other engineers' test runs), "
            "so absolute figures carry tens of percent of noise: peers are measured in the same run, one after "
            "the other, and compared as ratios.")


__all__ = [
    "churn_ratios",
    "demote",
    "header",
    "quantile",
    "section_bus",
    "section_churn",
    "section_propagation",
    "section_scale",
    "section_serving",
    "section_shadow",
    "shadow_summary",
]
