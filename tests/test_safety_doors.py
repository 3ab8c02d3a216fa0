"""The safety check through the doors the CLI and the API do not guard: a command published straight to
Kafka, and weights that are numbers only in name.

An outside review found that a rollout start written to `modelcd.traffic` by any producer (not through
`modelcd rollout start` or `POST /endpoints/{e}/rollout`, which check the canary) was applied with a canary
that was never deployed, and its first step sent live traffic to it (503 on every such request); and that
`modelcd traffic set e m:1=nan` was accepted (NaN passes the "add up to 100" comparison) and left the
endpoint with no route at all.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher, read_topic
from modelcd.events.schemas import ModelState, RolloutStep, Route, TrafficPolicy, new_id
from modelcd.events.topics import TRAFFIC
from modelcd.rollout.cli import parse_routes
from modelcd.rollout.service import RolloutController
from modelcd.rollout.traffic_ops import TrafficError, check_routes
from modelcd.errors import CliError
from modelcd.store.blobs import open_store
from modelcd.store.targets import TargetState

from .test_rollout_controller import Sink, fast_plan, wait_for

WAIT = 30.0  # an upper bound on every wait, never a performance threshold


@pytest.mark.parametrize("weights", [("nan",), ("nan", "100"), ("50", "nan", "50"), ("inf",)])
def test_non_finite_weights_are_refused(weights: tuple[str, ...]) -> None:
    """`traffic set e a:1=nan [a:2=100]`: a usage error, not a policy whose routes no request can take."""
    items = [f"a:{i}={w}" for i, w in enumerate(weights, 1)]
    with pytest.raises(CliError, match="number of percent|weights add up"):
        parse_routes(items)
    routes = [Route(model="a", version=str(i), weight=float(w)) for i, w in enumerate(weights, 1)]
    with pytest.raises(TrafficError):
        check_routes(routes)
    assert all(math.isfinite(r.weight) for r in parse_routes(["a:1=33.333", "a:2=33.333", "a:3=33.334"]))


async def test_a_start_published_straight_to_kafka_names_only_a_serving_canary(broker: EmbeddedBroker,
                                                                               tmp_path: Path) -> None:
    """A start command for an undeployed or retired canary, written to the topic directly: refused, no traffic moves."""
    cfg = broker.config
    async with open_store(str(tmp_path / "store")) as store:
        targets = TargetState(store)
        await targets.put_model(ModelState(name="iris", version="1", target="serving"))
        await targets.put_model(ModelState(name="iris", version="2", target="retired"))
        stop, ready = asyncio.Event(), asyncio.Event()
        async with Publisher(cfg, "attacker") as pub, \
                RolloutController(cfg, targets=Sink(), tick=0.1, models=targets.models) as c:  # type: ignore[arg-type]
            task = asyncio.create_task(c.run(stop=stop, ready=ready))
            try:
                async with asyncio.timeout(WAIT):
                    await ready.wait()
                await pub.publish(TrafficPolicy(endpoint="web", routes=[Route(model="iris", version="1", weight=100.0)],
                                                revision=1))
                for canary in ("iris:9", "iris:2"):
                    await pub.publish(RolloutStep(endpoint="web", rollout_id=new_id(), action="start", canary=canary,
                                                  plan=fast_plan(), command=True, command_id=new_id()))
                await wait_for(lambda: c.stats["refused"] >= 2, "both starts are refused")
                assert "web" not in c.rollouts
                # The same command for a canary that serves does start: the check refuses what does not serve only.
                await targets.put_model(ModelState(name="iris", version="3", target="serving"))
                await pub.publish(RolloutStep(endpoint="web", rollout_id=new_id(), action="start", canary="iris:3",
                                              plan=fast_plan(interval_s=3600), command=True, command_id=new_id()))
                await wait_for(lambda: "web" in c.rollouts, "the rollout to a serving canary starts")
            finally:
                stop.set()
                async with asyncio.timeout(WAIT):
                    await task
    routed = {f"{r.model}:{r.version}" for e, _env, _r in await read_topic(cfg, TRAFFIC)
              if isinstance(e, TrafficPolicy) for r in e.routes if r.weight > 0}
    assert routed <= {"iris:1", "iris:3"}, routed
    started = [e.canary for e, _env, _r in await read_topic(cfg, TRAFFIC)
               if isinstance(e, RolloutStep) and not e.command and e.action == "start"]
    assert started == ["iris:3"], started


def test_the_cli_refuses_endpoint_names_that_cannot_be_keys() -> None:
    """`traffic set`, `rollout start` and `shadow add` on 'a/b', '..', 'a b': refused before anything is published."""
    from modelcd.events.schemas import ShadowRelation
    from modelcd.rollout.traffic_ops import EndpointView, set_policy, start_command
    from modelcd.shadow.relations import RelationError, add_relation
    from modelcd.store.safety import World

    w = World(models={"iris:1": ModelState(name="iris", version="1", target="serving")})
    for name in ("a/b", "..", "a b", "a\\b", ""):
        view = EndpointView(name, [])
        with pytest.raises(TrafficError, match="endpoint name"):
            set_policy(view, [Route(model="iris", version="1", weight=100.0)], world=w, sticky_key=None)
        with pytest.raises(TrafficError, match="endpoint name"):
            start_command(view, "iris:1", fast_plan(), world=w, reason="")
        with pytest.raises(RelationError, match="endpoint name"):
            add_relation(None, name, ShadowRelation(primary="iris", shadow="iris:1"), now=0.0, world=w)
