"""`modelcd release canary ENV`: every production model on a candidate node, compared with the current release."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcd.events.broker import EmbeddedBroker
from modelcd.events.bus import Publisher
from modelcd.fleet.canary import canary, verdict
from modelcd.store.blobs import open_store

from ._fleet import fleet_settings
from ._hostile import healthy
from ._release import built_wheel, make_env, release_env  # noqa: F401 - fixtures
from ._serving import deploy

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(300)]


def test_latency_verdict_allows_the_margin_and_no_more() -> None:
    """The candidate's p99 may exceed the current one's by the margin plus the slack, not beyond."""
    assert verdict([10.0] * 50, [10.0] * 50, margin=0.2, slack_ms=1.0) is None
    assert verdict([12.5] * 50, [10.0] * 50, margin=0.2, slack_ms=1.0) is None
    assert "p99 13.50 ms" in (verdict([13.5] * 50, [10.0] * 50, margin=0.2, slack_ms=1.0) or "")


async def _production(tmp_path: Path, broker: EmbeddedBroker):  # type: ignore[no-untyped-def]
    settings = fleet_settings(tmp_path, broker.bootstrap)
    async with open_store(settings.resolved_store_url) as store, Publisher(broker.config, "test") as pub:
        for kind in ("tree", "forest", "lightgbm"):
            await deploy(store, pub, healthy(kind, name=f"prod-{kind}"))
    return settings


async def test_identical_candidate_passes(broker: EmbeddedBroker, tmp_path: Path,
                                          release_env: Path) -> None:  # noqa: F811
    """The built wheel against the current installation: every production model loads and answers the same."""
    settings = await _production(tmp_path, broker)
    lines: list[str] = []
    report = await canary(settings, release_env, workdir=tmp_path / "canary", runs=10, margin=3.0, slack_ms=50.0,
                          say=lines.append)
    assert report.ok, report.table()
    assert {f"{c.model}:{c.version}" for c in report.checks} == {"prod-tree:1", "prod-forest:1", "prod-lightgbm:1"}
    assert "PASS" in report.table()


async def test_candidate_with_a_changed_runtime_fails_and_names_the_models(
        broker: EmbeddedBroker, tmp_path: Path, built_wheel: Path) -> None:  # noqa: F811
    """A candidate env whose LightGBM runtime shifts outputs fails the release, naming that model only."""
    settings = await _production(tmp_path, broker)
    env = tmp_path / "perturbed-env"
    make_env(env, built_wheel)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "zz_perturb.pth").write_text(
        "import os; os.environ.setdefault('MODELCD_TEST_PERTURB_RUNTIME', 'lightgbm')\n")
    report = await canary(settings, env, workdir=tmp_path / "canary", runs=5, margin=3.0, slack_ms=50.0)
    assert not report.ok
    assert report.failed == ["prod-lightgbm:1"], report.table()
    assert "FAIL: prod-lightgbm:1" in report.table()
