"""Ingest's pure parts: package URIs, deploy decisions, the tracking view, the CLI's step lines."""

from __future__ import annotations

import pytest

from modelcd.events.schemas import (
    DeploymentCompleted, DeploymentFailed, DeploymentProgress, LoadedModel, ModelState, NodeStatus,
)
from modelcd.ingest.cli import step_lines
from modelcd.ingest.policy import Conflict, Noop, PackageSource, Proceed, Resume, decide_deploy, parse_package_uri
from modelcd.ingest.tracking import TrackingView

A, B = "a" * 64, "b" * 64


def test_package_uris() -> None:
    """store:, file:// and s3:// URIs parse; relative, traversing and other schemes are refused."""
    assert parse_package_uri("store:uploads/x.tar") == PackageSource("store", "uploads/x.tar")
    assert parse_package_uri("file:///data/m.tar") == PackageSource("file", "/data/m.tar")
    assert parse_package_uri("s3://bkt/dir/m.tar") == PackageSource("s3", "dir/m.tar", bucket="bkt")
    for bad in ["store:../x", "store:", "file://host/m.tar", "s3://bkt", "https://x/m.tar", "m.tar"]:
        with pytest.raises(ValueError):
            parse_package_uri(bad)


def state(sha: str, target: str = "serving", dep: str = "d1") -> ModelState:
    return ModelState(name="iris", version="1", target=target, sha256=sha, deployment_id=dep, at=0.0)  # type: ignore[arg-type]


def test_deploy_decisions() -> None:
    """Absent → proceed; same package serving → no-op; own deployment → resume; other package → conflict."""
    assert decide_deploy(None, None, A, "d2") == Proceed()
    assert decide_deploy(state(A), None, A, "d2") == Noop(state(A))
    assert decide_deploy(state(B), A, A, "d2") == Noop(state(B))  # stored compiled form of the same archive
    assert decide_deploy(state(B, dep="d2"), A, A, "d2") == Resume(state(B, dep="d2"))
    assert isinstance(decide_deploy(state(B), None, A, "d2"), Conflict)
    assert isinstance(decide_deploy(state(B, "retired"), None, A, "d2"), Conflict)
    assert decide_deploy(state(A, "retired"), None, A, "d2") == Proceed()


def test_tracking_view_folds_steps_outcome_and_nodes() -> None:
    """Steps keep their order with the last status, the outcome is recorded, ready nodes are counted."""
    view = TrackingView()
    view.requested("d1", "iris")
    for step, status in [("accepted", "succeeded"), ("validate", "started"), ("validate", "succeeded")]:
        view.apply(DeploymentProgress(deployment_id="d1", model="iris", version="1", step=step, status=status,
                                      duration_ms=2.0 if status == "succeeded" else None))
    v = view.deployment("d1")
    assert v is not None and v.status == "running"
    assert [(s.step, s.status) for s in v.steps] == [("accepted", "succeeded"), ("validate", "succeeded")]
    view.apply(DeploymentCompleted(deployment_id="d1", model="iris", version="1", sha256=A))
    view.apply(NodeStatus(node="n1", ready=True, models=[LoadedModel(name="iris", version="1", sha256=A)]))
    view.apply(NodeStatus(node="n2", ready=True, models=[LoadedModel(name="iris", version="1", sha256=A,
                                                                     state="loading")]))
    v = view.deployment("d1")
    assert v is not None and v.status == "completed" and v.nodes_serving == 1
    view.apply(DeploymentFailed(deployment_id="d2", step="compile", reason="boom"))
    v2 = view.deployment("d2")
    assert v2 is not None and (v2.status, v2.failed_step, v2.reason) == ("failed", "compile", "boom")


def test_step_lines_show_every_step_in_order() -> None:
    """The CLI's display lists every pipeline step, pending ones included, with durations."""
    lines = step_lines({"steps": [{"step": "accepted", "status": "succeeded", "duration_ms": None, "detail": ""},
                                  {"step": "validate", "status": "started", "duration_ms": None, "detail": ""}]},
                       ["accepted", "validate", "compile"])
    assert [line[3:].split()[0] for line in lines] == ["accepted", "validate", "compile"]
    assert "running" in lines[1]
