"""docs/events.md's examples run as written (confluent-kafka, no modelcd code): a training pipeline's
DeployRequested deploys, and an analyst reads prediction logs into pandas and Parquet."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelcd.events import Publisher
from modelcd.events.broker import EmbeddedBroker, free_port
from modelcd.events.bus import ensure_topics
from modelcd.events.schemas import PredictionLog

from ._ingest import iris_package, running_ingest, settings_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def run_example(code: str, replacements: dict[str, str], cwd: Path) -> dict[str, Any]:
    for old, new in replacements.items():
        assert old in code, f"the example no longer contains {old!r}"
        code = code.replace(old, new)
    namespace: dict[str, Any] = {}
    import os

    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented example, as written
    finally:
        os.chdir(here)
    return namespace


async def test_pipeline_example_deploys_and_is_followed_over_http(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The documented confluent-kafka producer deploys a package, and GET /deployments/{id} follows it."""
    pytest.importorskip("confluent_kafka")
    package = tmp_path / "churn-3.tar"
    package.write_bytes(iris_package("churn", "3").data)
    settings = settings_for(broker.bootstrap, str(tmp_path / "store"), free_port(), tmp_path / "home")
    await ensure_topics(broker.config)
    example = next(code for code in doc_examples() if "Producer(" in code)
    async with running_ingest(settings) as watcher:
        ns = await asyncio.to_thread(run_example, example, {
            "localhost:9092": broker.bootstrap, "file:///srv/models/churn-3.tar": package.as_uri()}, tmp_path)
        deployment_id = ns["event"]["deployment_id"]
        outcome = await watcher.outcome(deployment_id)
        assert type(outcome).__name__ == "DeploymentCompleted", outcome
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.ingest_port}", timeout=10) as client:
            body: dict[str, Any] = {}
            async with asyncio.timeout(30):
                while body.get("status") not in ("completed", "failed"):
                    resp = await client.get(f"/deployments/{deployment_id}")
                    if resp.status_code == 200:
                        body = resp.json()
                    await asyncio.sleep(0.2)
        assert body["status"] == "completed" and body["model"] == "churn" and body["version"] == "3"


async def test_analyst_example_reads_every_log_into_pandas(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The documented consumer reads every prediction log (all partitions, past the embedded broker's wrong
    high watermark) into a DataFrame and a Parquet file, with exact counts per model and version."""
    pytest.importorskip("confluent_kafka")
    import pandas as pd

    await ensure_topics(broker.config)
    async with Publisher(broker.config, "test") as pub:
        for i in range(9):
            await pub.publish(PredictionLog(request_id=f"r{i}", model=["iris", "wine", "cancer"][i % 3],
                                            version=str(1 + i % 2), node=f"node-{i % 2}", latency_ms=float(i),
                                            at=time.time()))
    example = next(code for code in doc_examples() if "Consumer(" in code)
    ns = await asyncio.to_thread(run_example, example, {"localhost:9092": broker.bootstrap}, tmp_path)
    logs = ns["logs"]
    assert len(logs) == 9 and sorted(logs.request_id) == [f"r{i}" for i in range(9)]
    assert logs.groupby("model").size().to_dict() == {"cancer": 3, "iris": 3, "wine": 3}
    back = pd.read_parquet(tmp_path / "logs.parquet")
    assert len(back) == 9 and back.latency_ms.sum() == sum(range(9))
