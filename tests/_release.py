"""The release under test, built as CI builds it: a wheel from the tracked source, installed in a fresh venv.

`built_wheel` copies the source tree (without virtual environments, build output and caches), runs
`pip wheel --no-deps` on the copy, and `release_env` installs that wheel alone in a new virtual
environment whose only other path is a `.pth` to the test venv's site-packages (the dependencies,
already installed: nothing is downloaded). A `modelcd` imported there comes from the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".modelcd",
                              "demo-packages", ".pytest_cache")


def deps_site() -> Path:
    """The site-packages that holds the installed dependencies (msgspec's)."""
    return Path(msgspec.__file__).resolve().parent.parent


def build_wheel(out: Path) -> Path:
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the wheel does not build:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("modelcd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def make_env(path: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed (no dependencies fetched); returns its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    py = path / "bin" / "python"
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "_modelcd_deps.pth").write_text(str(deps_site()) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the wheel does not install:\n{proc.stdout}\n{proc.stderr}"
    caddy = Path(sys.executable).parent / "caddy"
    if caddy.exists() and not (path / "bin" / "caddy").exists():
        (path / "bin" / "caddy").symlink_to(caddy.resolve())  # the fleet extra's binary, as pip would place it
    return py


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def release_env(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The candidate environment (a venv path, as `modelcd release ... ENV` takes it)."""
    path = tmp_path_factory.mktemp("candidate") / "env"
    make_env(path, built_wheel)
    return path
