"""Two deployments of one name:version racing: the create-only write at publish refuses the loser.

The pipeline runs in-process with the real sandbox; the 'other instance' writes its target state while
ours is in serving validation (after our immutability check), which is the window the check cannot see.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from modelcd.events.schemas import DeploymentCompleted, DeploymentFailed, DeployRequested, Event, ModelState
from modelcd.ingest.pipeline import Pipeline
from modelcd.ingest.sandbox import Sandbox, SandboxJob
from modelcd.settings import Settings
from modelcd.store.blobs import LocalStore
from modelcd.store.targets import TargetState

from ._ingest import iris_package, sha


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event, *, event_id: str | None = None) -> None:
        self.events.append(event)


class RacingSandbox:
    """The real sandbox, but another deployment lands in the target state while it validates."""

    def __init__(self, store: LocalStore, theirs: ModelState | None) -> None:
        self.inner = Sandbox(timeout_s=60, memory_bytes=4 << 30, warm=False)
        self.store, self.theirs = store, theirs

    async def start(self, package: bytes, *, compile: bool, checks: bool) -> SandboxJob:
        if self.theirs is not None:
            await TargetState(self.store).put_model(self.theirs)
        return await self.inner.start(package, compile=compile, checks=checks)


async def deploy(tmp_path: Path, data: bytes, theirs: ModelState | None) -> tuple[LocalStore, Sink]:
    store, sink = LocalStore(tmp_path / "store"), Sink()
    await store.put("uploads/ours.tar", data)
    settings = Settings(home=tmp_path, store_url=str(tmp_path / "store"), compile_onnx=False)
    pipeline = Pipeline(settings, store, sink, RacingSandbox(store, theirs))  # type: ignore[arg-type]
    await pipeline.deploy(DeployRequested(deployment_id="ours", model="raced", package_uri="store:uploads/ours.tar"))
    return store, sink


async def test_a_different_package_created_meanwhile_wins_and_ours_is_refused(tmp_path: Path) -> None:
    winner = iris_package("raced", c=1.0)
    theirs = ModelState(name="raced", version="1", target="serving", sha256=sha(winner.data), owner="other",
                        package_uri="store:packages/elsewhere.tar", expiry_seconds=3600, deployment_id="theirs")
    store, sink = await deploy(tmp_path, iris_package("raced", c=0.01).data, theirs)
    [outcome] = [e for e in sink.events if isinstance(e, DeploymentCompleted | DeploymentFailed)]
    assert isinstance(outcome, DeploymentFailed) and outcome.step == "publish", outcome
    assert "immutable" in outcome.reason
    current = await TargetState(store).get_model("raced", "1")
    assert current is not None and msgspec.structs.asdict(current) == msgspec.structs.asdict(theirs)
    assert not [e for e in sink.events if isinstance(e, ModelState)]  # nothing published for ours
    assert await store.list("packages/") == []  # our package removed, nothing half-written left


async def test_without_a_race_the_create_only_write_succeeds(tmp_path: Path) -> None:
    store, sink = await deploy(tmp_path, iris_package("raced", c=0.01).data, None)
    assert any(isinstance(e, DeploymentCompleted) for e in sink.events)
    current = await TargetState(store).get_model("raced", "1")
    assert current is not None and current.deployment_id == "ours" and current.target == "serving"
    assert [e.deployment_id for e in sink.events if isinstance(e, ModelState)] == ["ours"]
