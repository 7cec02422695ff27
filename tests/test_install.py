"""Installation: `make` takes the newest Python 3.11-3.13 that runs; pyproject's floors admit the lock's versions and a
GPU image's CUDA builds, so `pip install -e .` over installed torch/jax has nothing to replace."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# A GPU image of today (Python 3.12, CUDA 13 builds) and this repository's CPU lock.
GPU_IMAGE = {"torch": "2.11.0+cu130", "jax": "0.11.2", "jaxlib": "0.11.2", "numpy": "2.5.2", "tiktoken": "0.14.0",
             "safetensors": "0.8.0"}


def lock_versions() -> dict[str, str]:
    pins = [line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line]
    return {name.lower(): version for name, version in pins}


def fake_pythons(tmp_path: Path, working: set[str]) -> dict[str, str]:
    """A PATH holding make and python3.11/3.12/3.13 stand-ins: those in `working` run, the others fail as a pyenv
    shim of an inactive version does (exit 127)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("make"), bin_dir / "make")
    for v in ("3.11", "3.12", "3.13"):
        exe = bin_dir / f"python{v}"
        exe.write_text("#!/bin/sh\nexit 0\n" if v in working else "#!/bin/sh\necho 'command not found' >&2\nexit 127\n")
        exe.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def make_setup_commands(env: dict[str, str], *args: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "-B", "setup", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("working, chosen", [({"3.11", "3.12", "3.13"}, "python3.13"), ({"3.11", "3.12"}, "python3.12"),
                                             ({"3.11"}, "python3.11")])
def test_make_takes_the_newest_python_that_runs(tmp_path, working, chosen):
    lines = make_setup_commands(fake_pythons(tmp_path, working))
    assert lines[0].startswith(f"{chosen} -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13)")
    assert lines[1] == f"test -x .venv/bin/python || {chosen} -m venv .venv"
    assert any("-r requirements.lock" in line for line in lines)  # the tested CPU set, whatever the version


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_python_on_the_command_line_wins(tmp_path):
    lines = make_setup_commands(fake_pythons(tmp_path, {"3.13"}), "PYTHON=python3.11")
    assert lines[0].startswith("python3.11 -c")


def test_requires_python_admits_3_11_to_3_13():
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14") if v in spec] == ["3.11", "3.12", "3.13"]


@pytest.mark.parametrize("python, versions", [("3.12", GPU_IMAGE), ("3.11", lock_versions())],
                         ids=["gpu-image", "requirements.lock"])
def test_dependency_floors_admit_the_gpu_image_and_the_lock(python, versions):
    reqs = {}
    for line in PYPROJECT["project"]["dependencies"]:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate({"python_version": python}):
            reqs[r.name.lower()] = r
    assert {"torch", "jax", "jaxlib"} <= set(reqs)
    for name, version in versions.items():
        if name in reqs:
            assert reqs[name].specifier.contains(version, prereleases=True), (name, version, str(reqs[name]))
    assert not any(s.operator in ("==", "<", "<=", "~=", "===") for r in reqs.values() for s in r.specifier), \
        "floors only: a pin or a cap would make pip replace a GPU image's own build"


def test_pip_install_editable_keeps_the_installed_torch_and_jax(tmp_path):
    """With every dependency installed (as on a GPU image, or in make's .venv), the editable install adds only the
    project: pip resolves offline and plans no other package."""
    report = tmp_path / "pip-report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--quiet", "--report", str(report), "-e", str(ROOT)], capture_output=True, text=True,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert planned == ["gpt2-twin"]
