"""The `modelcd` command as a new user tries it: help, config, broker, replay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from modelcd.cli import build_parser
from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import ModelState
from modelcd.events.topics import TOPICS

MODELCD = [sys.executable, "-m", "modelcd"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(extra)
    return env


def test_help_lists_every_subcommand() -> None:
    """`modelcd --help` names each subcommand with a one-line explanation."""
    out = subprocess.run([*MODELCD, "--help"], capture_output=True, text=True, env=clean_env(), check=True).stdout
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]  # noqa: SLF001
    for name in ["up", "broker", "schemas", "config", "package", "topics", "replay"]:
        assert name in names and name in out


def test_bad_setting_is_a_clear_error() -> None:
    """A malformed MODELCD_* value names the variable and exits 2, without a traceback."""
    proc = subprocess.run([*MODELCD, "config"], capture_output=True, text=True,
                          env=clean_env(MODELCD_MEMORY_BUDGET="lots"))
    assert proc.returncode == 2
    assert "MODELCD_MEMORY_BUDGET" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_topic_in_replay_is_a_clear_error() -> None:
    """`modelcd replay` with a wrong topic lists the valid ones."""
    proc = subprocess.run([*MODELCD, "replay", "nope"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 2 and "modelcd.model-state" in proc.stderr


async def test_broker_command_starts_creates_topics_and_stops() -> None:
    """`modelcd broker --port P` answers metadata with every modelcd topic, and stops cleanly on SIGINT."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(*MODELCD, "broker", "--port", str(port), env=clean_env(),
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        while b"broker ready" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, "broker exited before it was ready"
        admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        await admin.start()
        try:
            assert set(TOPICS) <= set(await admin.list_topics())
        finally:
            await admin.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0


async def test_broker_port_in_use_says_what_to_do(broker: EmbeddedBroker) -> None:
    """Starting a broker on a busy port fails at once with advice, not a stack trace."""
    proc = await asyncio.create_subprocess_exec(*MODELCD, "broker", "--port", str(broker.port), env=clean_env(),
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"already in use" in err and b"MODELCD_KAFKA_BOOTSTRAP" in err


async def test_replay_state_prints_last_write_per_key(broker: EmbeddedBroker) -> None:
    """`modelcd replay --state` rebuilds a view from the topic: one line per key, the last write."""
    async with Publisher(broker.config, "test") as pub:
        await pub.publish(ModelState(name="a", version="1", target="serving"))
        await pub.publish(ModelState(name="a", version="1", target="retired"))
    proc = await asyncio.create_subprocess_exec(
        *MODELCD, "replay", "modelcd.model-state", "--state",
        env=clean_env(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="false"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 1 and '"target":"retired"' in lines[0]


def test_demo_builds_packages_that_read_back(tmp_path: Path) -> None:
    """`modelcd demo` writes one valid package per demo model, each verified on its own samples."""
    from modelcd.demo import DEMO_MODELS
    from modelcd.store.package import read_package

    proc = subprocess.run([*MODELCD, "demo", "--out", str(tmp_path / "pk"), "--expiry", "2h"], capture_output=True,
                          text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    archives = sorted((tmp_path / "pk").glob("*.tar"))
    assert [a.name for a in archives] == sorted(f"{m.name}-{m.version}.tar" for m in DEMO_MODELS)
    for archive in archives:
        pkg = read_package(archive.read_bytes())
        assert f"{pkg.manifest.name}-{pkg.manifest.version}.tar" == archive.name
        assert pkg.manifest.owner == "demo" and pkg.manifest.expiry_seconds == 7200
    assert not list((tmp_path / "pk").glob("*.part"))
