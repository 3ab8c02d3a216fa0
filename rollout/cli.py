"""`modelcd traffic set|show` and `modelcd rollout start|status|pause|resume|abort|promote`.

`traffic set` writes a policy itself (bus, then store). Rollout commands are RolloutStep
events with `command=True` that the rollout controller applies; the CLI checks what it can
beforehand (so most mistakes are reported at once), then waits for the controller's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from modelcd.errors import CliError
from modelcd.events.bus import KafkaConfig, Publisher, read_topic
from modelcd.events.schemas import RolloutStep, Route, TrafficPolicy, UsageReport
from modelcd.events.topics import USAGE
from modelcd.runner import run_main
from modelcd.settings import Settings
from modelcd.store.safety import World
from modelcd.units import duration_arg

from .analysis import samples_eta, time_to_verdict
from .machine import PLANS, Phase, Rollout, RolloutError, make_plan, parse_duration, parse_steps, split_ref, summary
from .traffic_ops import (
    EndpointView,
    TrafficError,
    check_routes,
    control_command,
    delete_policy,
    load_view,
    set_policy,
    start_command,
    status_dict,
)

SOURCE = "cli"


def register(sub: Any) -> None:
    p = sub.add_parser("traffic", help="an endpoint's traffic policy: weighted, sticky split among models")
    tsub = p.add_subparsers(dest="traffic_command", metavar="ACTION", required=True)
    s = tsub.add_parser("set", help="split an endpoint's traffic, e.g. iris:1=90 iris:2=10 (weights add up to 100)",
                        description="Publish a new traffic policy for ENDPOINT and write it to the store. Requests "
                                    "carrying the sticky key always reach the same model while the weights stay; "
                                    "requests without it are split at random by weight.")
    s.add_argument("endpoint")
    s.add_argument("routes", nargs="+", metavar="MODEL:VERSION=WEIGHT")
    s.add_argument("--sticky-key", default="x-modelcd-key",
                   help="request header (or parameter) that pins a caller to a model (default x-modelcd-key)")
    s.add_argument("--force", action="store_true",
                   help="set it even while a rollout drives this endpoint: the rollout's next step sets its own "
                        "weights again (abort it instead to keep yours); versions that do not serve are refused "
                        "even then")
    s.set_defaults(func=cmd_traffic_set)
    s = tsub.add_parser("delete", help="delete an endpoint's policy (its routes and shadows); refused while a "
                                       "rollout drives it",
                        description="Publish a tombstone for ENDPOINT: nodes stop routing it (requests to it get "
                                    "404) and its shadow relations end. The models stay deployed.")
    s.add_argument("endpoint")
    s.set_defaults(func=cmd_traffic_delete)
    s = tsub.add_parser("show", help="print an endpoint's current policy (and its rollout, if any); "
                                     "without ENDPOINT, list every endpoint")
    s.add_argument("endpoint", nargs="?", help="endpoint name; omit it to list the endpoints (from the store)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_traffic_show)

    p = sub.add_parser("rollout", help="gradual rollouts with automated canary analysis and rollback")
    rsub = p.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    s = rsub.add_parser("start", help="roll MODEL:VERSION out on ENDPOINT step by step",
                        description="Ask the rollout controller to move ENDPOINT's traffic to MODEL:VERSION step by "
                                    "step; before each step the canary is compared with the baseline (error rate, "
                                    "latency, prediction divergence) and rolled back at once if a check fails. "
                                    f"Plans: {', '.join(f'{n} ({_plan_line(p)})' for n, p in PLANS.items())}.")
    s.add_argument("endpoint")
    s.add_argument("--to", required=True, metavar="MODEL:VERSION", help="the canary")
    s.add_argument("--plan", default="standard", choices=sorted(PLANS))
    s.add_argument("--steps", help="canary weights in percent, e.g. 1,10,50,100 (default: the plan's)")
    s.add_argument("--interval", help="time between analyses, e.g. 30s, 10m (default: the plan's)")
    s.add_argument("--max-hold", help="the longest a step may hold without a verdict (too few samples, figures on "
                                      "a bound), e.g. 30m; then the rollout is aborted with its evidence and the "
                                      "baseline gets its traffic back (default: the plan's)")
    s.add_argument("--max-error-increase", type=float, dest="max_error_rate_increase",
                   help="fail when the canary's model error rate (5xx) is above the baseline's by more than this "
                        "(0..1, default 0.02; fast plan 0.05); client errors (4xx) are compared apart")
    s.add_argument("--max-error-rate", type=float,
                   help="also fail when the canary's model error rate is above this, whatever the baseline's (0..1)")
    s.add_argument("--max-p50-ms", type=float, dest="max_latency_p50_ms", help="fail above this median latency")
    s.add_argument("--max-p99-ms", type=float, dest="max_latency_p99_ms", help="fail above this p99 latency")
    s.add_argument("--min-agreement", type=float, help="classifiers: fail below this paired agreement (0..1)")
    s.add_argument("--output", help="the model output to compare (default: the first)")
    s.add_argument("--log-rate", type=float, help="share of canary and baseline requests logged for the analysis "
                                                  "while the rollout runs (default 0.1)")
    _wait_arg(s)
    s.set_defaults(func=cmd_rollout_start)
    s = rsub.add_parser("status", help="current step, the last analysis and the history of ENDPOINT's rollout")
    s.add_argument("endpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rollout_status)
    for action, text in [("pause", "stop advancing (the current weights stay)"),
                         ("resume", "advance again (the step's interval restarts)"),
                         ("abort", "restore the traffic as it was before the rollout"),
                         ("promote", "skip the remaining analysis: the canary takes 100%% now")]:
        s = rsub.add_parser(action, help=text)
        s.add_argument("endpoint")
        s.add_argument("--reason", default="")
        _wait_arg(s)
        s.set_defaults(func=cmd_rollout_command, action=action)
    s = rsub.add_parser("controller", help="run the rollout controller (`modelcd up` runs one)",
                        description="Advance rollouts, analyse canaries and roll back; its state lives on the "
                                    "traffic topic, so a restarted controller resumes every rollout at its step. "
                                    "Run one per cluster.")
    s.set_defaults(func=cmd_rollout_controller)


def cmd_rollout_controller(args: argparse.Namespace, settings: Settings) -> int:
    from .service import run_controller

    async def run(stop: asyncio.Event) -> int:
        await run_controller(settings, stop=stop, ready=asyncio.Event())
        return 0

    return run_main(run)


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=duration_arg, default=15.0, metavar="DURATION",
                   help="how long to wait for the controller's answer, e.g. 30s (default 15 s; 0: do not wait)")


def _plan_line(plan: Any) -> str:
    steps = "→".join(f"{w:g}%" for w in plan.steps)
    return (f"{steps} every {_duration(plan.interval_s)}, holding at most {_duration(plan.max_hold_s)}"
            + (", shadow first" if plan.shadow_first else ""))


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# --- reading the topic ----------------------------------------------------------------------------


async def wait_for_answer(cfg: KafkaConfig, endpoint: str, command_id: str, timeout: float) -> list[RolloutStep]:
    """The controller's facts answering `command_id`, or [] after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        view = await load_view(cfg, endpoint)
        facts = [s for s in view.steps if not s.command and s.command_id == command_id]
        if facts or time.monotonic() >= deadline:
            return facts
        await asyncio.sleep(0.3)


