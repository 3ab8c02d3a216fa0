"""One reader per view: an endpoint's policy and rollout read from the traffic topic merged with the store, so a
topic that lost them (a broker wiped of its topics, retention, compaction) reads the same through CLI and API."""

from __future__ import annotations

import json
import os
from pathlib import Path

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.schemas import RolloutPlan, RolloutStep, Route, TrafficPolicy
from modelcd.rollout.traffic_ops import EndpointView, with_store
from modelcd.store.blobs import LocalStore
from modelcd.store.targets import TargetState

from .test_ingest_e2e import run_cli

PLAN = RolloutPlan(name="fast", steps=[10.0, 100.0], interval_s=120.0)


def _facts() -> list[RolloutStep]:
    start = RolloutStep(endpoint="iris", rollout_id="r1", action="start", canary="iris:2", baseline="iris:1",
                        plan=PLAN, step=0, weight=10.0, at=100.0,
                        baseline_routes=[Route(model="iris", version="1", weight=100.0)])
    hold = RolloutStep(endpoint="iris", rollout_id="r1", action="hold", reason="not enough samples", at=220.0)
    return [start, hold]


def test_a_compacted_topic_is_read_with_the_store() -> None:
    """The topic kept only the last record of the endpoint (compaction): the store's policy (higher revision) and
    the rollout's full history are read; a newer policy on the topic wins over the store's."""
    facts = _facts()
    stored = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=100.0)], revision=15)
    view = with_store(EndpointView("iris", [facts[-1]]), stored, facts)
    assert view.policy == stored and view.rollout is not None
    assert view.rollout.history == facts and view.rollout.rollout_id == "r1"
    newer = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="2", weight=100.0)], revision=16)
    assert with_store(EndpointView("iris", [newer, *facts]), stored, facts).policy == newer


async def test_cli_reads_the_store_when_the_broker_lost_the_topic(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A broker wiped of its topics, no service restored anything yet: `traffic show` and `rollout status` answer
    from the store (revision 15, the rollout and its history) instead of "no policy"."""
    targets = TargetState(LocalStore(tmp_path / "store"))
    policy = TrafficPolicy(endpoint="iris", routes=[Route(model="iris", version="1", weight=90.0),
                                                    Route(model="iris", version="2", weight=10.0)], revision=15)
    await targets.put_traffic(policy)
    await targets.put_rollout("iris", _facts())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCD_")}
    env.update(MODELCD_KAFKA_BOOTSTRAP=broker.bootstrap, MODELCD_KAFKA_IDEMPOTENCE="false",
               MODELCD_STORE_URL=str(tmp_path / "store"), MODELCD_HOME=str(tmp_path))
    code, out, err = await run_cli(env, "traffic", "show", "iris", "--json")
    assert code == 0, err
    assert json.loads(out)["revision"] == 15
    code, out, err = await run_cli(env, "rollout", "status", "iris", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["rollout_id"] == "r1" and [h["action"] for h in status["history"]] == ["start", "hold"]
