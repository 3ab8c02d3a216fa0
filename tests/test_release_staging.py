"""`modelcd release staging ENV` from the built wheel: a throwaway fleet passes every check through its public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelcd.fleet.staging import staging

from ._release import built_wheel, release_env  # noqa: F401 - fixtures

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(420)]


async def test_staging_of_the_built_wheel_passes_every_check(tmp_path: Path, release_env: Path) -> None:  # noqa: F811
    """Start, deploy+predict every flavor, shadow, rollout, retire, stop: all pass on the candidate env."""
    lines: list[str] = []
    report = await staging(release_env, workdir=tmp_path / "staging", nodes=2, keep=True, say=lines.append)
    assert report.ok, report.table() + "\n" + "\n".join(lines)
    names = [c.name for c in report.checks]
    assert names[0] == "start" and names[-1] == "stop"
    assert {"deploy+predict sklearn", "deploy+predict onnx", "deploy+predict xgboost", "deploy+predict lightgbm",
            "shadow", "rollout", "retire"} <= set(names)


def test_staging_cli_fails_with_a_reason_for_an_env_without_modelcd(tmp_path: Path) -> None:
    """An ENV that is not a virtual environment: exit non-zero, saying what ENV must be."""
    out = subprocess.run([sys.executable, "-m", "modelcd", "release", "staging", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0 and "not a virtual environment" in out.stderr
