"""The CLI as the README and --help promise it: every help and README command line parses, --json on
every list/show command, exit codes by kind, messages in the user's words, packages as users make them."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelcd.cli import build_parser
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import ensure_topics
from modelcd.events.schemas import ModelState
from modelcd.ingest.cli import _PlainDisplay, summary
from modelcd.retirement.cli import expiring
from modelcd.runtimes.flavors import outputs_match
from modelcd.store.blobs import open_store, put_package
from modelcd.store.package import PackageError, read_package
from modelcd.store.targets import TargetState

from ._ingest import iris_package, members_of, running_ingest, settings_for

ROOT = Path(__file__).resolve().parents[1]
MODELCD = [str(Path(sys.executable).parent / "modelcd")]

# Commands that list or show something: each takes --json.
LIST_SHOW = ["status", "schemas list", "topics list", "config", "package inspect", "state check", "deployments",
             "models", "traffic show", "rollout status", "shadow list", "shadow report", "expiring", "gc"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(extra)
    return env


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand, 'shadow report' -> its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        return {" ".join(prefix): parser}
    out = {}
    for name, sub in subs[0].choices.items():
        out.update(commands(sub, (*prefix, name)))
    return out


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`modelcd X [Y] --help` works for every subcommand and each one is explained in its parent's help."""
    parser = build_parser()
    for name in commands(parser):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*name.split(), "--help"])
        assert info.value.code == 0, name
        assert "usage: modelcd " + name in capsys.readouterr().out
    for action in parser._subparsers._group_actions[0]._choices_actions:  # type: ignore[union-attr]  # noqa: SLF001
        assert action.help, f"`modelcd {action.dest}` has no help line"


