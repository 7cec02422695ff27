"""common/launch.py: the trainers re-execute once with the allocator tunables unless told otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import launch
from common.launch import GLIBC_TUNABLES, NO_REEXEC, ensure_allocator_env

ROOT = Path(__file__).resolve().parent.parent
glibc_only = pytest.mark.skipif(not (sys.platform.startswith("linux") and launch.platform.libc_ver()[0] == "glibc"),
                                reason="GLIBC_TUNABLES exist only on Linux with glibc")

# The -c program prints its pid, then hands over to the probe module; a re-exec replaces it, so its
# last line appears only when there was none.
PROGRAM = """
import os, sys
print("pid", os.getpid(), flush=True)
from common.launch import ensure_allocator_env
ensure_allocator_env("alloc_probe")
print("no re-exec", repr(os.environ.get("GLIBC_TUNABLES")))
"""


def run(tmp_path: Path, **env: str) -> list[str]:
    (tmp_path / "alloc_probe.py").write_text(
        'import os, sys\nprint("probe", os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), sys.argv[1:])\n')
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", NO_REEXEC)}
    base["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    out = subprocess.run([sys.executable, "-c", PROGRAM, "--steps", "3", "x y"], env={**base, **env},
                         capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path)
    return out.stdout.splitlines()


@glibc_only
def test_unset_re_executes_once_with_the_tunables_same_pid_and_arguments(tmp_path):
    pid_line, probe = run(tmp_path)
    pid = pid_line.split()[1]
    assert probe == f"probe {pid} {GLIBC_TUNABLES!r} ['--steps', '3', 'x y']"


@glibc_only
@pytest.mark.parametrize("value", ["glibc.malloc.hugetlb=0", ""])
def test_a_users_own_setting_wins(tmp_path, value):
    assert run(tmp_path, GLIBC_TUNABLES=value)[1:] == [f"no re-exec {value!r}"]


@glibc_only
def test_no_reexec_switch(tmp_path):
    assert run(tmp_path, **{NO_REEXEC: "1"})[1:] == ["no re-exec None"]


def test_no_op_without_glibc(monkeypatch):
    def execve(*args):
        raise AssertionError("must not re-execute")

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(NO_REEXEC, raising=False)
    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.setattr(launch.platform, "libc_ver", lambda *a, **k: ("", ""))  # musl, or a static build
    ensure_allocator_env("torch_impl.train")
    monkeypatch.setattr(launch.platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))
    monkeypatch.setattr(launch.sys, "platform", "darwin")
    ensure_allocator_env("torch_impl.train")


def test_makefile_exports_the_same_value():
    assert f"GLIBC_TUNABLES ?= {GLIBC_TUNABLES}\n" in (ROOT / "Makefile").read_text()
