"""The benchmark harness's parsing and report code (bench/report.py, bench/render.py), without any load."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import render
from bench.report import (
    BEGIN,
    END,
    goal,
    goals_table,
    hey_connections,
    parse_hey,
    parse_hey_csv,
    phase_stats,
    quantile,
    splice,
    windows,
)

HEY = """
Summary:
  Total:\t2.0031 secs
  Slowest:\t0.0410 secs
  Fastest:\t0.0003 secs
  Average:\t0.0029 secs
  Requests/sec:\t3141.6000

Latency distribution:
  10%% in 0.0010 secs
  50%% in 0.0019 secs
  90%% in 0.0050 secs
  99%% in 0.0091 secs

Status code distribution:
  [200]\t6280 responses
  [503]\t3 responses

Error distribution:
  [2]\tPost "http://127.0.0.1:1/x": dial tcp 127.0.0.1:1: connect: connection refused
  [1]\tPost "http://127.0.0.1:1/x": context deadline exceeded
"""

CSV = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0020,0.0001,0,0,0.0019,0,200,0.5000
0.0100,0.0001,0,0,0.0099,0,200,0.1000
0.0500,0.0001,0,0,0.0499,0,503,1.2000
0.0040,0.0001,0,0,0.0039,0,200,1.4000
"""


def test_parse_hey_counts_non_2xx_and_transport_errors_as_failed() -> None:
    """hey's summary: req/s, percentiles in ms, and every 503 and transport error counted as failed."""
    r = parse_hey(HEY)
    assert r["rps"] == 3141.6
    assert math.isclose(r["p50"], 1.9) and math.isclose(r["p99"], 9.1) and math.isclose(r["p90"], 5.0)
    assert r["codes"] == {200: 6280, 503: 3}
    assert r["errors"] == 3 and r["failed"] == 6 and r["total"] == 6286


def test_parse_hey_without_errors_or_output() -> None:
    """A run with no error section, and an empty output, parse to zeros and NaN, not an exception."""
    r = parse_hey(HEY.split("Error distribution:")[0])
    assert r["errors"] == 0 and r["failed"] == 3
    empty = parse_hey("")
    assert empty["rps"] == 0.0 and math.isnan(empty["p99"]) and empty["failed"] == 0


def test_csv_rows_phases_and_windows() -> None:
    """hey -o csv: rows sorted by offset; per-phase and per-second p99 count only 2xx answers as latencies."""
    rows = parse_hey_csv(CSV)
    assert [r[0] for r in rows] == [0.1, 0.5, 1.2, 1.4]
    first = phase_stats(rows, 0.0, 1.0)
    assert first["n"] == 2 and first["failed"] == 0 and math.isclose(first["p50"], 6.0)
    second = phase_stats(rows, 1.0, 2.0)
    assert second["n"] == 1 + 1 and second["failed"] == 1 and math.isclose(second["p99"], 4.0)
    series = windows(rows, 1.0)
    assert [w["t"] for w in series] == [0.0, 1.0] and series[1]["failed"] == 1


def test_quantile_and_goal_verdicts() -> None:
    """Quantiles interpolate; a missed goal says by how much, in both directions."""
    assert quantile([1, 2, 3, 4], 0.5) == 2.5 and math.isnan(quantile([], 0.5))
    assert goal("t", 8.0, 5.0, higher_is_better=True)["verdict"] == "met"
    assert goal("t", 2.5, 5.0, higher_is_better=True)["verdict"] == "missed by 2.00x"
    assert goal("t", 0.75, 0.5, higher_is_better=False)["verdict"] == "missed by 1.50x"
    assert goal("t", None, 0.5, higher_is_better=False)["verdict"] == "not measured"
    assert "missed by 2.00x" in goals_table([goal("t", 2.5, 5.0, higher_is_better=True, unit="x")])


def test_hey_connections_keep_pacing_interval_above_20ms() -> None:
    """Each connection paces at most 50 req/s, so hey -q stays open-loop while answers take < 20 ms."""
    assert hey_connections(100) == 8
    assert hey_connections(2000) == 40


def test_splice_keeps_hand_run_sections() -> None:
    """The generated block goes under the title once, is replaced in place after, and the rest is kept."""
    doc = "# Benchmarks\n\n## router\n\nold figures\n"
    once = splice(doc, "new A")
    assert once.startswith("# Benchmarks\n\n" + BEGIN) and "## router\n\nold figures" in once
    twice = splice(once, "new B")
    assert "new A" not in twice and "new B" in twice and twice.count(BEGIN) == 1 and twice.count(END) == 1
    assert twice.endswith("old figures\n")


def _hey(rps: float, p50: float, p99: float, offered: float = 0.0) -> dict:
    return {"rps": rps, "p50": p50, "p99": p99, "failed": 0, "offered": offered}


