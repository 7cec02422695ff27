"""bench.workers: the child-process plumbing every bench shares (environment, pinning, tagged JSON answers)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench import workers

ROOT = Path(__file__).resolve().parent.parent
# A child that answers through the plumbing while a library writes to its stdout, at Python and at descriptor level.
ECHO = """
import os
from bench.workers import answer_channel, commands, reply
channel = answer_channel()
print("a library's print")
os.write(1, b"a native library's line\\n")
reply(channel, {"ready": True})
for command, arg in commands():
    if command == "fail":
        raise SystemExit("asked to fail: " + arg)
    reply(channel, {"command": command, "arg": arg})
    if command == "exit":
        break
"""


def test_workers_get_the_makefiles_allocator_settings_unless_the_parent_has_its_own():
    makefile = (ROOT / "Makefile").read_text()
    assert f"GLIBC_TUNABLES ?= {workers.MAKEFILE_TUNABLES}\n" in makefile
    extra, note = workers.allocator_env({})
    assert extra == {"GLIBC_TUNABLES": workers.MAKEFILE_TUNABLES} and "not set in the environment" in note
    extra, note = workers.allocator_env({"GLIBC_TUNABLES": workers.MAKEFILE_TUNABLES})
    assert extra == {} and "(the Makefile's value, in the environment of every worker)" in note
    extra, note = workers.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert extra == {} and "glibc.malloc.hugetlb=0 (from the environment, not the Makefile's value" in note



def test_children_run_from_the_root_with_its_code_first_and_the_callers_additions():
    env = workers.child_env({"GLIBC_TUNABLES": "x"}, base={"PYTHONPATH": "/elsewhere", "HOME": "/h"})
    assert env == {"PYTHONPATH": f"{ROOT}{os.pathsep}/elsewhere", "HOME": "/h", "GLIBC_TUNABLES": "x"}
    assert workers.child_env(base={})["PYTHONPATH"] == str(ROOT)
    assert workers.module_command("parity.probe", ["--sizes", 64]) == [sys.executable, "-m", "parity.probe",
                                                                       "--sizes", "64"]
    assert workers.module_command("m", pin="0", launcher=["torchrun"]) == ["taskset", "-c", "0", "torchrun", "-m", "m"]


def test_pin_takes_taskset_cpu_lists_of_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert workers.parse_pin(None) is None
    for good in ("0-3", "1,3", "2", "0-3:2", "0,2-3"):
        assert workers.parse_pin(good) == good
    with pytest.raises(workers.UsageError, match=r"^--pin 2-4: CPU 4 is not one this process may run on \(0, 1, 2, 3\)$"):
        workers.parse_pin("2-4")
    with pytest.raises(workers.UsageError, match=r"^--pin 0-6:3: CPU 6 is not one"):
        workers.parse_pin("0-6:3")
    for bad in ("", "a", "3-1", "0,,1", "-1", "0-", "0, 1", "0-3:0", "\u0663"):  # taskset takes no spaces, ASCII digits
        with pytest.raises(workers.UsageError, match="^--pin: expected a CPU list"):
            workers.parse_pin(bad)


def test_one_shot_child_answers_are_found_among_library_output():
    done = workers.run([sys.executable, "-c", ECHO])
    assert done.returncode == 0 and done.answers == [{"ready": True}]
    assert done.answer("echo") == {"ready": True}
    assert "a library's print" in done.stderr


def test_failed_child_is_an_error_that_quotes_its_stderr():
    done = workers.run([sys.executable, "-c", "import sys; print('the reason', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"^probe failed \(exit 3\): the reason$"):
        done.answer("probe")
    silent = workers.run([sys.executable, "-c", "pass"])
    with pytest.raises(RuntimeError, match="^probe gave no answer"):
        silent.answer("probe")
    assert silent.check("probe") is silent


def test_persistent_worker_answers_each_command_and_reports_its_death():
    w = workers.Worker("echo", [sys.executable, "-c", ECHO])
    assert w.read() == {"ready": True}
    assert w.ask("window 5") == {"command": "window", "arg": "5"}
    assert w.close() == {"command": "exit", "arg": ""} and w.proc.returncode == 0
    dying = workers.Worker("echo", [sys.executable, "-c", ECHO])
    try:
        dying.read()
        with pytest.raises(RuntimeError, match=r"(?s)^echo worker died \(exit 1\): a library's print\nasked to fail: now$"):
            dying.ask("fail now")
        with pytest.raises(RuntimeError, match="echo worker died"):
            dying.ask("window 1")  # its stdin is closed: the same error, not a BrokenPipeError
    finally:
        dying.kill()
