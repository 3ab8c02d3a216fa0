"""`modelcd ingest`, `deploy`, `deployments`, `models`, `retire`: the service and its users' commands.

The user commands talk to the deployment API over HTTP (MODELCD_INGEST_URL, bearer token from
MODELCD_API_TOKEN), never to Kafka, so they work from any machine that reaches the API.
`deploy` follows the deployment with long polls (`GET /deployments/{id}?after=REV`): on a terminal
it redraws one line per step in place, otherwise it prints one plain line per step change.
Exit codes (modelcd/errors.py): 0 done, 1 refused or failed (the reason on stderr), 2 usage or configuration
(including an API that cannot be reached or refuses the token).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from modelcd.errors import CliError, UsageError
from modelcd.runner import run_main
from modelcd.settings import Settings
from modelcd.units import UnitError, duration_arg, format_duration, parse_duration, positive_duration_arg

DEPLOY_STEPS = ["accepted", "validate", "compile", "serving-validation", "publish"]
RETIRE_STEPS = ["accepted", "retire"]
_MARKS = {"started": "…", "succeeded": "✓", "failed": "✗", "skipped": "-", "pending": " "}


# Views of other parts that some of these commands show, handed in by the shell (modelcd/cli.py), so that this
# part imports neither the rollout part (the /endpoints routes) nor the retirement part (`models --expiring`).
RoutesFor = Callable[[Settings], Mapping[str, Any]]
Command = Callable[[argparse.Namespace, Settings], int]


def _expiry_arg(text: str) -> int:
    """argparse type of `deploy --expiry`: a positive duration (7d, 12h, 3600), in whole seconds."""
    try:
        seconds = parse_duration(text, positive=True)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"not an expiry period: {text!r} (at least one second, e.g. 7d)")
    return int(seconds)


def register(sub: Any, *, routes: RoutesFor | None = None, expiring: Command | None = None) -> None:
    """Add ingest's subcommands; `routes(settings)` is mounted on the API `modelcd ingest` serves, `expiring` is
    what `models --expiring` shows."""
    p = sub.add_parser("ingest", help="run the ingest service: deployment API + deploy-request consumer",
                       description="Serve the deployment API on MODELCD_INGEST_HOST:MODELCD_INGEST_PORT and consume "
                                   "modelcd.deploy-requests (group modelcd-ingest) until Ctrl-C.")
    p.set_defaults(func=functools.partial(cmd_ingest, routes=routes))

    p = sub.add_parser("deploy", help="deploy a package (upload a file, or point at one) and follow its progress",
                       description="Upload PACKAGE (or ask ingest to fetch --uri) through the deployment API, then "
                                   "show each step live. Exits 1 with the reason if the deployment fails.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("package", nargs="?", type=Path, help="package archive (`modelcd package build` makes one)")
    src.add_argument("--uri", help="package location ingest fetches: s3://bucket/key, file:///abs/path.tar, "
                                   "store:<key>")
    p.add_argument("--owner", help="override the manifest's owner")
    p.add_argument("--expiry", type=_expiry_arg, metavar="DURATION",
                   help="override the manifest's expiry period (e.g. 7d, 12h, or seconds)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the deployment to its end (default); --no-wait prints the id and returns")
    p.add_argument("--timeout", type=positive_duration_arg, default=600.0,
                   help="how long to follow before giving up (e.g. 10m; default 600 s)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("deployments", help="list recent deployments, or show one: each step with status and duration",
                       description="Without ID: recent deployments, newest first (filter with --model, --status, "
                                   "--since). With ID: that deployment's steps, status and duration.")
    p.add_argument("id", nargs="?", help="deployment id (printed by `modelcd deploy`); omit it to list")
    p.add_argument("--model", help="list only this model's deployments")
    p.add_argument("--status", choices=["pending", "running", "completed", "failed"], help="list only these")
    p.add_argument("--since", metavar="DURATION", type=duration_arg, help="list only those of the last DURATION (1h)")
    p.add_argument("--limit", type=int, default=20, help="list at most N (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_deployments)

    p = sub.add_parser("models", help="list deployed models: version, state, owner, expiry, nodes serving")
    p.add_argument("name", nargs="?", help="only this model's versions")
    p.add_argument("--expiring", action="store_true",
                   help="serving models with their time to warning and to auto-retirement instead (same as "
                        "`modelcd expiring`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=functools.partial(cmd_models, expiring=expiring))

    p = sub.add_parser("retire", help="retire a model version (its nodes unload it)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", help="why, kept with the retired model (default: by <user> with modelcd retire)")
    p.add_argument("--force", action="store_true",
                   help="retire it even while an endpoint routes to it, a rollout moves it or a relation shadows it: "
                        "every request that reaches it then fails (503) until the policy changes")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the retirement to its end (default)")
    p.set_defaults(func=cmd_retire)


# --- the service ---------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace, settings: Settings, *, routes: RoutesFor | None = None) -> int:
    from .service import run_ingest

    async def main(stop: asyncio.Event) -> int:
        try:
            await run_ingest(settings, stop=stop, ready=asyncio.Event(), routes=routes(settings) if routes else None)
        except OSError as exc:  # the port is taken or the address is wrong: configuration
            raise UsageError(str(exc)) from None
        return 0

    return run_main(main)


# --- HTTP client -----------------------------------------------------------------------------------


def _client(settings: Settings) -> httpx.Client:
    headers = {"authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    return httpx.Client(base_url=settings.resolved_ingest_url, headers=headers,
                        timeout=httpx.Timeout(60.0, connect=5.0))


def _call(client: httpx.Client, method: str, url: str, **kw: Any) -> dict[str, Any]:
    try:
        resp = client.request(method, url, **kw)
    except httpx.TransportError as exc:
        raise UsageError(f"cannot reach the deployment API at {client.base_url}: {exc}; is `modelcd ingest` (or "
                       "`modelcd up`) running? MODELCD_INGEST_URL points the CLI elsewhere") from None
    try:
        body: dict[str, Any] = resp.json()
    except ValueError:
        body = {"error": resp.text[:200]}
    if resp.status_code in (401, 403):  # the token (MODELCD_API_TOKEN) is configuration
        raise UsageError(f"{resp.status_code}: {body.get('error', body)} (check MODELCD_API_TOKEN)")
    if resp.status_code >= 400:
        raise CliError(f"{resp.status_code}: {body.get('error', body)}")
    return body


# --- deploy / retire / follow -------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    params: dict[str, str] = {}
    if args.owner:
        params["owner"] = args.owner
    if args.expiry:
        params["expiry_seconds"] = str(args.expiry)
    with _client(settings) as client:
        if args.uri:
            body: dict[str, Any] = {"package_uri": args.uri}
            if args.owner:
                body["owner"] = args.owner
            if args.expiry:
                body["expiry_seconds"] = args.expiry
            accepted = _call(client, "POST", "/deployments", json=body)
        else:
            path: Path = args.package
            if not path.is_file():
                raise UsageError(f"package not found: {path} (build one with `modelcd package build SPEC`)")
            with path.open("rb") as f:
                accepted = _call(client, "POST", "/deployments", params=params, content=f,
                                 headers={"content-type": "application/x-tar"})
        deployment_id = accepted["deployment_id"]
        print(f"deployment {deployment_id} accepted", file=sys.stderr if args.wait else sys.stdout)
        if not args.wait:
            return 0
        return _follow(client, deployment_id, DEPLOY_STEPS, args.timeout)


def cmd_retire(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:
        reason = args.reason or f"by {getpass.getuser()} with modelcd retire"
        params = {"reason": reason, **({"force": "true"} if args.force else {})}
        accepted = _call(client, "DELETE", f"/models/{args.name}/versions/{args.version}", params=params)
        print(f"retirement {accepted['deployment_id']} accepted", file=sys.stderr if args.wait else sys.stdout)
        if not args.wait:
            return 0
        return _follow(client, accepted["deployment_id"], RETIRE_STEPS, 120.0)


def _follow(client: httpx.Client, deployment_id: str, steps: list[str], timeout: float) -> int:
    out = sys.stdout
    display = _TtyDisplay(out) if out.isatty() else _PlainDisplay(out)
    revision = -1
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            view = _call(client, "GET", f"/deployments/{deployment_id}",
                         params={"after": str(revision), "wait": "10"})
        except CliError as exc:
            if str(exc).startswith("404"):  # not folded into the view yet: ask again
                time.sleep(0.2)
                continue
            raise
        revision = int(view.get("revision", revision))
        display.show(view, steps)
        if view.get("status") in ("completed", "failed"):
            break
    else:
        display.close()
        raise CliError(f"deployment {deployment_id} still {view.get('status', 'pending')} after {timeout:g} s; "
                       f"`modelcd deployments {deployment_id}` shows it later")
    display.close()
    if view["status"] == "failed":
        print(f"modelcd: deployment {deployment_id} failed at {view.get('failed_step')}: {view.get('reason')}",
              file=sys.stderr)
        return 1
    print(summary(view), file=out)
    return 0


def summary(view: dict[str, Any]) -> str:
    name = f"{view.get('model')}:{view.get('version')}"
    if view.get("noop"):
        return f"{name} already serving this package (deployment {view.get('existing_deployment_id')}); nothing changed"
    total = view.get("timings_ms", {}).get("total")
    took = f" in {format_duration(total / 1000)}" if total else ""
    return f"{name} done{took} (runtime {view.get('runtime') or '-'}, sha256 {str(view.get('sha256', ''))[:12]})"


def step_lines(view: dict[str, Any], steps: list[str]) -> list[str]:
    """One line per step: mark, name, duration, detail (pure; both displays use it)."""
    by_step = {s["step"]: s for s in view.get("steps", [])}
    lines = []
    for name in [*steps, *(s for s in by_step if s not in steps)]:
        s = by_step.get(name, {"status": "pending", "detail": "", "duration_ms": None})
        ms = s.get("duration_ms")
        dur = f"{ms:8.0f} ms" if ms is not None else " " * 11
        detail = s.get("detail") or ("running" if s["status"] == "started" else "")
        lines.append(f" {_MARKS.get(s['status'], '?')} {name:<19}{dur}  {detail}".rstrip())
    return lines


class _PlainDisplay:
    """Pipes and logs: one line per step status, printed once."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.seen: set[tuple[str, str]] = set()

    def show(self, view: dict[str, Any], steps: list[str]) -> None:
        for s in view.get("steps", []):
            if (s["step"], s["status"]) in self.seen:
                continue
            self.seen.add((s["step"], s["status"]))
            ms = f" {s['duration_ms']:.0f} ms" if s.get("duration_ms") is not None else ""
            detail = f": {s['detail']}" if s.get("detail") else ""
            # "accepted succeeded" read oddly: the accepted step is a fact, not something that succeeds.
            status = "" if s["step"] == "accepted" and s["status"] == "succeeded" else f" {s['status']}"
            print(f"{s['step']}{status}{ms}{detail}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class _TtyDisplay:
    """A terminal: the step table redrawn in place."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.drawn = 0

    def show(self, view: dict[str, Any], steps: list[str]) -> None:
        lines = step_lines(view, steps)
        width = 120
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")  # back to the table's first line, clear below
        self.out.write("".join(line[:width] + "\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    def close(self) -> None:
        self.out.flush()


# --- read-only commands -----------------------------------------------------------------------------


def cmd_deployments(args: argparse.Namespace, settings: Settings) -> int:
    if not args.id:
        return _list_deployments(args, settings)
    with _client(settings) as client:
        view = _call(client, "GET", f"/deployments/{args.id}")
    if args.json:
        print(json.dumps(view, indent=2))
        return 1 if view["status"] == "failed" else 0
    steps = RETIRE_STEPS if any(s["step"] == "retire" for s in view.get("steps", [])) else DEPLOY_STEPS
    print(f"deployment {view['deployment_id']}  {view.get('model')}:{view.get('version')}  {view['status']}")
    for line in step_lines(view, steps):
        print(line)
    if view["status"] == "failed":
        print(f"reason: {view.get('reason')}")
    elif view["status"] == "completed":
        print(summary(view))
        print(f"nodes serving: {view.get('nodes_serving', 0)}")
    return 1 if view["status"] == "failed" else 0


def _list_deployments(args: argparse.Namespace, settings: Settings) -> int:
    params = {"limit": str(args.limit)}
    for name in ("model", "status"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if args.since is not None:
        params["since"] = f"{args.since:g}"
    with _client(settings) as client:
        rows = _call(client, "GET", "/deployments", params=params)["deployments"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no deployments recorded" + (" that match" if len(params) > 1 else ""), file=sys.stderr)
        return 0
    print(f"{'DEPLOYMENT':<34} {'MODEL:VERSION':<24} {'STATUS':<10} {'REQUESTED':<16}  DETAIL")
    for r in rows:
        at = r.get("requested_at") or r.get("finished_at")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(at)) if at else "-"
        ref = f"{r.get('model') or '?'}:{r.get('version') or '?'}"
        detail = r.get("reason") or ("no change" if r.get("noop") else "")
        print(f"{r['deployment_id']:<34} {ref:<24} {r['status']:<10} {when:<16}  {detail}".rstrip())
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings, *, expiring: Command | None = None) -> int:
    if args.expiring:
        if expiring is None:
            raise CliError("`models --expiring` needs the retirement part; run `modelcd expiring`")
        return expiring(args, settings)
    with _client(settings) as client:
        if args.name:
            models = _call(client, "GET", f"/models/{args.name}")["versions"]
        else:
            models = _call(client, "GET", "/models")["models"]
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no models deployed yet (`modelcd deploy PACKAGE`)", file=sys.stderr)
        return 0
    print(f"{'NAME':<20} {'VERSION':<10} {'STATE':<8} {'RUNTIME':<9} {'OWNER':<16} {'EXPIRY':>8} {'NODES':>5}  "
          "DEPLOYED")
    for m in models:
        deployed = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["deployed_at"])) if m["deployed_at"] else "-"
        quarantined = m.get("nodes_quarantined", 0)
        note = f"  QUARANTINED on {quarantined} node(s): its worker kept crashing" if quarantined else ""
        print(f"{m['name']:<20} {m['version']:<10} {m['state']:<8} {m['runtime'] or '-':<9} {m['owner'] or '-':<16} "
              f"{_days(m['expiry_seconds']):>8} {m['nodes_serving']:>5}  {deployed}{note}")
    return 0


def _days(seconds: int) -> str:
    if not seconds:
        return "-"
    return f"{seconds / 86400:g}d" if seconds >= 86400 else f"{seconds / 3600:g}h"
