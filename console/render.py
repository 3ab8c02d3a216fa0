"""The console's HTML, rendered on the server from `ConsoleState` (pure: state and `now` in, text out).

One function per section (`SECTIONS` in state.py); the page holds each section's body in an
element whose id is the section's name, and the live stream replaces that element's content
with the same function's output, so the first paint and every update are one rendering.

Accessibility: one `<h1>`, a heading per section and per item, tables with captions and
header cells, figures drawn as SVG with a title and a text description, the traffic split with
an `aria-label` spelling out every weight, buttons that are real `<button>`s, and an
`aria-live` region that announces updates and the result of an action. Colours meet WCAG AA
contrast against their background (see console.css).

Everything shown comes from an event; a figure no event carries is written as "not in any event"
(with the reason in its `title`), never as a number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote

from modelcd.events.schemas import NodeStatus

from . import svg
from .figures import ModelRow, endpoint_of, figure, model_rows, series
from .state import SECTIONS, ConsoleState

MAX_DEPLOYMENTS = 15
MAX_HISTORY = 15
NOT_IN_EVENT = "not in any event"


@dataclass(frozen=True)
class View:
    """What rendering needs besides the state."""

    warn_share: float = 0.8
    heartbeat_s: float = 5.0
    login_required: bool = False


# --- small formatters -----------------------------------------------------------------------------


def e(value: Any) -> str:
    return escape(str(value), quote=True)


def ago(seconds: float) -> str:
    s = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


def duration_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def size(n: int | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "–"


def na(why: str) -> str:
    return f'<span class="na" title="{e(why)}">{NOT_IN_EVENT}</span>'


def badge(text: str, kind: str) -> str:
    return f'<span class="badge {e(kind)}">{e(text)}</span>'


# --- deployments ----------------------------------------------------------------------------------

_STEP_KIND = {"succeeded": "ok", "failed": "bad", "started": "run", "skipped": "skip"}
_STATUS_KIND = {"completed": "ok", "failed": "bad", "running": "run", "pending": "skip"}


def deployments(state: ConsoleState, now: float, view: View) -> str:
    items = sorted(state.deployments.deployments(), key=lambda d: d.requested_at or d.finished_at or 0.0,
                   reverse=True)[:MAX_DEPLOYMENTS]
    if not items:
        return '<p class="muted">No deployment on the bus yet. <code>modelcd deploy PACKAGE.tar</code> or ' \
               '<code>POST /deployments</code> starts one.</p>'
    out = []
    for d in items:
        ref = f"{d.model or '?'}:{d.version or '?'}"
        total = sum(s.duration_ms or 0.0 for s in d.steps) or 1.0
        end = d.finished_at or now
        took = f"took {ago(end - d.requested_at)}" if d.finished_at and d.requested_at else (
            f"running for {ago(now - d.requested_at)}" if d.requested_at else "")
        steps = []
        for s in d.steps:
            width = max(2.0, (s.duration_ms or 0.0) / total * 100.0)
            steps.append(
                f'<li class="step {_STEP_KIND.get(s.status, "skip")}" data-step="{e(s.step)}" data-status="{e(s.status)}">'
                f'<span class="step-name">{e(s.step)}</span> {badge(s.status, _STEP_KIND.get(s.status, "skip"))} '
                f'<span class="step-time">{duration_ms(s.duration_ms)}</span>'
                f'<span class="bar" aria-hidden="true"><span style="width:{width:.1f}%"></span></span>'
                + (f'<span class="detail">{e(s.detail)}</span>' if s.detail else "") + "</li>")
        nodes = state.nodes_with(d.model, d.version) if d.status == "completed" else []
        serving = (f'<p>Nodes serving: {e(", ".join(nodes))}</p>' if nodes else
                   '<p class="muted">Nodes serving: none reports it loaded yet.</p>') if d.status == "completed" else ""
        failure = (f'<p class="reason"><strong>Failed at {e(d.failed_step)}:</strong> {e(d.reason)}</p>'
                   if d.status == "failed" else "")
        noop = '<p class="muted">Identical package already serving: nothing changed.</p>' if d.noop else ""
        out.append(
            f'<article class="deployment" data-deployment="{e(d.deployment_id)}" data-status="{e(d.status)}">'
            f'<h3>{e(ref)} {badge(d.status, _STATUS_KIND.get(d.status, "skip"))}</h3>'
            f'<p class="meta">Deployment <code>{e(d.deployment_id[:12])}</code> · requested {clock(d.requested_at)}'
            f'{" · " + e(took) if took else ""}{" · runtime " + e(d.runtime) if d.runtime else ""}</p>'
            f'<ol class="timeline" aria-label="steps of {e(ref)}">{"".join(steps)}</ol>{failure}{noop}{serving}'
            "</article>")
    return "".join(out)


# --- models ---------------------------------------------------------------------------------------

P99_WHY = ("nodes publish no per-model latency percentile; a p99 is shown only from a shadow comparison or a "
           "rollout analysis; see the node's /metrics")


def _until(seconds: float | None, row: ModelRow, what: str) -> str:
    if row.state.target != "serving":
        return "–"
    if row.protections:
        return '<span class="muted">kept</span>'
    if row.state.expiry_seconds <= 0 or seconds is None:
        return '<span class="muted">no expiry</span>'
    if seconds <= 0:
        return f'<span class="warn">{what} due</span>'
    return ago(seconds)


def models(state: ConsoleState, now: float, view: View) -> str:
    rows = model_rows(state, now, view.warn_share)
    if not rows:
        return '<p class="muted">No model in the target state yet.</p>'
    body = []
    for r in rows:
        m = r.state
        rpm = f"{r.requests_per_min:.0f}" if r.requests_per_min is not None else (
            "0" if r.nodes else '<span class="muted">no usage</span>')
        err = (f"{r.error_rate:.2%}" if r.error_rate is not None else '<span class="muted">no requests</span>')
        p99 = (f'<span title="from {e(r.p99.source)}">{r.p99.p99_ms:.1f} ms</span>' if r.p99 is not None
               else na(P99_WHY))
        mem = (f'<span title="{e(r.memory_source)}">{size(r.memory_bytes)}</span>' if r.memory_bytes is not None
               else na("no node reported it and serving validation measured none"))
        kept = "; ".join(r.protections) if r.protections else '<span class="muted">none</span>'
        health = " ".join(
            badge(f"{h.node}: {'ok' if h.ok else 'quarantined' if h.quarantined else 'failing'} {h.latency_ms:.0f} ms",
                  "ok" if h.ok else "bad") + (f'<div class="reason small">{e(h.detail)}</div>' if h.detail else "")
            for h in r.health) or '<span class="muted">no check yet</span>'
        retire_note = ""
        if r.retirement is not None:
            ev = r.retirement
            text = (f"warned {clock(ev.at)}" if ev.__class__.__name__ == "RetirementWarning"
                    else f"{getattr(ev, 'action', '')} {clock(ev.at)}: {getattr(ev, 'reason', '')}")
            retire_note = f'<div class="muted small">{e(text)}</div>'
        state_badge = badge(m.target, "ok" if m.target == "serving" else "skip")
        reason = f'<div class="muted small">{e(m.reason)}</div>' if m.target == "retired" and m.reason else ""
        body.append(
            f'<tr data-model="{e(r.key)}"><th scope="row">{e(m.name)}<span class="muted">:{e(m.version)}</span></th>'
            f"<td>{state_badge}{reason}</td><td>{e(m.runtime or m.flavor or '–')}</td><td>{e(m.owner or '–')}</td>"
            f"<td>{e(', '.join(r.nodes)) if r.nodes else '0'}</td><td class='num'>{rpm}</td><td class='num'>{err}</td>"
            f"<td class='num'>{p99}</td><td class='num'>{mem}</td>"
            f"<td>{_until(r.warn_in_s, r, 'warning')}</td><td>{_until(r.retire_in_s, r, 'retirement')}{retire_note}</td>"
            f"<td>{kept}</td><td>{health}</td></tr>")
    return (
        '<div class="scroll"><table class="models"><caption>Every name:version in the target state, from '
        "model-state, usage and health events</caption><thead><tr>"
        '<th scope="col">Model</th><th scope="col">State</th><th scope="col">Runtime</th><th scope="col">Owner</th>'
        '<th scope="col">Nodes loaded</th><th scope="col">Req/min</th><th scope="col">Error rate (5 min)</th>'
        '<th scope="col">p99</th><th scope="col">Memory</th><th scope="col">Warning in</th>'
        '<th scope="col">Retires in</th><th scope="col">Protections</th><th scope="col">Health checks</th>'
        f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
        f'<p class="muted small">p99: {e(P99_WHY)}. Times to warning and retirement count from the later of deployment '
        f"and last use (usage reports), warning at {view.warn_share:.0%} of the owner's expiry, as the retirement "
        "processor decides.</p>")


# --- endpoints ------------------------------------------------------------------------------------


def split_bar(routes: list[tuple[str, float]], label: str) -> str:
    said = ", ".join(f"{ref} {w:g}%" for ref, w in routes) or "no route"
    segs = "".join(
        f'<span class="seg c{i % 6}" style="width:{w:.4f}%" data-ref="{e(ref)}" data-weight="{w:g}" '
        f'title="{e(ref)} {w:g}%">{e(ref)} {w:g}%</span>'
        for i, (ref, w) in enumerate(routes) if w > 0)
    return f'<div class="split" role="img" aria-label="{e(label)}: {e(said)}">{segs}</div>'


_ACTIONS = (("pause", "Pause", ("running",)), ("resume", "Resume", ("paused",)),
            ("promote", "Promote to 100 %", ("running", "paused")), ("abort", "Abort", ("running", "paused")))


def _checks_table(evidence: dict[str, Any]) -> str:
    checks = evidence.get("checks") or []
    rows = []
    for c in checks:
        interval = (f"[{c['low']:.4g}, {c['high']:.4g}]" if isinstance(c.get("low"), int | float)
                    and isinstance(c.get("high"), int | float) else "–")
        value = f"{c['value']:.4g}" if isinstance(c.get("value"), int | float) else "–"
        bound = f"{c['bound']:g}" if isinstance(c.get("bound"), int | float) else "–"
        kind = {"pass": "ok", "fail": "bad", "inconclusive": "run"}.get(c.get("status", ""), "skip")
        rows.append(f'<tr><th scope="row">{e(c.get("name", ""))}</th><td>{badge(c.get("status", ""), kind)}</td>'
                    f'<td class="num">{value}</td><td class="num">{interval}</td><td class="num">{bound}</td>'
                    f'<td class="num">{e(c.get("n", ""))}</td><td>{e(c.get("detail", ""))}</td></tr>')
    arms = []
    for arm in ("canary", "baseline"):
        fig = evidence.get(arm) or {}
        if fig:
            arms.append(f"<li><strong>{arm}</strong>: " + ", ".join(
                f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                for k, v in fig.items()) + "</li>")
    return (f'<table class="checks"><caption>Last analysis: {e(evidence.get("verdict", "?"))}</caption><thead><tr>'
            '<th scope="col">Check</th><th scope="col">Result</th><th scope="col">Value</th>'
            '<th scope="col">Interval</th><th scope="col">Bound</th><th scope="col">n</th><th scope="col">Detail</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>' + (f'<ul class="arms">{"".join(arms)}</ul>'
                                                                      if arms else ""))


def endpoints(state: ConsoleState, now: float, view: View) -> str:
    names = sorted(set(state.policies) | set(state.rollouts))
    if not names:
        return '<p class="muted">No endpoint yet. <code>modelcd traffic set ENDPOINT MODEL:VERSION=100</code> ' \
               "creates one.</p>"
    out = []
    for name in names:
        p = state.policies.get(name)
        r = state.rollouts.get(name)
        routes = [(f"{x.model}:{x.version}", x.weight) for x in p.routes] if p and not p.deleted else []
        head = (f'<article class="endpoint" data-endpoint="{e(name)}" data-phase="{e(r.phase if r else "")}">'
                f'<h3>{e(name)}</h3>')
        policy_line = (f'<p class="meta">Policy revision {p.revision} · {clock(p.at)} · {e(p.reason)}'
                       f'{" · sticky on " + e(p.sticky_key) if p.sticky_key else ""}</p>' if p else "")
        if p is not None and p.deleted:
            policy_line += '<p class="muted">The policy was deleted.</p>'
        bar = split_bar(routes, f"traffic split of {name}")
        legend = "".join(f'<li><span class="swatch c{i % 6}" aria-hidden="true"></span>{e(ref)}: {w:g}%</li>'
                         for i, (ref, w) in enumerate(routes))
        parts = [head, policy_line, bar, f'<ul class="legend">{legend}</ul>']
        if p is not None and p.shadows:
            parts.append('<p class="meta">Shadows: ' + ", ".join(
                f"{e(s.primary)} → {e(s.shadow)} ({s.sample_rate:.0%}"
                f"{', until ' + clock(s.end) if s.end else ''})" for s in p.shadows) + "</p>")
        if r is not None:
            steps = " → ".join(f"<strong>{w:g}%</strong>" if i == r.step else f"{w:g}%"
                               for i, w in enumerate(r.plan.steps))
            due = (f" · next analysis in {ago(r.due_at - now)}" if r.due_at and r.due_at > now
                   else " · analysis due" if r.due_at else "")
            kind = {"running": "run", "paused": "skip", "completed": "ok"}.get(str(r.phase), "bad")
            parts.append(
                f'<section class="rollout" aria-label="rollout of {e(name)}"><h4>Rollout {badge(str(r.phase), kind)}'
                f'</h4><p>{e(r.canary)} against {e(r.baseline)} · plan {e(r.plan.name)} · step {r.step + 1} of '
                f"{len(r.plan.steps)}: {steps}{due}</p>")
            buttons = "".join(
                f'<button type="button" class="action" data-endpoint="{e(name)}" data-action="{a}"'
                f'{"" if str(r.phase) in phases else " disabled"}>{label}</button>'
                for a, label, phases in _ACTIONS)
            parts.append(f'<div class="actions" role="group" aria-label="rollout actions for {e(name)}">{buttons}'
                         f'<span class="action-result" role="status"></span></div>')
            pending = state.pending_commands(name)
            if pending:
                parts.append('<p class="meta">Sent, not yet answered by the controller: ' + ", ".join(
                    f"{e(c.action)} ({ago(now - c.at)} ago)" for c in pending) + "</p>")
            if r.last_evidence:
                parts.append(_checks_table(r.last_evidence))
            else:
                parts.append('<p class="muted">No analysis yet.</p>')
            hist = "".join(
                f"<tr><td>{clock(h.at)}</td><td>{e(h.action)}</td><td class='num'>{h.step + 1}</td>"
                f"<td class='num'>{h.weight:g}%</td><td>{e(h.reason)}</td></tr>"
                for h in reversed(r.history[-MAX_HISTORY:]))
            parts.append('<table class="history"><caption>Decisions, newest first</caption><thead><tr>'
                         '<th scope="col">At</th><th scope="col">Decision</th><th scope="col">Step</th>'
                         f'<th scope="col">Canary weight</th><th scope="col">Reason</th></tr></thead><tbody>{hist}'
                         "</tbody></table></section>")
        else:
            parts.append('<p class="muted">No rollout on record. <code>modelcd rollout start '
                         f'{e(name)} --to MODEL:VERSION</code> starts one.</p>')
        revisions = list(state.policy_history.get(name, ()))[-5:]
        if len(revisions) > 1:
            parts.append('<details><summary>Policy history</summary><ul>' + "".join(
                f"<li>rev {x.revision} · {clock(x.at)} · "
                + ", ".join(f"{e(rt.model)}:{e(rt.version)} {rt.weight:g}%" for rt in x.routes)
                + f" · {e(x.reason)}</li>" for x in reversed(revisions)) + "</ul></details>")
        parts.append("</article>")
        out.append("".join(parts))
    return "".join(out)


# --- shadows --------------------------------------------------------------------------------------


def shadows(state: ConsoleState, now: float, view: View) -> str:
    if not state.windows:
        relations = [(ep, s) for ep, p in sorted(state.policies.items()) for s in p.shadows]
        if relations:
            return ('<p class="muted">Shadow relations exist, no comparison window yet (the comparison processor '
                    "publishes one per pair and window): " + ", ".join(
                        f"{e(s.primary)} → {e(s.shadow)} on {e(ep)}" for ep, s in relations) + "</p>")
        return '<p class="muted">No shadow comparison yet. <code>modelcd shadow add ENDPOINT MODEL:VERSION</code> ' \
               "starts one.</p>"
    out = []
    for idx, ((primary, shadow), windows) in enumerate(sorted(state.windows.items())):
        ordered, gaps, kind = series(windows)
        last = ordered[-1]
        what = {"agreement": "agreement (share of rows with the same label)",
                "mean_abs_diff": "mean |difference| of outputs", "errors": "shadow error rate"}[kind]
        plot = svg.line_plot([(w.window_end, figure(w, kind)) for w in ordered],
                             gaps=[(g.start, g.end) for g in gaps],
                             y_min=0.0, y_max=1.0 if kind in ("agreement", "errors") else None,
                             label=f"{primary} vs {shadow}: {what} per window", plot_id=f"plot-{idx}")
        rels = endpoint_of(state, primary, shadow)
        rel_text = "; ".join(f"on {e(ep)}, {rel.sample_rate:.0%} sampled"
                             + (f", until {clock(rel.end)}" if rel.end else "") for ep, rel in rels) or \
            "relation no longer in any policy"
        lat_rows = "".join(
            f'<tr><th scope="row">{e(side)} ({e(ref)})</th>' + "".join(
                f'<td class="num">{figs[q]:.2f} ms</td>' if q in figs else "<td>–</td>" for q in ("p50", "p90", "p99"))
            + "</tr>" for side, ref, figs in (("primary", primary, last.primary_latency_ms),
                                             ("shadow", shadow, last.shadow_latency_ms)))
        value = figure(last, kind)
        value_text = f"{value:.3f}" if value is not None else "–"
        gap_text = (f"{len(gaps)} period(s) without any comparison are shaded (no shadow prediction arrived: "
                    "shadowing paused under pressure, the relation outside its time window, or no traffic; "
                    "pauses themselves are in no event)" if gaps else "no period without comparisons")
        out.append(
            f'<article class="shadow" data-pair="{e(primary)}/{e(shadow)}"><h3>{e(primary)} → {e(shadow)}</h3>'
            f'<p class="meta">{rel_text} · last window {clock(last.window_start)}–{clock(last.window_end)}: '
            f"{last.count} compared, {last.errors} shadow errors, {kind.replace('_', ' ')} {value_text}</p>"
            f"{plot}<p class=\"muted small\">{e(gap_text)}.</p>"
            '<table class="latency"><caption>Latency in the last window</caption><thead><tr><th scope="col">Side'
            '</th><th scope="col">p50</th><th scope="col">p90</th><th scope="col">p99</th></tr></thead>'
            f"<tbody>{lat_rows}</tbody></table></article>")
    return "".join(out)


# --- fleet ----------------------------------------------------------------------------------------


def _node_row(s: NodeStatus, now: float, view: View) -> str:
    age = now - s.at
    stale = age > 3 * view.heartbeat_s
    status = ("stopping", "skip") if s.stopping else ("silent", "bad") if stale else (
        ("ready", "ok") if s.ready else ("not ready", "run"))
    models_html = "".join(
        f'<li data-model="{e(m.name)}:{e(m.version)}">{e(m.name)}:{e(m.version)} '
        f'{badge("quarantined" if m.quarantined else m.state, "bad" if m.quarantined else _LOADED.get(m.state, "skip"))}'
        f"{' ' + size(m.memory_bytes) if m.memory_bytes else ''}"
        + (f' <span class="muted small">{m.restarts} worker restart(s)</span>' if m.restarts else "")
        + (f' <span class="reason">{e(m.error)}</span>' if m.error else "") + "</li>"
        for m in s.models) or '<li class="muted">none</li>'
    meter = (f'<meter min="0" max="{s.memory_budget}" value="{s.memory_bytes}" high="{int(s.memory_budget * 0.9)}" '
             f'aria-label="memory of {e(s.node)}">{size(s.memory_bytes)}</meter> '
             if s.memory_budget else "")
    q_html = ", ".join(
        f'{e(m.name)}:{e(m.version)} ({"quarantined" if m.quarantined else "failed to load"})'
        for m in s.models if m.quarantined or m.state == "failed") or '<span class="muted">none</span>'
    return (f'<tr data-node="{e(s.node)}"><th scope="row">{e(s.node)}<div class="muted small">{e(s.url)}</div></th>'
            f"<td>{badge(*status)}</td><td>{ago(age)} ago</td>"
            f"<td>{meter}{size(s.memory_bytes)} of {size(s.memory_budget) if s.memory_budget else '–'}</td>"
            f'<td><ul class="plain">{models_html}</ul></td><td>{q_html}</td></tr>')


_LOADED = {"ready": "ok", "loading": "run", "failed": "bad", "unloaded": "skip"}


def fleet(state: ConsoleState, now: float, view: View) -> str:
    if not state.nodes:
        return '<p class="muted">No node heartbeat yet (<code>modelcd serve</code> starts a node).</p>'
    rows = "".join(_node_row(s, now, view) for _n, s in sorted(state.nodes.items()))
    return ('<div class="scroll"><table class="fleet"><caption>Nodes, from their heartbeats (NodeStatus)</caption>'
            '<thead><tr><th scope="col">Node</th><th scope="col">Status</th><th scope="col">Last heartbeat</th>'
            '<th scope="col">Memory</th><th scope="col">Models</th><th scope="col">Failed or quarantined</th></tr>'
            f'</thead><tbody>{rows}</tbody></table></div>'
            f'<p class="muted small">A node is "silent" after {3 * view.heartbeat_s:g} s without a heartbeat.</p>')


RENDERERS: dict[str, Callable[[ConsoleState, float, View], str]] = {
    "deployments": deployments, "models": models, "endpoints": endpoints, "shadows": shadows, "fleet": fleet,
}
assert tuple(RENDERERS) == SECTIONS

TITLES = {"deployments": "Deployments", "models": "Models", "endpoints": "Endpoints", "shadows": "Shadows",
          "fleet": "Fleet"}


def status_line(feed: str, counters: dict[str, int]) -> str:
    return (f'<span class="feed {e(feed.split(":")[0].replace(" ", "-"))}">{e(feed)}</span> · '
            f"{counters.get('events', 0)} events · {counters.get('clients', 0)} browser(s) live · "
            f"{counters.get('dropped', 0)} update(s) dropped for slow browsers")


# --- pages ----------------------------------------------------------------------------------------


def _head(title: str) -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)}</title><link rel="stylesheet" href="/console/static/console.css"></head>')


def page(state: ConsoleState, now: float, view: View, *, feed: str, counters: dict[str, int]) -> str:
    nav = "".join(f'<li><a href="#{s}-h">{TITLES[s]}</a></li>' for s in SECTIONS)
    logout = ('<form method="post" action="/console/logout" class="logout"><button type="submit">Sign out</button>'
              "</form>" if view.login_required else "")
    sections = "".join(
        f'<section aria-labelledby="{s}-h"><h2 id="{s}-h">{TITLES[s]}</h2>'
        f'<div id="{s}" class="body">{RENDERERS[s](state, now, view)}</div></section>' for s in SECTIONS)
    return (_head("modelcd console") +
            '<body><a class="skip" href="#main">Skip to content</a><header><h1>modelcd console</h1>'
            f'<p id="status" class="status">{status_line(feed, counters)}</p>{logout}'
            f'<nav aria-label="sections"><ul>{nav}</ul></nav></header>'
            '<div id="announce" class="visually-hidden" aria-live="polite" aria-atomic="true"></div>'
            f'<main id="main">{sections}</main>'
            '<script src="/console/static/console.js" defer></script></body></html>')


def login_page(error: str = "") -> str:
    err = f'<p class="reason" role="alert" id="login-error">{e(error)}</p>' if error else ""
    return (_head("Sign in · modelcd console") +
            '<body><main id="main" class="login"><h1>modelcd console</h1>'
            "<p>This deployment API requires its token (<code>MODELCD_API_TOKEN</code>).</p>"
            f'{err}<form method="post" action="/console/login">'
            '<label for="token">API token</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus'
            f'{" aria-describedby=login-error aria-invalid=true" if error else ""}>'
            '<button type="submit">Sign in</button></form></main></body></html>')


def url_part(text: str) -> str:
    return quote(text, safe="")