# --- traffic ------------------------------------------------------------------------------------


def parse_routes(items: list[str]) -> list[Route]:
    routes: list[Route] = []
    for item in items:
        ref, sep, weight = item.rpartition("=")
        if not sep:
            raise CliError(f"expected MODEL:VERSION=WEIGHT, got {item!r}", code=2)
        try:
            name, version = split_ref(ref)
            w = float(weight.rstrip("%"))
        except (RolloutError, ValueError):
            raise CliError(f"expected MODEL:VERSION=WEIGHT with a number, got {item!r}", code=2) from None
        routes.append(Route(model=name, version=version, weight=w))
    try:
        check_routes(routes)
    except TrafficError as exc:  # weights that cannot be a split: what was typed is wrong (usage)
        raise CliError(str(exc), code=2) from None
    return routes


def cmd_traffic_set(args: argparse.Namespace, settings: Settings) -> int:
    routes = parse_routes(args.routes)
    cfg = KafkaConfig.from_settings(settings)

    async def run(stop: asyncio.Event) -> int:
        view = await _view(settings, args.endpoint)
        try:
            policy = set_policy(view, routes, world=await _world(settings), sticky_key=args.sticky_key,
                                force=args.force)
        except TrafficError as exc:
            raise CliError(f"{exc}" + (" (--force)" if exc.kind == "conflict" else "")) from None
        async with Publisher(cfg, SOURCE) as pub:
            await pub.publish(policy)
        await _write_store(settings, policy)
        print(render_policy(policy))
        return 0

    return run_main(run)


