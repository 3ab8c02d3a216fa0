"""A line plot drawn on the server as inline SVG (no script, no library, readable by screen readers).

`line_plot` draws one series over time: the line breaks where a value is missing or a gap
starts, gaps are shaded and labelled, and the figure carries a `<title>` and a `<desc>` that
say in words what it shows (first and last value, minimum, number of gaps).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

W, H = 560, 160
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 12, 28


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def line_plot(points: Sequence[tuple[float, float | None]], *, gaps: Sequence[tuple[float, float]] = (),
              y_min: float | None = None, y_max: float | None = None, label: str, unit: str = "",
              plot_id: str) -> str:
    """`points` as (time, value or None), sorted by time; `gaps` as (start, end) to shade."""
    values = [v for _t, v in points if v is not None]
    if not points or not values:
        return f'<p class="muted" id="{escape(plot_id)}">{escape(label)}: no window with a value yet.</p>'
    t0 = min([points[0][0], *(g[0] for g in gaps)])
    t1 = max([points[-1][0], *(g[1] for g in gaps)])
    lo = min(values) if y_min is None else y_min
    hi = max(values) if y_max is None else y_max
    if hi - lo < 1e-12:
        hi = lo + 1.0
    span = max(t1 - t0, 1e-9)

    def x(t: float) -> float:
        return PAD_L + (t - t0) / span * (W - PAD_L - PAD_R)

    def y(v: float) -> float:
        return PAD_T + (1.0 - (v - lo) / (hi - lo)) * (H - PAD_T - PAD_B)

    parts = [(f'<svg class="plot" viewBox="0 0 {W} {H}" width="100%" role="img" '
              f'aria-labelledby="{plot_id}-t {plot_id}-d" id="{escape(plot_id)}">'),
             f'<title id="{plot_id}-t">{escape(label)}</title>',
             f'<desc id="{plot_id}-d">{escape(_describe(points, values, gaps, unit))}</desc>']
    for g0, g1 in gaps:
        parts.append(f'<rect class="gap" x="{x(g0):.1f}" y="{PAD_T}" width="{max(x(g1) - x(g0), 1.5):.1f}" '
                     f'height="{H - PAD_T - PAD_B}"><title>no comparison {_clock(g0)}–{_clock(g1)}</title></rect>')
    # axes: value range on the left, time range below
    parts.append(f'<line class="axis" x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}"/>')
    parts.append(f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}"/>')
    parts.append(f'<text x="{PAD_L - 4}" y="{PAD_T + 4}" text-anchor="end">{_fmt(hi, unit)}</text>')
    parts.append(f'<text x="{PAD_L - 4}" y="{H - PAD_B}" text-anchor="end">{_fmt(lo, unit)}</text>')
    parts.append(f'<text x="{PAD_L}" y="{H - 8}">{_clock(t0)}</text>')
    parts.append(f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end">{_clock(t1)}</text>')
    segment: list[str] = []
    gap_starts = sorted(g[0] for g in gaps)
    prev_t: float | None = None
    for t, v in points:
        broken = prev_t is not None and any(prev_t <= g < t for g in gap_starts)
        if v is None or broken:
            if len(segment) > 1:
                parts.append(f'<polyline class="line" points="{" ".join(segment)}"/>')
            segment = []
        if v is not None:
            segment.append(f"{x(t):.1f},{y(v):.1f}")
            parts.append(f'<circle class="dot" cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5"/>')
        prev_t = t
    if len(segment) > 1:
        parts.append(f'<polyline class="line" points="{" ".join(segment)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: float, unit: str) -> str:
    return f"{v:.3g}{unit}"


def _describe(points: Sequence[tuple[float, float | None]], values: Sequence[float],
              gaps: Sequence[tuple[float, float]], unit: str) -> str:
    first = next(v for _t, v in points if v is not None)
    last = next(v for _t, v in reversed(points) if v is not None)
    text = (f"{len(values)} windows from {_clock(points[0][0])} to {_clock(points[-1][0])}: first {_fmt(first, unit)}, "
            f"last {_fmt(last, unit)}, lowest {_fmt(min(values), unit)}, highest {_fmt(max(values), unit)}")
    if gaps:
        text += f"; {len(gaps)} period(s) without comparisons, shaded"
    return text + "."