def readme_command_lines() -> list[str]:
    """Every `modelcd ...` line of the README: in code blocks and in inline code."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("modelcd "):
                lines.append(line)
    lines += [m for m in re.findall(r"`(modelcd [^`]+)`", text) if "<" not in m and "..." not in m]
    return lines


def names_a_command(argv: list[str]) -> bool:
    """True when argv is only command names (`deploy`, `traffic delete`): prose naming a command."""
    found = commands(build_parser())
    return any(name == " ".join(argv) or name.startswith(" ".join(argv) + " ") for name in found)


def expand(line: str) -> list[list[str]]:
    """`rollout pause|resume iris` -> both command lines."""
    argvs: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True)[1:]:
        choices = token.split("|") if "|" in token and not token.startswith("-") else [token]
        argvs = [[*argv, c] for argv in argvs for c in choices]
    return argvs


def test_readme_command_lines_parse() -> None:
    """Each `modelcd ...` command line in the README is accepted by the parser (a promise the CLI keeps)."""
    lines = readme_command_lines()
    assert len(lines) > 30
    for line in lines:
        for argv in expand(line):
            try:
                build_parser().parse_args(argv)
            except SystemExit as exc:
                if (exc.code == 0 and "--help" in argv) or names_a_command(argv):
                    continue
                pytest.fail(f"README line does not parse ({exc.code}): {line}")


def test_every_list_and_show_command_takes_json() -> None:
    """--json is on every command that lists or shows something."""
    found = commands(build_parser())
    missing = [name for name in LIST_SHOW
               if "--json" not in {o for a in found[name]._actions for o in a.option_strings}]  # noqa: SLF001
    assert missing == []


def test_readme_explains_endpoint_vs_version_calls_and_exit_codes() -> None:
    """The README says how to call an endpoint (not only a version) and documents the exit codes."""
    text = (ROOT / "README.md").read_text()
    assert "/v2/models/{endpoint}/infer" in text and "/v2/models/{name}/versions/{version}/infer" in text
    assert "## Exit codes" in text


# --- exit codes ------------------------------------------------------------------------------------


def test_unreachable_services_are_configuration_errors(tmp_path: Path) -> None:
    """Kafka or the API unreachable where the settings say: both exit 2 (Kafka gave 3, the API 2)."""
    port = free_port()
    kafka = subprocess.run([*MODELCD, "replay", "modelcd.model-state"], capture_output=True, text=True, timeout=120,
                           env=clean_env(MODELCD_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}"))
    api = subprocess.run([*MODELCD, "models"], capture_output=True, text=True, timeout=60,
                         env=clean_env(MODELCD_INGEST_URL=f"http://127.0.0.1:{port}"))
    assert (kafka.returncode, api.returncode) == (2, 2), (kafka.stderr, api.stderr)
    assert "MODELCD_KAFKA_BOOTSTRAP" in kafka.stderr and "MODELCD_INGEST_URL" in api.stderr


def test_refused_package_exits_1_and_missing_file_exits_2(tmp_path: Path) -> None:
    """An archive that is not a package is refused (1); an archive that is not there is a usage error (2)."""
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar")
    refused = subprocess.run([*MODELCD, "package", "inspect", str(bad)], capture_output=True, text=True,
                             timeout=60, env=clean_env())
    missing = subprocess.run([*MODELCD, "package", "inspect", str(tmp_path / "nope.tar")], capture_output=True,
                             text=True, timeout=60, env=clean_env())
    assert (refused.returncode, missing.returncode) == (1, 2)


# --- messages ---------------------------------------------------------------------------------------


def test_output_mismatch_names_plain_values() -> None:
    """A mismatch message says `expected 0, got 1`, never `np.int64(0)` or `np.float64(...)`."""
    msg = outputs_match({"label": np.array([0, 1])}, {"label": np.array([1, 1])}, 1e-5)
    assert msg is not None and "expected 0, got 1" in msg and "np." not in msg
    msg = outputs_match({"p": np.array([0.5])}, {"p": np.array([0.75])}, 1e-5)
    assert msg is not None and "expected 0.5, got 0.75" in msg and "np." not in msg


def test_deploy_progress_reads_as_words() -> None:
    """No "accepted succeeded" line, and a fast deployment is "done in 12 ms", not "done in 0.0 s"."""
    out = io.StringIO()
    _PlainDisplay(out).show({"steps": [{"step": "accepted", "status": "succeeded", "detail": "picked up by a",
                                        "duration_ms": None},
                                       {"step": "publish", "status": "succeeded", "detail": "", "duration_ms": 3.0}]},
                            [])
    assert "accepted succeeded" not in out.getvalue() and "accepted: picked up by a" in out.getvalue()
    assert "publish succeeded 3 ms" in out.getvalue()
    line = summary({"model": "m", "version": "1", "timings_ms": {"total": 12.0}, "runtime": "onnx", "sha256": "ab"})
    assert "done in 12 ms" in line


def test_retire_default_reason_is_not_an_echo() -> None:
    """`modelcd retire` no longer sends "retired from the CLI" (shown as "retired: retired from the CLI")."""
    args = build_parser().parse_args(["retire", "iris", "1"])
    assert args.reason is None


# --- packages as users make them ----------------------------------------------------------------------


def tar_dot(members: list[tuple[str, bytes]], *, subdir: bool = False) -> bytes:
    """What `tar cf pkg.tar -C dir .` writes: the directory "./" first, then "./name" for each file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tf.addfile(root)
        if subdir:
            d = tarfile.TarInfo("./notes")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_of_a_directory_reads_as_the_package() -> None:
    """`tar cf pkg.tar -C dir .` of a valid package is read (it was "member '.': not a regular file")."""
    pkg = iris_package("dotted")
    again = read_package(tar_dot(members_of(pkg.data)))
    assert again.manifest == pkg.manifest and again.contents == read_package(pkg.data).contents


def test_a_directory_member_gets_a_hint() -> None:
    """Another directory in the archive is refused with how to build one instead."""
    with pytest.raises(PackageError, match="modelcd package build"):
        read_package(tar_dot(members_of(iris_package("dotted").data), subdir=True))


def test_package_inspect_shows_the_signature(tmp_path: Path) -> None:
    """`modelcd package inspect` shows each input and output with datatype and shape, as the README says."""
    path = tmp_path / "iris-1.tar"
    path.write_bytes(iris_package("iris").data)
    out = subprocess.run([*MODELCD, "package", "inspect", str(path)], capture_output=True, text=True, timeout=60,
                         env=clean_env(), check=True).stdout
    assert "signature" in out
    assert re.search(r"input\s+input\s+FP32\s+\[-1, 4\]", out) and re.search(r"output\s+label\s+INT64", out)