def cmd_traffic_delete(args: argparse.Namespace, settings: Settings) -> int:
    cfg = KafkaConfig.from_settings(settings)

    async def run(stop: asyncio.Event) -> int:
        try:
            policy = delete_policy(await _view(settings, args.endpoint), reason="deleted from the CLI")
        except TrafficError as exc:
            raise CliError(str(exc)) from None
        async with Publisher(cfg, SOURCE) as pub:
            await pub.publish(policy)
        await _write_store(settings, policy)
        print(f"endpoint {args.endpoint} deleted (revision {policy.revision}); its models stay deployed")
        return 0

    return run_main(run)


async def _view(settings: Settings, endpoint: str) -> EndpointView:
    """The endpoint from the traffic topic merged with the store: the reader the API uses too."""
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
        return await load_view(KafkaConfig.from_settings(settings), endpoint, TargetState(store))


async def _world(settings: Settings) -> World:
    """What the safety check needs of the store's target state: which versions serve."""
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
        models = await TargetState(store).models()
    return World(models={f"{m.name}:{m.version}": m for m in models})


async def _write_store(settings: Settings, policy: TrafficPolicy) -> None:
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
        await TargetState(store).put_traffic(policy)


def _list_endpoints(args: argparse.Namespace, settings: Settings) -> int:
    from modelcd.store.blobs import open_store
    from modelcd.store.targets import TargetState

    async def run(stop: asyncio.Event) -> int:
        async with open_store(settings.resolved_store_url, endpoint_url=settings.s3_endpoint_url) as store:
            policies = [p for p in (await TargetState(store).traffic()).values() if not p.deleted]
        policies.sort(key=lambda p: p.endpoint)
        if args.json:
            print(msgspec.json.encode(policies).decode())
            return 0
        if not policies:
            print("no endpoints yet (modelcd traffic set ENDPOINT MODEL:VERSION=100)", file=sys.stderr)
            return 0
        for p in policies:
            ordered = sorted(p.routes, key=lambda r: -r.weight)
            routes = ", ".join(f"{r.model}:{r.version}={r.weight:g}%" for r in ordered)
            print(f"{p.endpoint:<24} rev {p.revision:<4} {routes or '-'}"
                  + (f"  ({len(p.shadows)} shadows)" if p.shadows else ""))
        return 0

    return run_main(run)


def cmd_traffic_show(args: argparse.Namespace, settings: Settings) -> int:
    if not args.endpoint:
        return _list_endpoints(args, settings)

    async def run(stop: asyncio.Event) -> int:
        view = await _view(settings, args.endpoint)
        if view.policy is None:
            raise CliError(f"no traffic policy for {args.endpoint!r} (modelcd traffic set {args.endpoint} "
                           f"MODEL:VERSION=100)", code=1)
        if args.json:
            print(msgspec.json.encode(view.policy).decode())
            return 0
        print(render_policy(view.policy))
        if view.rollout is not None and view.rollout.active:
            r = view.rollout
            print(f"rollout {r.rollout_id} {r.phase}: {r.canary} at {r.weight:g}% (modelcd rollout status "
                  f"{args.endpoint})")
        return 0

    return run_main(run)


def render_policy(p: TrafficPolicy) -> str:
    lines = [f"endpoint {p.endpoint}  revision {p.revision}  sticky key {p.sticky_key or '-'}"]
    for r in sorted(p.routes, key=lambda r: -r.weight):
        lines.append(f"  {r.model}:{r.version:<12} {r.weight:7.3g}%")
    for s in p.shadows:
        lines.append(f"  shadow {s.shadow} of {s.primary} (sample {s.sample_rate:g})")
    if p.reason:
        lines.append(f"  ({p.reason})")
    return "\n".join(lines)


# --- rollout ------------------------------------------------------------------------------------


def cmd_rollout_start(args: argparse.Namespace, settings: Settings) -> int:
    try:
        split_ref(args.to)
        plan = make_plan(args.plan, steps=parse_steps(args.steps) if args.steps else None,
                         interval_s=parse_duration(args.interval) if args.interval else None,
                         max_hold_s=parse_duration(args.max_hold) if args.max_hold else None,
                         log_rate=args.log_rate, max_error_rate=args.max_error_rate,
                         max_error_rate_increase=args.max_error_rate_increase,
                         max_latency_p50_ms=args.max_latency_p50_ms,
                         max_latency_p99_ms=args.max_latency_p99_ms, min_agreement=args.min_agreement,
                         output=args.output)
    except RolloutError as exc:  # an unknown plan or a bad threshold: usage
        raise CliError(str(exc), code=2) from None
    cfg = KafkaConfig.from_settings(settings)

    async def run(stop: asyncio.Event) -> int:
        view = await _view(settings, args.endpoint)
        try:
            cmd = start_command(view, args.to, plan, world=await _world(settings), reason="started from the CLI")
        except TrafficError as exc:
            raise CliError(str(exc)) from None
        return await _send(cfg, cmd, args.wait)

    return run_main(run)