def test_render_every_section_from_made_up_figures() -> None:
    """Each scenario's JSON renders to a table and goal verdicts (serving ratios taken from the worst case)."""
    serving = {"results": [
        {"server": s, "model": "logreg", "batch": 1, "saturation": _hey(rps, 1, 2),
         "at25": _hey(rps, 1, p99, 250), "at50": _hey(rps, 1, p99 * 2, 500)}
        for s, rps, p99 in (("modelcd", 4000, 5), ("mlserver", 500, 50), ("floor", 4400, 4))]}
    text, goals = render.section_serving(serving)
    assert "| logreg | 1 | mlserver | 500 | 8.00x |" in text
    verdicts = {g["goal"].split(" (")[0]: g["verdict"] for g in goals}
    assert verdicts["throughput vs MLServer"] == "met"
    assert verdicts["per-request cost vs the floor"] == "met"

    prop = {"results": [{"nodes": n, "n": 20, "total": {"median": 0.8, "p95": 1.1}, "first_node": {"median": 0.7},
                         "queue_api": {"median": 0.1}, "to_nodes": {"median": 0.05, "p95": 0.1},
                         "steps": {"validate": 0.01, "compile": 0.02, "serving-validation": 0.5, "publish": 0.01}}
                        for n in (1, 2)]}
    text, goals = render.section_propagation(prop)
    assert goals[0]["verdict"] == "missed by 1.60x" and "| 2 | 20 | 800 |" in text

    churn = {"rate": 300, "phases": [
        {"phase": p, "start": i * 10, "end": i * 10 + 10, "n": 3000, "rps": 300, "p50": 1.0, "p99": p99, "failed": 0}
        for i, (p, p99) in enumerate((("quiet", 4.0), ("churn", 6.0), ("quiet", 4.0), ("churn", 6.0)))],
        "large_mb": 0}
    text, goals = render.section_churn(churn)
    assert math.isclose(render.churn_ratios(churn)["churn_ratio"], 1.5) and goals[0]["verdict"] == "missed by 1.36x"

    scale = {"results": [{"n": n, "loaded": n, "evicted": 0, "load_s": 10.0, "per_minute": 6 * n,
                          "before": {"pss": 100 * render.MiB}, "after": {"pss": (100 + n) * render.MiB, "processes": n},
                          "per_model_pss": render.MiB, "hot": {"p99": 5.0}, "first_request_ms": 80.0,
                          "first_request_model_state": "evicted", "restart_to_ready_s": 3.0,
                          **({"ingest": {"n": 10, "seconds": 12.0, "per_minute": 50.0}} if n == 10 else {})}
                         for n in (10, 1000)]}
    text, goals = render.section_scale(scale)
    verdicts = {g["goal"]: g["verdict"] for g in goals}
    assert verdicts["1,000 models: restart-to-ready"] == "met"
    assert verdicts["a cold (evicted) model's first request"] == "missed by 1.60x"
    assert verdicts["deployments per minute, one ingest (through the API)"] == "missed by 2.00x"
    assert any(g["measured"] is not None and math.isclose(g["measured"], 10_000 / 1024) for g in goals)

    shadow = {"capacity": 4000, "markdown": "## shadow: x\n\nbody", "comparison": {"0.25": {
        "0": [_hey(1000, 1, 3.0), _hey(1000, 1, 4.0)], "1": [_hey(1000, 1, 3.5), _hey(1000, 1, 3.5)],
        "3": [_hey(1000, 1, 7.0), _hey(1000, 1, 7.0)]}}}
    text, goals = render.section_shadow(shadow)
    assert "### shadow: x" in text
    assert [g["verdict"] for g in goals] == ["met", "missed by 1.50x"]

    bus = {"phases": [{"phase": f"fixed, log {r:.0%}", "offered": 800, "log_rate": r, "rps": 800, "p50": 1,
                       "p99": p99, "logs_per_s": 800 * r, "dropped": 0, "failed": 0} for r, p99 in ((0.0, 4), (1.0, 5))]}
    text, goals = render.section_bus(bus, {"reports": 5000, "models": 200, "elapsed_s": 1.0, "per_second": 5000.0,
                                           "command": "python bench/bench_retirement.py"})
    assert "5,000 reports/s" in text and goals[0]["verdict"] == "missed by 1.14x"


def test_collapsed_top_adds_a_function_across_lines() -> None:
    """py-spy raw stacks: own time goes to the leaf, total to every frame once per stack, lines merged."""
    from bench.report import collapsed_top

    text = ("main (a.py:1);handle (b.py:10);decode (c.py:5) 30\n"
            "main (a.py:1);handle (b.py:12);decode (c.py:7) 10\n"
            "main (a.py:1);handle (b.py:12) 60\n")
    top = collapsed_top(text, 3)
    assert top["own"][0] == ("handle (b.py)", 0.6) and top["own"][1] == ("decode (c.py)", 0.4)
    assert dict(top["total"])["main (a.py)"] == 1.0
