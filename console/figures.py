"""The figures the console shows, derived from `ConsoleState` (pure: `now` passed in).

Every figure names where it comes from; one that no event carries is None, and the page says
"not in any event" instead of showing a number nobody measured. In particular:

- requests per minute and error rate come from the nodes' usage reports (complete counts);
- p99 latency is in no per-model event: nodes publish sampled prediction logs and Prometheus
  metrics, not percentiles. The console shows one only where an event carries it: the last
  shadow comparison of a pair (both sides' p99) or the last rollout analysis (each arm's p99);
- memory is what nodes report resident in their heartbeats, else the figure measured at serving
  validation (`ModelState.resources`), labelled as such;
- time to warning and to retirement use retirement's own `Record` (idle since the later of
  deployment and last use) and its warn share; protections are retirement's reasons.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from modelcd.events.schemas import ModelHealth, ModelState, RetirementDecision, RetirementWarning, ShadowComparison

from .state import ConsoleState

RATE_WINDOW_S = 60.0
ERROR_WINDOW_S = 300.0


@dataclass(frozen=True, slots=True)
class Latency:
    p99_ms: float
    source: str  # where the figure comes from


@dataclass(frozen=True, slots=True)
class ModelRow:
    key: str
    state: ModelState
    nodes: list[str]
    requests_per_min: float | None  # None: no usage report in the window
    error_rate: float | None
    requests_in_error_window: int
    p99: Latency | None
    memory_bytes: int | None
    memory_source: str
    warn_in_s: float | None  # None: no expiry, or protected
    retire_in_s: float | None
    protections: list[str]
    last_used: float
    health: list[ModelHealth]
    retirement: RetirementWarning | RetirementDecision | None


def model_rows(state: ConsoleState, now: float, warn_share: float) -> list[ModelRow]:
    """One row per name:version in the target state, serving first, then by name and version."""
    protections, loaded = state.protection_index(), state.loaded_index()
    rows = [_row(state, key, m, now, warn_share, protections, loaded) for key, m in state.models.items()]
    return sorted(rows, key=lambda r: (r.state.target != "serving", r.state.name, _vkey(r.state.version)))


def _row(state: ConsoleState, key: str, m: ModelState, now: float, warn_share: float,
         protection_index: dict[str, set[str]], loaded: dict[tuple[str, str], list[tuple[str, int]]]) -> ModelRow:
    reports = list(state.usage.get(key, ()))
    recent = [u for u in reports if u.interval_end > now - RATE_WINDOW_S]
    rpm = sum(u.count for u in recent) * (60.0 / RATE_WINDOW_S) if recent else None
    window = [u for u in reports if u.interval_end > now - ERROR_WINDOW_S]
    requests = sum(u.count for u in window)
    errors = sum(u.errors for u in window)
    error_rate = errors / requests if requests else None
    held = loaded.get((m.name, m.version), [])
    nodes = [node for node, _bytes in held]
    resident = [b for _node, b in held if b]
    if resident:
        memory, memory_source = max(resident), "resident, as nodes report it"
    elif m.resources.memory_bytes:
        memory, memory_source = m.resources.memory_bytes, "measured at serving validation"
    else:
        memory, memory_source = None, "not in any event"
    protections = state.protections_of(key, protection_index)
    record = state.records.get(key)
    warn_in = retire_in = None
    if record is not None and m.target == "serving" and m.expiry_seconds > 0 and not protections:
        warn_in = record.warn_at(warn_share) - now
        retire_in = record.retire_at - now
    return ModelRow(
        key=key, state=m, nodes=nodes, requests_per_min=rpm, error_rate=error_rate,
        requests_in_error_window=requests, p99=p99_of(state, m.name, m.version), memory_bytes=memory,
        memory_source=memory_source, warn_in_s=warn_in, retire_in_s=retire_in, protections=protections,
        last_used=record.last_used if record is not None else 0.0,
        health=sorted(state.health.get(key, {}).values(), key=lambda h: h.node),
        retirement=state.retirement.get(key),
    )


def p99_of(state: ConsoleState, name: str, version: str) -> Latency | None:
    """The latest p99 an event carries for name:version (shadow comparison or rollout analysis), if any."""
    key = f"{name}:{version}"
    best: tuple[float, Latency] | None = None
    for (primary, shadow), windows in state.windows.items():
        if key not in (primary, shadow):
            continue
        for start in sorted(windows, reverse=True):  # the latest window that carries the figure
            w = windows[start]
            figures = w.primary_latency_ms if key == primary else w.shadow_latency_ms
            if "p99" in figures:
                cand = (w.window_end, Latency(figures["p99"], f"shadow comparison {primary} / {shadow}"))
                best = cand if best is None or cand[0] > best[0] else best
                break
    for endpoint, r in state.rollouts.items():
        for ev in reversed(r.history):
            if not ev.evidence:
                continue
            for arm, ref in (("canary", r.canary), ("baseline", r.baseline)):
                fig = ev.evidence.get(arm) or {}
                if ref == key and fig.get("latency_p99_ms") is not None:
                    cand = (ev.at, Latency(float(fig["latency_p99_ms"]), f"rollout analysis on {endpoint} ({arm})"))
                    best = cand if best is None or cand[0] > best[0] else best
            break
    return best[1] if best else None


@dataclass(frozen=True, slots=True)
class Gap:
    start: float
    end: float


def series(windows: dict[float, ShadowComparison]) -> tuple[list[ShadowComparison], list[Gap], str]:
    """The pair's windows in time order, the gaps between them, and which figure to plot.

    Classifiers carry `agreement`, regressors `mean_abs_diff`; a gap is time between two windows
    with no comparison at all (no shadow prediction arrived: shadowing paused under pressure,
    the relation outside its time window, or no traffic: no event says which).
    """
    ordered = [windows[k] for k in sorted(windows)]
    gaps = [Gap(a.window_end, b.window_start) for a, b in itertools.pairwise(ordered)
            if b.window_start - a.window_end > 1e-6]
    kind = "agreement" if any(w.agreement is not None for w in ordered) else (
        "mean_abs_diff" if any(w.mean_abs_diff is not None for w in ordered) else "errors")
    return ordered, gaps, kind


def figure(w: ShadowComparison, kind: str) -> float | None:
    if kind == "agreement":
        return w.agreement
    if kind == "mean_abs_diff":
        return w.mean_abs_diff
    return w.errors / w.count if w.count else None


def endpoint_of(state: ConsoleState, primary: str, shadow: str) -> list[tuple[str, Any]]:
    """The endpoints whose policy holds this relation, with the relation (for its sample rate and end)."""
    out = []
    name = primary.rpartition(":")[0]
    for endpoint, p in sorted(state.policies.items()):
        for rel in p.shadows:
            if rel.shadow == shadow and rel.primary in (primary, name):
                out.append((endpoint, rel))
    return out


def _vkey(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)
