"""common/outdir.py: output folders that cannot be created are one error naming the flag; one holder per folder."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from common.outdir import LOCK, FolderError, hold, in_use, make_output_dir, output_file, write_output
from helpers import ROOT

HOLDER = """
import sys, time
from common.outdir import hold
with hold(sys.argv[1], "run.out_dir"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_folder_under_a_file_names_the_flag_and_the_file(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(FolderError, match=f"^--out: cannot create {blocker}/a/b: {blocker} is a file, not a folder$"):
        make_output_dir(blocker / "a" / "b", "--out")
    with pytest.raises(FolderError, match=f"^--out: cannot create {blocker}: {blocker} is a file, not a folder$"):
        make_output_dir(blocker, "--out")
    assert make_output_dir(tmp_path / "new" / "run", "--out").is_dir()


def test_a_report_destination_is_checked_without_creating_anything_and_written_with_its_folders(tmp_path):
    target = tmp_path / "new" / "r.json"
    assert output_file(target, "--json") == target and list(tmp_path.iterdir()) == []
    assert write_output(target, "{}") == target and target.read_text() == "{}"
    with pytest.raises(FolderError, match=f"^--plot: {tmp_path / 'new'} is a folder; give a file name$"):
        output_file(tmp_path / "new", "--plot")
    (tmp_path / "f").write_text("kept")
    with pytest.raises(FolderError, match=f"^--json: cannot create {tmp_path / 'f' / 'a'}: {tmp_path / 'f'} is a file"):
        output_file(tmp_path / "f" / "a" / "r.json", "--json")
    assert output_file(tmp_path / "f", "--json") == tmp_path / "f" and (tmp_path / "f").read_text() == "kept"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FolderError, match="dangling exists and is not a regular file"):
        output_file(tmp_path / "dangling", "--json")
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "dangling").is_symlink()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's /proc takes no new files, even from root")
def test_a_folder_that_takes_no_new_file_is_refused_before_the_work():
    with pytest.raises(FolderError, match="^--json: cannot write /proc/r.json: "):
        output_file("/proc/r.json", "--json")


def test_the_lock_names_its_holder_and_is_released_at_the_end(tmp_path):
    with hold(tmp_path / "run", "run.out_dir"):
        assert (tmp_path / "run" / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(FolderError, match=f"run.out_dir: {tmp_path / 'run'} is in use by pid {os.getpid()}"):
            with hold(tmp_path / "run", "run.out_dir"):
                pass
    with hold(tmp_path / "run", "run.out_dir"):  # released
        pass


def start_holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_holding_the_folder_is_named_and_its_lock_is_taken_over_once_it_is_killed(tmp_path):
    proc = start_holder(tmp_path)
    try:
        with pytest.raises(FolderError, match=f"is in use by pid {proc.pid} on {socket.gethostname()}"):
            with hold(tmp_path, "run.out_dir"):
                pass
        proc.send_signal(signal.SIGKILL)  # no clean-up runs: the lock file stays, naming the dead process
        proc.wait()
        assert (tmp_path / LOCK).read_text().startswith(f"pid {proc.pid} ")
        with hold(tmp_path, "run.out_dir"):  # the kernel dropped the dead process's flock: taken over
            assert (tmp_path / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    finally:
        proc.kill()
        proc.wait()


def test_in_use_names_a_live_holder_only_and_creates_nothing(tmp_path):
    assert in_use(tmp_path / "nothing") is None and not (tmp_path / "nothing").exists()
    proc = start_holder(tmp_path)
    try:
        assert in_use(tmp_path) == f"pid {proc.pid} on {socket.gethostname()}"
        with pytest.raises(FolderError):  # reading the lock did not take it
            with hold(tmp_path, "run.out_dir"):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert in_use(tmp_path) is None and (tmp_path / LOCK).read_text().startswith(f"pid {proc.pid} ")
    with hold(tmp_path, "run.out_dir"):  # in_use let go of what it took to look
        assert in_use(tmp_path) == f"pid {os.getpid()} on {socket.gethostname()}"


def test_a_second_trainer_process_exits_2_naming_the_holder(tmp_path, tiny_shards):
    from helpers import trainer_args

    proc = start_holder(tmp_path / "run")
    try:
        argv = trainer_args(tiny_shards, {"run.out_dir": tmp_path / "run", "model.n_layer": 1, "optim.max_steps": 1,
                                          "optim.total_batch_size": 64})
        done = subprocess.run([sys.executable, "-m", "torch_impl.train", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 2
        assert done.stderr == (f"error: run.out_dir: {tmp_path / 'run'} is in use by pid {proc.pid} on "
                               f"{socket.gethostname()} (lock file {tmp_path / 'run' / LOCK}); wait for that run to "
                               f"end or choose another run.out_dir\n")
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK]  # nothing written
    finally:
        proc.kill()
        proc.wait()


def test_a_file_system_without_locks_warns_and_lets_the_run_proceed(tmp_path, monkeypatch, capsys):
    import errno

    import common.outdir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(common.outdir.fcntl, "flock", no_locks)
    with hold(tmp_path / "run", "run.out_dir") as folder:
        assert folder == tmp_path / "run"
    assert capsys.readouterr().err == (f"warning: run.out_dir: cannot lock {tmp_path / 'run' / LOCK} "
                                       f"({os.strerror(errno.ENOLCK)}); a second run into {tmp_path / 'run'} would "
                                       f"not be refused\n")
