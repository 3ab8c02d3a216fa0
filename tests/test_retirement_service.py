"""The retirement processor (faust on the real broker): warnings, retirement, cancel, protection, restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker
from modelcd.events.schemas import (
    ModelState,
    RetirementDecision,
    RetirementWarning,
    RetireRequested,
    Route,
    TrafficPolicy,
    UsageReport,
)
from modelcd.events.topics import DEPLOY_REQUESTS, RETIREMENT
from modelcd.retirement.service import RetirementProcessor
from modelcd.settings import Settings

from ._watch import BusWatcher

WAIT = 60.0  # generous: the machine is shared; nothing asserts on durations


def settings_for(broker: EmbeddedBroker, home: Path) -> Settings:
    return Settings.from_env({}, kafka_bootstrap=broker.bootstrap, kafka_idempotence=False, home=home,
                             retirement_check_interval=0.5, retirement_warn_share=0.5)


def state(name: str, expiry: int, **kw: object) -> ModelState:
    return ModelState(name=name, version="1", target="serving", owner=f"{name}-owner", expiry_seconds=expiry,
                      deployed_at=time.time(), sha256="ab" * 32, **kw)  # type: ignore[arg-type]


def used(name: str) -> UsageReport:
    now = time.time()
    return UsageReport(model=name, version="1", node="n1", interval_start=now - 1, interval_end=now, count=3,
                       last_used=now)


async def test_unused_retired_used_kept_cancel_and_protections(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Unused: one warning then retire + RetireRequested; used: nothing; use after warning cancels; protected: skip."""
    settings = settings_for(broker, tmp_path)
    async with BusWatcher(broker.bootstrap, RETIREMENT, DEPLOY_REQUESTS) as watch, Publisher(broker.config, "test") as pub, \
            RetirementProcessor(settings) as proc:
        for ev in [state("idle", 4), state("busy", 4), state("comeback", 8), state("pinned", 2, pinned=True),
                   state("routed", 2),
                   TrafficPolicy(endpoint="ep", routes=[Route(model="routed", version="1", weight=100.0)])]:
            await pub.publish(ev)

        async def keep_busy() -> None:
            while True:
                await pub.publish(used("busy"))
                await asyncio.sleep(0.3)

        busy = asyncio.create_task(keep_busy())
        try:
            await watch.wait_for(lambda _: bool(watch.of("comeback", RetirementWarning)))
            await pub.publish(used("comeback"))
            await watch.wait_for(lambda _: bool(watch.of("idle", RetireRequested))
                                 and bool(watch.of("comeback", RetirementDecision, "cancel"))
                                 and bool(watch.of("pinned", RetirementDecision, "skip"))
                                 and bool(watch.of("routed", RetirementDecision, "skip")))
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)

        assert len(watch.of("idle", RetirementWarning)) == 1
        assert len(watch.of("idle", RetirementDecision, "retire")) == 1
        [req] = watch.of("idle", RetireRequested)
        assert req.requested_by == "retirement" and req.version == "1"  # type: ignore[attr-defined]
        # warning then decision on the retirement topic; the request that acts on the decision comes after it
        # (two topics read by one consumer arrive in no guaranteed order: compare times across them)
        kinds = [type(e) for e in watch.events
                 if getattr(e, "model", "") == "idle" and type(e) is not RetireRequested]
        assert kinds == [RetirementWarning, RetirementDecision]
        [decision] = watch.of("idle", RetirementDecision, "retire")
        assert decision.at <= req.requested_at  # type: ignore[attr-defined]
        assert watch.of("busy", RetirementWarning) == [] and watch.of("busy", RetirementDecision) == []
        assert watch.of("comeback", RetireRequested) == []
        assert "pinned" in watch.of("pinned", RetirementDecision, "skip")[0].reason  # type: ignore[attr-defined]
        [skip] = watch.of("routed", RetirementDecision, "skip")
        assert "endpoint ep" in skip.reason  # type: ignore[attr-defined]
        assert watch.of("pinned", RetirementWarning) == [] and watch.of("routed", RetirementWarning) == []
        assert proc.stats.undecodable == 0 and proc.stats.errors == 0


@pytest.mark.slow
async def test_restart_between_warning_and_expiry(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A worker restarted after the warning does not warn again and still retires the model."""
    settings = settings_for(broker, tmp_path)
    async with BusWatcher(broker.bootstrap, RETIREMENT, DEPLOY_REQUESTS) as watch, Publisher(broker.config, "test") as pub:
        async with RetirementProcessor(settings) as first:
            await pub.publish(state("idle", 8))
            await watch.wait_for(lambda _: bool(watch.of("idle", RetirementWarning)))
            assert first.stats.warnings == 1
            await first.stop()  # stop() is idempotent: the block's exit stops it again
        assert watch.of("idle", RetirementDecision) == []  # stopped between warning and expiry
        async with RetirementProcessor(settings) as second:
            await watch.wait_for(lambda _: bool(watch.of("idle", RetireRequested)))
            assert second.stats.warnings == 0
        assert len(watch.of("idle", RetirementWarning)) == 1
        assert len(watch.of("idle", RetirementDecision, "retire")) == 1