# --- expiring, gc ---------------------------------------------------------------------------------------


def test_expiring_rows_carry_the_warning_time() -> None:
    """`models --expiring` rows say when the owner will be warned (the README promised it)."""
    now = time.time()
    state = ModelState(name="m", version="1", target="serving", expiry_seconds=1000, deployed_at=now - 100,
                       at=now - 100)
    (row,) = expiring([state], [], {}, now, 0.8)
    assert row.warn_at == pytest.approx(row.retire_at - 200)
    args = build_parser().parse_args(["models", "--expiring"])
    assert args.expiring


async def test_gc_dry_run_names_each_package_once(tmp_path: Path) -> None:
    """`modelcd gc --dry-run` prints each package once (it printed it and logged it)."""
    store_url = str(tmp_path / "store")
    async with open_store(store_url) as store:
        key_sha = await put_package(store, iris_package("old").data)
        await TargetState(store).put_model(ModelState(
            name="old", version="1", target="retired", sha256=key_sha, package_uri=f"store:packages/{key_sha}",
            at=time.time() - 7200))
    proc = await asyncio.create_subprocess_exec(
        *MODELCD, "gc", "--dry-run", "--retention", "1h", env=clean_env(MODELCD_STORE_URL=store_url,
                                                                        MODELCD_LOG_FORMAT="console"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    both = out.decode() + err.decode()
    assert both.count(key_sha[:12]) == 1, both


# --- recent deployments ------------------------------------------------------------------------------------


async def test_recent_deployments_are_listed(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """GET /deployments and `modelcd deployments` list recent deployments, newest first, filterable."""
    import json

    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path / "home")
    await ensure_topics(broker.config)
    async with running_ingest(settings) as watcher:
        url = f"http://127.0.0.1:{settings.ingest_port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            ids = []
            for name in ("alpha", "beta"):
                resp = await client.post("/deployments", content=iris_package(name).data,
                                         headers={"content-type": "application/x-tar"})
                assert resp.status_code == 202, resp.text
                ids.append(resp.json()["deployment_id"])
                await watcher.outcome(ids[-1])
            listed = (await client.get("/deployments")).json()["deployments"]
            assert [d["deployment_id"] for d in listed][:2] == [ids[1], ids[0]]
            only = (await client.get("/deployments", params={"model": "alpha", "since": "1h"})).json()["deployments"]
            assert [d["deployment_id"] for d in only] == [ids[0]] and only[0]["status"] == "completed"
            assert (await client.get("/deployments", params={"since": "soon"})).status_code == 400
        proc = await asyncio.create_subprocess_exec(*MODELCD, "deployments", "--model", "beta", "--json",
                                                    env=clean_env(MODELCD_INGEST_URL=url),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert [d["deployment_id"] for d in json.loads(out)] == [ids[1]]


def test_manifest_differences_ignore_the_compiled_model() -> None:
    """Same files: no difference, even against the stored form compiled to ONNX; other files: named."""
    from msgspec.structs import replace

    from modelcd.ingest.policy import manifest_differences

    m = read_package(iris_package("same").data).manifest
    compiled = replace(m, runtime="onnx", model_file="model.onnx", fallback_runtime=m.runtime,
                       fallback_model_file=m.model_file, files={**m.files, "model.onnx": "ab" * 32})
    assert manifest_differences(m, m) == [] and manifest_differences(m, compiled) == []
    other = replace(m, owner="bob", files={**m.files, m.model_file: "cd" * 32})
    assert manifest_differences(other, compiled) == [
        'owner "ann" -> "bob"', f"file {m.model_file} changed (sha256 {m.files[m.model_file][:12]} -> cdcdcdcdcdcd)"]


async def test_repacked_package_is_the_same_package(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Re-packing the same files (`tar -C dir .`) under the same version is a no-op, not a conflict; a
    package with other files under a taken version names both ids and the file that differs."""
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path / "home")
    await ensure_topics(broker.config)
    first = iris_package("repack", "1")
    repacked = tar_dot(members_of(first.data))
    other = iris_package("repack", "1", c=0.01)
    async with running_ingest(settings) as watcher:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}", timeout=30) as client:
            outcomes = []
            for data in (first.data, repacked, other.data):
                resp = await client.post("/deployments", content=data, headers={"content-type": "application/x-tar"})
                assert resp.status_code == 202, resp.text
                outcomes.append(await watcher.outcome(resp.json()["deployment_id"]))
    done, again, refused = outcomes
    assert type(done).__name__ == "DeploymentCompleted" and not done.noop
    assert type(again).__name__ == "DeploymentCompleted" and again.noop, again
    assert type(refused).__name__ == "DeploymentFailed", refused
    import hashlib

    assert hashlib.sha256(other.data).hexdigest()[:12] in refused.reason and done.sha256[:12] in refused.reason
    assert "file model.skops changed" in refused.reason


async def test_api_expiry_takes_a_duration(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """POST /deployments takes `expiry: "7d"` (JSON) and `?expiry=12h` as `deploy --expiry` does; a bad one is 400."""
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path / "home")
    await ensure_topics(broker.config)
    pkg = iris_package("ttl", "1")
    async with running_ingest(settings) as watcher:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}", timeout=30) as client:
            bad = await client.post("/deployments", json={"package_uri": "s3://b/k.tar", "expiry": "soon"})
            assert bad.status_code == 400 and "e.g. 30s" in bad.text
            resp = await client.post("/deployments", params={"expiry": "12h"}, content=pkg.data,
                                     headers={"content-type": "application/x-tar"})
            assert resp.status_code == 202, resp.text
            await watcher.outcome(resp.json()["deployment_id"])
            assert watcher.states_of("ttl")[-1].expiry_seconds == 12 * 3600


def test_readme_test_count_is_current() -> None:
    """The README's "about N test functions" stays within a quarter of the real count."""
    said = int(re.search(r"about (\d+) test functions", (ROOT / "README.md").read_text()).group(1))  # type: ignore[union-attr]
    real = sum(len(re.findall(r"^(?:async )?def test_", p.read_text(), re.M)) for p in (ROOT / "tests").glob("test_*.py"))
    assert 0.75 * real <= said <= 1.25 * real, f"README says about {said} test functions, there are {real}"


async def test_traffic_show_without_an_endpoint_lists_them(tmp_path: Path) -> None:
    """`modelcd traffic show` with no endpoint lists every endpoint (JSON with --json)."""
    import json

    from modelcd.events.schemas import Route, TrafficPolicy

    store_url = str(tmp_path / "store")
    async with open_store(store_url) as store:
        await TargetState(store).put_traffic(TrafficPolicy(endpoint="iris", revision=2, routes=[
            Route(model="iris", version="1", weight=90), Route(model="iris", version="2", weight=10)]))
    proc = await asyncio.create_subprocess_exec(*MODELCD, "traffic", "show", "--json",
                                                env=clean_env(MODELCD_STORE_URL=store_url),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert [(p["endpoint"], p["revision"], len(p["routes"])) for p in json.loads(out)] == [("iris", 2, 2)]


async def test_models_expiring_shows_time_to_warning(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`modelcd models --expiring` has a WARNED IN column beside RETIRES IN (and --json gives warn_at)."""
    import json

    await ensure_topics(broker.config)
    store_url = str(tmp_path / "store")
    now = time.time()
    async with open_store(store_url) as store:
        await TargetState(store).put_model(ModelState(name="old", version="1", target="serving", owner="ann",
                                                      expiry_seconds=10 * 86400, deployed_at=now, at=now))
    env = clean_env(MODELCD_STORE_URL=store_url, MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap,
                    MODELCD_KAFKA_IDEMPOTENCE="false")
    for argv in (["models", "--expiring"], ["models", "--expiring", "--json"]):
        proc = await asyncio.create_subprocess_exec(*MODELCD, *argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        if "--json" in argv:
            (row,) = json.loads(out)
            assert row["retire_at"] - row["warn_at"] == pytest.approx(2 * 86400, abs=60)
        else:
            header, line = out.decode().splitlines()[:2]
            assert "WARNED IN" in header and "RETIRES IN" in header and "8.0d" in line and "10.0d" in line
