"""The release builds: a wheel from the tracked source installs in a fresh venv and runs, schemas included."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import tomllib

from ._release import ROOT, built_wheel, release_env  # noqa: F401 - fixtures

PARTS_WITH_DATA = {"modelcd/events/schemas": "*.schema.json"}


def test_wheel_holds_every_part_and_the_schemas(built_wheel: Path) -> None:  # noqa: F811
    """Every package pyproject declares is in the wheel with every module of its folder, and the JSON Schemas."""
    names = set(zipfile.ZipFile(built_wheel).namelist())
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pkg, folder in cfg["package-dir"].items():
        inside = pkg.replace(".", "/")
        for module in (ROOT / folder).glob("*.py"):
            assert f"{inside}/{module.name}" in names, f"{module} is missing from the wheel"
    # A folder of ours with Python in it but not declared would silently be left out of every release.
    declared = {Path(f).parts[0] for f in cfg["package-dir"].values()}
    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert ours <= declared, f"parts not in pyproject's package-dir: {ours - declared}"
    schemas = sorted(p.name for p in (ROOT / "events" / "schemas").glob("*.schema.json"))
    assert schemas and all(f"modelcd/events/schemas/{s}" in names for s in schemas)


def test_wheel_installs_in_a_fresh_venv_and_runs(release_env: Path) -> None:  # noqa: F811
    """`modelcd --version` runs from the fresh venv, imports come from the wheel, and the schemas load."""
    out = subprocess.run([str(release_env / "bin" / "modelcd"), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("modelcd "), out.stderr
    probe = ("import pathlib, modelcd, modelcd.fleet.frontdoor, modelcd.placement.plan; "
             "from modelcd.events.schemas import SCHEMA_DIR; "
             "print(pathlib.Path(modelcd.__file__).parent); print(len(list(SCHEMA_DIR.glob('*.schema.json'))))")
    out = subprocess.run([str(release_env / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=release_env)  # not the source tree's folder: `python -c` imports from cwd
    assert out.returncode == 0, out.stderr
    where, count = out.stdout.split()
    assert str(release_env) in where  # not the source tree
    assert int(count) == len(list((ROOT / "events" / "schemas").glob("*.schema.json")))
