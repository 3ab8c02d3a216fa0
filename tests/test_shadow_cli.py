"""`modelcd shadow add|list|remove|report` as a user runs them, against a real broker and a local store."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import read_state
from modelcd.events.schemas import ModelState, TrafficPolicy
from modelcd.events.topics import TRAFFIC
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

ENTRY = "import sys; from modelcd.cli import main; sys.exit(main())"


async def modelcd(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    # As the `modelcd` console script does: under `python -m modelcd.cli`, CliError raised by a component's
    # cli module would be modelcd.cli.CliError, not the __main__ module's, and would escape as a traceback.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", ENTRY, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_add_list_remove_round_trip(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """add writes the policy to the store and the traffic topic; list shows it; remove takes it out again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="off",
               MODELCD_STORE_URL=str(tmp_path / "store"), MODELCD_LOG_FORMAT="json")
    async with open_store(str(tmp_path / "store")) as store:  # deployed: a shadow must serve (store.safety)
        await TargetState(store).put_model(ModelState(name="iris", version="2", target="serving"))
    code, out, err = await modelcd(env, "shadow", "add", "iris", "iris:2", "--rate", "0.1", "--until", "14d",
                                   "--where", "header:x-country=DE", "--where", "input:sepal_length>=5")
    assert code == 0, err
    assert "iris:2 shadows iris on endpoint iris: 10%" in out

    async with open_store(str(tmp_path / "store")) as store:
        stored = await TargetState(store).get_traffic("iris")
    assert stored is not None and len(stored.shadows) == 1
    rel = stored.shadows[0]
    assert (rel.primary, rel.shadow, rel.sample_rate) == ("iris", "iris:2", 0.1)
    assert rel.end is not None and abs(rel.end - rel.start - 14 * 86400) < 60
    assert [(c.field, c.op, c.value) for c in rel.criteria] == [("header:x-country", "eq", "DE"),
                                                                 ("input:sepal_length", "ge", 5)]
    published = (await read_state(broker.config, TRAFFIC))["iris"]
    assert isinstance(published, TrafficPolicy) and published == stored

    code, out, _ = await modelcd(env, "shadow", "list")
    assert code == 0 and "iris:2" in out and "active" in out and "input:sepal_length>=5" in out

    code, _, err = await modelcd(env, "shadow", "add", "iris", "iris", "--until", "1d")
    assert code == 2 and "name:version" in err and "Traceback" not in err

    code, out, _ = await modelcd(env, "shadow", "remove", "iris", "iris:2")
    assert code == 0 and "removed" in out
    latest = (await read_state(broker.config, TRAFFIC))["iris"]
    assert isinstance(latest, TrafficPolicy) and latest.shadows == [] and latest.revision == 2

    code, _, err = await modelcd(env, "shadow", "report", "iris")
    assert code == 1 and "no comparisons for iris" in err
