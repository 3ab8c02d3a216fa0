"""Last use survives losses: a retirement processor whose tables are rebuilt from nothing after a broker loss
never warns or retires a model that was used recently (its usage history went with the broker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.schemas import ModelState, RetirementDecision, RetirementWarning, RetireRequested, UsageReport
from modelcd.events.topics import DEPLOY_REQUESTS, RETIREMENT
from modelcd.retirement import handlers, policy
from modelcd.retirement.cli import expiring
from modelcd.retirement.service import RetirementProcessor
from modelcd.settings import Settings
from modelcd.store.blobs import LocalStore
from modelcd.store.restore import restore_targets
from modelcd.store.targets import TargetState

from ._watch import BusWatcher

DAY = 86400.0


def _state(name: str, now: float, *, deployed_days_ago: float, expiry: float) -> ModelState:
    at = now - deployed_days_ago * DAY
    return ModelState(name=name, version="1", target="serving", owner="ann", expiry_seconds=int(expiry),
                      deployed_at=at, at=at, sha256="ab" * 32)


def test_rebuilt_record_never_brings_a_warning_forward() -> None:
    """Pure: a record rebuilt at `now` with no usage history (deployed 60 d ago, 30 d expiry, last used 3 d ago but
    forgotten) is not warned before 15 d from the rebuild, nor retired before 30 d."""
    now = 1_800_000_000.0
    entry = handlers.ModelEntry()
    handlers.handle_state(entry, _state("iris", now, deployed_days_ago=60, expiry=30 * DAY), now)
    for later in (0.0, 1.0, 3 * DAY, 14.9 * DAY):
        assert handlers.handle_check(entry, now + later, 0.5) == []
    [warn] = handlers.handle_check(entry, now + 15 * DAY, 0.5)
    assert warn.decision.action is policy.Action.WARN
    assert handlers.handle_check(entry, now + 29.9 * DAY, 0.5) == []
    # A usage report that arrives first (before the state) starts the clock the same way.
    first = handlers.ModelEntry()
    handlers.handle_usage(first, UsageReport(model="iris", version="1", node="n", interval_start=0, interval_end=0,
                                             count=0, last_used=0.0), now)
    assert first.versions["1"].tracked_since == now


@pytest.mark.faults
async def test_broker_loss_does_not_retire_a_model_used_three_days_ago(tmp_path: Path) -> None:
    """Deployed 60 d ago with a 30 d expiry, used 3 d ago; the broker is lost (topics, changelogs) and restarted
    empty; ingest's restore republishes the target from the store: no warning, no retirement. A model with a
    2 s expiry in the same run is warned and retired, so the processor did check."""
    store = LocalStore(tmp_path / "store")
    now = time.time()
    used = _state("used", now, deployed_days_ago=60, expiry=30 * DAY)
    short = _state("short", now, deployed_days_ago=60, expiry=2)
    for s in (used, short):
        await TargetState(store).put_model(s)

    def settings(b: EmbeddedBroker) -> Settings:
        return Settings.from_env({}, kafka_bootstrap=b.bootstrap, kafka_idempotence=False, home=tmp_path,
                                 retirement_check_interval=0.3, retirement_warn_share=0.5)

    first = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu-1.log")
    async with first:
        async with Publisher(first.config, "test") as pub, RetirementProcessor(settings(first)):
            await pub.publish(used)
            await pub.publish(UsageReport(model="used", version="1", node="n1", interval_start=now - 3 * DAY - 10,
                                          interval_end=now - 3 * DAY, count=5, last_used=now - 3 * DAY))
            async with asyncio.timeout(30):  # the processor remembers the last use beyond the broker
                while (await TargetState(store).get_last_use("used")).get("1") is None:
                    await asyncio.sleep(0.2)
    assert (await TargetState(store).get_last_use("used"))["1"].last_used == now - 3 * DAY
    # The broker is gone with everything on it; a new one starts empty.
    second = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu-2.log")
    async with second, BusWatcher(second.bootstrap, RETIREMENT, DEPLOY_REQUESTS) as watch:
        async with Publisher(second.config, "ingest") as pub, RetirementProcessor(settings(second)) as proc:
            restored = await restore_targets(TargetState(store), second.config, pub)
            assert restored.states == 2
            await watch.wait_for(lambda _: bool(watch.of("short", RetireRequested)), timeout=60)
            checks = proc.stats.checks
            async with asyncio.timeout(60):
                while proc.stats.checks < checks + 6:  # several more checks of both after "short" retired
                    await asyncio.sleep(0.3)
        assert watch.of("used", RetirementWarning) == [] and watch.of("used", RetirementDecision) == []
        assert watch.of("used", RetireRequested) == []
        assert len(watch.of("short", RetirementWarning)) == 1
    # The view after the loss: last use three days ago (from the store), not warned, as the processor decided.
    remembered = await TargetState(store).last_uses()
    assert remembered["used"]["1"].last_used == now - 3 * DAY and remembered["used"]["1"].tracked_since > now
    (row,) = [r for r in expiring([used], [], {}, time.time(), 0.5, remembered) if r.model == "used"]
    assert row.last_used == now - 3 * DAY and row.status == ""
