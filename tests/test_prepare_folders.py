"""common.prepare's folder: a prepared folder is kept, an interrupted or failed preparation never leaves a half-written
one, concurrent runs take turns, and the trainers' default corpus is prepared on first use."""
import json

import pytest

from common import prepare as P
from test_prepare import error_line, read_all, run


def test_rerun_is_noop_and_interrupted_run_completes(tmp_path, txt_dir, capsys):
    out = tmp_path / "out"
    args = ("--input", txt_dir, "--out", out, "--val-tokens", 5, "--shard-size", 7, "--workers", 1)
    assert run(*args) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    capsys.readouterr()
    assert run(*args) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before

    (out / "manifest.json").unlink()  # as if killed before the end
    (out / "corpus_train_000002.bin").unlink()
    (out / "corpus_train_000003.bin.tmp").write_bytes(b"partial")
    (out / "corpus_train_000099.bin").write_bytes(b"stale")
    assert run(*args) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == {name: data for name, (_, data) in before.items()}


def test_a_run_waiting_on_a_refused_run_keeps_the_folder_to_itself(tmp_path, monkeypatch, capsys):
    """A refused run removes the folder it made, lock file included, while a second run waits for its lock:
    the second run makes the folder and lock again, and a third run still has to wait for it."""
    import fcntl
    import threading
    import time

    go, out, src = threading.Event(), tmp_path / "o", tmp_path / "a.txt"
    src.write_text("hello\n")

    def documents(paths, field):
        yield "a first document"
        go.wait(10)
        raise P.PrepareError("a bad row mid-stream")

    monkeypatch.setattr(P, "input_documents", documents)
    refused = threading.Thread(target=P.main, args=(["--input", str(src), "--out", str(out), "--workers", "1"],))
    refused.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the refused run holds its lock
        if (out / ".prepare.lock").exists():
            with open(out / ".prepare.lock", "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    break
        threading.Event().wait(0.01)
    else:
        pytest.fail("the refused run never took its lock")
    held, release = threading.Event(), threading.Event()

    def waiting_run():
        with P._locked(out):
            held.set()
            release.wait(10)

    waiter = threading.Thread(target=waiting_run)
    waiter.start()
    go.set()
    refused.join(10)
    assert held.wait(10) and out.is_dir()
    with open(out / ".prepare.lock", "a") as third, pytest.raises(BlockingIOError):
        fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    release.set()
    waiter.join(10)
    assert "a bad row mid-stream" in capsys.readouterr().err


def test_a_failed_redo_keeps_the_last_preparation(tmp_path, txt_dir, capsys):
    out = tmp_path / "out"
    assert run("--input", txt_dir, "--out", out, "--name", "corpus", "--val-tokens", 5, "--shard-size", 7) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    capsys.readouterr()
    assert run("--input", bad, "--out", out, "--name", "corpus", "--force") == 2
    assert "bad.jsonl:2: not valid JSON" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # staging gone, old shards untouched
    # A killed redo's staging folder goes with the next run, even one that finds the folder prepared.
    (out / ".corpus.staging").mkdir()
    (out / ".corpus.staging" / "corpus_train_000001.bin").write_bytes(b"partial")
    assert run("--input", txt_dir, "--out", out, "--name", "corpus") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_stopped_before_its_first_shard_leaves_nothing(tmp_path, txt_dir, monkeypatch):
    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "get_tokenizer", stopped)
    with pytest.raises(KeyboardInterrupt):
        P.main(["--input", str(txt_dir), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ensure_default_data(tmp_path, monkeypatch):
    # the real corpus takes a few seconds on 2 cores; a slice of it tests the same path
    small = [p for p in P.stdlib_documents() if p.name in ("this.py", "keyword.py", "bisect.py")]
    monkeypatch.setattr(P, "stdlib_documents", lambda: small)
    monkeypatch.setattr(P, "STDLIB_VAL_TOKENS", 100)
    folder = P.ensure_default_data(tmp_path / "stdlib")
    m, stream = read_all(folder)
    assert m["name"] == "stdlib" and m["source"]["kind"] == "python-stdlib"
    assert m["totals"]["documents"] == len(small) == 3
    assert [s["split"] for s in m["shards"]] == ["val", "train"]
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    assert P.ensure_default_data(folder) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime


def test_older_preparation_is_kept_by_the_cli_and_redone_for_the_default(tmp_path, monkeypatch, capsys):
    small = [p for p in P.stdlib_documents() if p.name in ("this.py", "keyword.py", "bisect.py")]
    monkeypatch.setattr(P, "stdlib_documents", lambda: small)
    monkeypatch.setattr(P, "STDLIB_VAL_TOKENS", 100)
    folder = P.ensure_default_data(tmp_path / "stdlib")
    assert P.is_current(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["split"]  # as written before the split rule was recorded
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert not P.is_current(folder)
    capsys.readouterr()
    assert run("--out", folder) == 0  # an explicit folder: kept, with a note
    assert "older rule" in capsys.readouterr().out and not P.is_current(folder)
    P.ensure_default_data(folder)  # the trainers' default corpus: prepared again, once
    assert P.is_current(folder) and "preparing it again" in capsys.readouterr().out
    assert json.loads((folder / "manifest.json").read_text())["split"]["drawn_from_documents"] == 3
