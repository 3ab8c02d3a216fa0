"""The safety check end to end: the CLI against a running ingest, rollout controller and a real broker.

The findings, as a new user met them: `traffic set winep wine:1=100 && retire wine 1` succeeded and
broke the endpoint; the same for a rollout arm and a shadow; `rollout start iris --to iris:9`,
`traffic set test iris:9=100` and `shadow add iris iris:9` all exited 0. The target state is written
straight into the store (a retire needs nothing else of a deployment).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import Publisher
from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, ModelState, RetireRequested
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

from ._ingest import running_ingest, settings_for
from .test_rollout_controller import Sink, controller, wait_for

WAIT = 60.0  # an upper bound on every wait, never a performance threshold
ENTRY = "import sys; from modelcd.cli import main; sys.exit(main())"


async def modelcd(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`modelcd ARGS` as the console script runs it: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", ENTRY, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_actions_that_would_break_traffic_are_refused(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Retire of a routed, shadowing or rolling model, policies naming undeployed versions, delete of a rolling endpoint."""
    port = free_port()
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), port, tmp_path / "home")
    async with open_store(str(tmp_path / "store")) as store:
        for ref in ("wine:1", "wine:2", "iris:1", "iris:2", "iris:3"):
            name, version = ref.split(":")
            await TargetState(store).put_model(ModelState(name=name, version=version, target="serving"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="off",
               MODELCD_STORE_URL=str(tmp_path / "store"), MODELCD_INGEST_URL=f"http://127.0.0.1:{port}",
               MODELCD_LOG_LEVEL="warning")
    async with running_ingest(settings) as watcher, controller(broker.config, Sink()) as c:
        async def ok(*args: str) -> str:
            code, out, err = await modelcd(env, *args)
            assert code == 0, (args, err)
            return out

        async def refused(*args: str) -> str:
            code, out, err = await modelcd(env, *args)
            assert code != 0 and "Traceback" not in err, (args, code, out, err)
            return err

        await ok("traffic", "set", "winep", "wine:1=100")
        err = await refused("retire", "wine", "1", "--no-wait")
        assert "serves 100% of endpoint winep" in err and "modelcd traffic set winep" in err and "--force" in err

        await ok("traffic", "set", "iris", "iris:1=100")
        await ok("shadow", "add", "iris", "iris:2")
        err = await refused("retire", "iris", "2", "--no-wait")
        assert "shadows iris on endpoint iris" in err and "modelcd shadow remove iris iris:2 --endpoint iris" in err

        await ok("rollout", "start", "iris", "--to", "iris:3", "--interval", "1h")
        await wait_for(lambda: "iris" in c.rollouts and c.rollouts["iris"].active, "the rollout starts")
        err = await refused("retire", "iris", "3", "--no-wait")
        assert "in progress on endpoint iris" in err and "modelcd rollout abort iris" in err
        err = await refused("traffic", "delete", "iris")
        assert "drives endpoint iris" in err and "modelcd rollout abort iris" in err

        for args in [("traffic", "set", "test", "iris:9=100"), ("shadow", "add", "iris", "iris:9"),
                     ("rollout", "start", "wine", "--to", "iris:9")]:
            err = await refused(*args)
            assert "iris:9 is not deployed (serving versions of iris: 1, 2, 3)" in err, (args, err)

        # The auto-retirement processor publishes straight to the topic: ingest's pipeline checks again.
        async with Publisher(broker.config, "retirement") as pub:
            request = RetireRequested(model="wine", version="1", reason="unused", requested_by="retirement")
            await pub.publish(request)
        failed = await watcher.outcome(request.deployment_id, WAIT)
        assert isinstance(failed, DeploymentFailed) and "serves 100% of endpoint winep" in failed.reason

        out = await ok("retire", "wine", "1", "--force")
        assert "completed" in out or "retire" in out
        await watcher.wait_for(lambda: any(s.target == "retired" for s in watcher.states_of("wine", "1")), WAIT)

        await ok("rollout", "abort", "iris")
        await wait_for(lambda: not c.rollouts["iris"].active, "the rollout ends")
        assert "iris deleted" in await ok("traffic", "delete", "iris")
    forced = [e for e in watcher.by_deployment.values() for e in e if isinstance(e, DeploymentCompleted)]
    assert [(e.model, e.version) for e in forced] == [("wine", "1")]