def cmd_rollout_command(args: argparse.Namespace, settings: Settings) -> int:
    cfg = KafkaConfig.from_settings(settings)

    async def run(stop: asyncio.Event) -> int:
        view = await _view(settings, args.endpoint)
        try:
            cmd = control_command(view, args.action, reason=args.reason or f"{args.action} from the CLI")
        except TrafficError as exc:
            raise CliError(str(exc)) from None
        return await _send(cfg, cmd, args.wait)

    return run_main(run)


async def _send(cfg: KafkaConfig, cmd: RolloutStep, wait: float) -> int:
    async with Publisher(cfg, SOURCE) as pub:
        await pub.publish(cmd)
    if wait <= 0:
        print(f"{cmd.action} requested for {cmd.endpoint} (command {cmd.command_id})")
        return 0
    facts = await wait_for_answer(cfg, cmd.endpoint, cmd.command_id, wait)
    if not facts:
        print(f"{cmd.action} requested for {cmd.endpoint}, but no rollout controller answered within {wait:g}s "
              f"(is `modelcd up` running? the command stays queued; see the controller's log if it was refused)",
              file=sys.stderr)
        return 1
    for f in facts:
        print(render_step(f))
    return 0


def cmd_rollout_status(args: argparse.Namespace, settings: Settings) -> int:
    async def run(stop: asyncio.Event) -> int:
        cfg = KafkaConfig.from_settings(settings)
        view = await _view(settings, args.endpoint)
        r = view.rollout
        if r is None:
            raise CliError(f"no rollout of {args.endpoint!r} on record", code=1)
        if args.json:
            print(json.dumps(status_dict(r), default=str))
        else:
            print(render_status(r, rates=await _arm_rates(cfg, r)))
        return 0

    return run_main(run)


async def _arm_rates(cfg: KafkaConfig, r: Rollout) -> tuple[float, float] | None:
    """Canary and baseline requests per second since the step began, from the nodes' usage reports;
    None when the step already has an analysis (it says more), or at 0 % (the canary only shadows)."""
    ev = r.last_evidence
    if not r.active or r.weight == 0 or (ev.get("checks") and ev.get("analyzed_step", r.step) == r.step):
        return None
    now = time.time()
    counts = {r.canary: 0, r.baseline: 0}
    for event, _env, _rec in await read_topic(cfg, USAGE, since=r.window_start):
        if isinstance(event, UsageReport) and event.interval_end >= r.window_start:
            ref = f"{event.model}:{event.version}"
            if ref in counts:
                counts[ref] += event.count + event.errors - event.client_errors
    span = max(now - r.window_start, 1e-3)
    return counts[r.canary] / span, counts[r.baseline] / span


