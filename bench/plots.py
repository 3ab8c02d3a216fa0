"""PNG plots for RESULTS.md from the scenarios' JSON (matplotlib, the `bench` extra). Each returns its file name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.render import MiB

SERVERS = ("modelcd", "frontdoor", "mlserver", "kserve", "floor")


def serving(d: dict[str, Any], out: Path) -> list[str]:
    res = d["results"]
    combos = sorted({(r["model"], r["batch"]) for r in res})
    files = []
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(SERVERS)
    for i, s in enumerate(SERVERS):
        vals = [next((r["saturation"]["rps"] for r in res if (r["server"], r["model"], r["batch"]) == (s, *c)), 0)
                for c in combos]
        ax.bar([j + i * width for j in range(len(combos))], vals, width, label=s)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(combos))], [f"{m}, {b} rows" for m, b in combos])
    ax.set_ylabel("requests/s at saturation")
    ax.set_yscale("log")
    ax.set_title("Serving: throughput at saturation (closed loop)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "serving_throughput.png", dpi=90)
    plt.close(fig)
    files.append("serving_throughput.png")
    fig, axes = plt.subplots(1, len(combos), figsize=(4 * len(combos), 3.6), squeeze=False)
    for ax, (m, b) in zip(axes[0], combos, strict=True):
        for s in SERVERS:
            r = next((r for r in res if (r["server"], r["model"], r["batch"]) == (s, m, b)), None)
            if r is None:
                continue
            xs = [r["at25"]["offered"], r["at50"]["offered"]]
            ax.plot(xs, [r["at25"]["p99"], r["at50"]["p99"]], marker="o", label=f"{s} p99")
            ax.plot(xs, [r["at25"]["p50"], r["at50"]["p50"]], marker=".", linestyle=":", label=f"{s} p50")
        ax.set_title(f"{m}, {b} rows/request", fontsize=9)
        ax.set_xlabel("offered req/s (25 %, 50 % of modelcd's saturation)", fontsize=8)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "serving_latency.png", dpi=90)
    plt.close(fig)
    files.append("serving_latency.png")
    return files


def propagation(d: dict[str, Any], out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [str(r["nodes"]) for r in d["results"]]
    parts = [("queue+api", lambda r: r["queue_api"]["median"])] + [
        (s, lambda r, s=s: r["steps"].get(s, 0.0)) for s in ("validate", "compile", "serving-validation", "publish")] + [
        ("→ every node", lambda r: r["to_nodes"]["median"])]
    bottom = [0.0] * len(labels)
    for name, get in parts:
        vals = [get(r) * 1000 for r in d["results"]]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax.axhline(500, color="k", linestyle="--", linewidth=1)
    ax.text(-0.4, 520, "goal 0.5 s; TF Serving's poll alone: 0.5 s average, 1 s worst", fontsize=7)
    ax.set_xlabel("nodes")
    ax.set_ylabel("ms (medians)")
    ax.set_title("Deploy request → serving on every node, by step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "propagation.png", dpi=90)
    plt.close(fig)
    return ["propagation.png"]


def churn(d: dict[str, Any], out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    series = d["series"]
    ax.plot([w["t"] for w in series], [w["p99"] for w in series], label="p99 per second", linewidth=1)
    ax.plot([w["t"] for w in series], [w["p50"] for w in series], label="p50 per second", linewidth=1)
    for p in d["phases"]:
        if p["phase"] != "quiet":
            ax.axvspan(p["start"], p["end"], alpha=0.15, color="C3" if p["phase"] == "churn" else "C4")
    for e in d.get("events", []):
        ax.axvline(e["t"], color="k", alpha=0.15, linewidth=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (shaded: deployments; thin lines: each deploy request)")
    ax.set_ylabel("ms")
    ax.set_title(f"Churn: hot model at {d['rate']:.0f} req/s while other models deploy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "churn.png", dpi=90)
    plt.close(fig)
    return ["churn.png"]


def scale(d: dict[str, Any], out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    res = d["results"]
    ax.plot([r["n"] for r in res], [r["after"].get("pss", 0) / MiB for r in res], marker="o", label="node PSS")
    ax.plot([r["n"] for r in res], [r["after"].get("rss", 0) / MiB for r in res], marker="x", label="node RSS (sum)")
    ax.axhline(4096, color="k", linestyle="--", linewidth=1, label="4 GiB")
    ax.set_xscale("log")
    ax.set_xlabel("models deployed")
    ax.set_ylabel("MiB (serving process and its model workers)")
    ax.set_title("Memory vs number of models")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale_memory.png", dpi=90)
    plt.close(fig)
    return ["scale_memory.png"]


def shadow(d: dict[str, Any], out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for share, modes in d["comparison"].items():
        for mode, runs in modes.items():
            ax.plot(range(1, len(runs) + 1), [r["p99"] for r in runs], marker="o",
                    label=f"{float(share):.0%}, {mode} shadows")
    ax.set_xlabel("round")
    ax.set_ylabel("primary p99 ms")
    ax.set_title("Shadow overhead: primary p99 per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "shadow.png", dpi=90)
    plt.close(fig)
    return ["shadow.png"]


def bus(d: dict[str, Any], out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [p["phase"] for p in d["phases"]]
    ax.bar(range(len(labels)), [p["logs_per_s"] for p in d["phases"]], label="prediction logs/s published")
    ax.bar(range(len(labels)), [p["rps"] for p in d["phases"]], alpha=0.3, label="requests/s served")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
    ax.set_title("Bus: prediction logs published by one node")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bus.png", dpi=90)
    plt.close(fig)
    return ["bus.png"]