def render_step(s: RolloutStep, steps: int | None = None) -> str:
    """One history line; steps are numbered from 1, as in the status line ("step 2 of 4")."""
    when = datetime.fromtimestamp(s.at, UTC).strftime("%H:%M:%S")
    of = f" of {steps}" if steps else ""
    return f"{when}  {s.action:<8} step {s.step + 1}{of}  canary {s.weight:g}%  {s.reason}"


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_wait(r: Rollout, now: float, rates: tuple[float, float] | None = None) -> list[str]:
    """The step's outlook: time to enough samples at the current traffic, and when max_hold ends it.

    After a hold, from that analysis (`time_to_verdict`); before the step's first analysis, from
    `rates` (canary and baseline requests per second, from the usage reports) and the plan's minimums.
    """
    ev = r.last_evidence
    if r.phase is not Phase.RUNNING:
        return []
    lines = []
    if ev.get("verdict") == "hold" and ev.get("analyzed_step", r.step) == r.step:
        w = time_to_verdict(ev)
    elif rates is not None:
        w = samples_eta(r.plan.thresholds, r.plan.log_rate, *rates)
    else:
        return []
    if w is not None:
        rate = w["rate_per_s"]
        if w["seconds"] is None and rate is None:
            lines.append(f"  waiting for samples: {w['check']} has none yet (is traffic reaching the endpoint?)")
        elif w["seconds"] is None:
            lines.append(f"  {w['check']} sits on its bound: more samples may not decide it")
        else:
            at = time.strftime("%H:%M:%S", time.gmtime(now + w["seconds"]))
            lines.append(f"  enough samples in ~{_eta(w['seconds'])} (about {at} UTC) at the current traffic: "
                         f"{w['check']} has {w['n']} of ~{w['need']}, {rate:.3g}/s"
                         + (" since the step began" if rates is not None and w["n"] == 0 else ""))
            if now + w["seconds"] > r.hold_deadline:
                lines.append("  that is past max_hold: more traffic, a higher --log-rate or a longer --max-hold "
                             "would let it decide")
    deadline = r.hold_deadline
    lines.append(f"  without a verdict by {time.strftime('%H:%M:%S', time.gmtime(deadline))} UTC (max_hold "
                 f"{_duration(r.plan.max_hold_s)}, in {_eta(max(0.0, deadline - now))}) the rollout is aborted "
                 f"and the baseline gets its traffic back")
    return lines


def render_status(r: Rollout, now: float | None = None, rates: tuple[float, float] | None = None) -> str:
    now = time.time() if now is None else now
    n = len(r.plan.steps)
    steps = " → ".join(f"[{w:g}%]" if i == r.step and r.active else f"{w:g}%" for i, w in enumerate(r.plan.steps))
    lines = [
        f"rollout {r.rollout_id} of {r.endpoint}: {r.phase}",
        f"  canary {r.canary} vs baseline {r.baseline}, plan {r.plan.name}: {steps} every "
        f"{_duration(r.plan.interval_s)}",
        f"  canary weight {r.weight:g}% (step {r.step + 1} of {n})",
    ]
    if r.due_at is not None:
        lines.append(f"  next analysis in {max(0.0, r.due_at - now):.0f}s")
    lines.extend(render_wait(r, now, rates))
    ev = r.last_evidence
    if ev.get("checks"):
        at = ev.get("analyzed_step")
        where = f" (step {at + 1} of {n}, {ev.get('analyzed_weight', 0):g}%)" if at is not None else ""
        lines.append(f"  last analysis{where}: {ev.get('verdict')}")
        for c in ev["checks"]:
            if c["status"] != "skipped":
                lines.append(f"    {c['status']:<12} {c['name']:<14} {c.get('detail', '')}")
        for arm in ("canary", "baseline"):
            f = ev.get(arm, {})
            lines.append(f"    {arm:<9} requests {f.get('requests', 0)}, model errors {f.get('errors', 0)}, "
                         f"client errors {f.get('client_errors', 0)}, p50 {f.get('latency_p50_ms', '-')} ms, "
                         f"p99 {f.get('latency_p99_ms', '-')} ms")
    lines.append("  history:")
    lines.extend(f"    {render_step(s, n)}" for s in r.history)
    if not r.active:
        lines.append(render_report(summary(r)))
    return "\n".join(lines)


def render_report(s: dict[str, Any]) -> str:
    """The launch summary: what each step's analysis decided, on which checks, with which figures."""
    t = s["totals"]

    def arm(name: str) -> str:
        a = t[name]
        rate = "-" if a.get("error_rate") is None else f"{a['error_rate']:.3%}"
        p99 = a.get("worst_latency_p99_ms", "-")
        return (f"{a['requests']} requests, model error rate {rate}, {a.get('client_errors', 0)} client errors, "
                f"worst p99 {p99} ms")

    lines = ["  launch summary:", f"    new {s['canary']}: {arm('canary')}", f"    old {s['baseline']}: {arm('baseline')}"]
    for row in s["steps"]:
        held = f" after {row['holds']} hold{'s' if row['holds'] != 1 else ''}" if row.get("holds") else ""
        what = "aborted: no verdict within max_hold" if row.get("outcome") == "max_hold" else row["action"]
        lines.append(f"    step {row['step'] + 1} of {row['steps']} at {row['weight']:g}%: {what}{held}")
        for c in row.get("decided_by", []):
            lines.append(f"      {c['name']} {c['status']}: {c.get('detail', '')}")
    out = s.get("outcome")
    if out:
        lines.append(f"    outcome: {out['phase']} ({out['action']}: {out['reason']})")
    return "\n".join(lines)
