import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import prepare as P
from common import shard_writing as W
from common.shards import read_header, read_shard
from common.tokenizer import EOT, encode
from conftest import DOCS

ROOT = Path(__file__).resolve().parent.parent


def expected_stream(texts):
    return [t for text in texts for t in [EOT] + encode(text)]


def read_all(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return m, np.concatenate([read_shard(folder / s["file"]) for s in m["shards"]]).tolist()


def split_documents(tokens):
    """Token lists of the documents in a stream (each starts with EOT; text never encodes to EOT)."""
    docs = []
    for t in tokens:
        if t == EOT:
            docs.append([])
        docs[-1].append(t)
    return docs


def documents_of(folder, split):
    m = json.loads((folder / "manifest.json").read_text())
    files = [s["file"] for s in m["shards"] if s["split"] == split]
    return split_documents(np.concatenate([read_shard(folder / f) for f in files]).tolist() if files else [])


def expected_layout(texts, val_tokens, seed=P.DEFAULT_SEED, shuffle=True):
    """(val, train, val input positions): val the shortest prefix of the seeded permutation of the
    documents holding >= val_tokens tokens, train the others in permutation (or input) order."""
    docs = split_documents(expected_stream(texts))
    order = np.random.default_rng(seed).permutation(len(docs))
    cum = np.cumsum([len(docs[i]) for i in order])
    k = int(np.argmax(cum >= val_tokens)) + 1 if val_tokens else 0
    train = order[k:] if shuffle else np.sort(order[k:])
    return [docs[i] for i in order[:k]], [docs[i] for i in train], [int(i) for i in order[:k]]


def run(*argv):
    return P.main([*map(str, argv)])


def error_line(capsys):
    """The one line the CLI printed for an error: all of stderr (no progress bar around it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_txt_folder(tmp_path, txt_dir):
    out = tmp_path / "out"
    assert run("--input", txt_dir, "--out", out, "--val-tokens", 5, "--shard-size", 7, "--workers", 1) == 0
    m, stream = read_all(out)
    want = expected_stream(DOCS)
    val, train, val_ids = expected_layout(DOCS, 5)
    assert stream == sum(val + train, [])
    assert sorted(split_documents(stream)) == sorted(split_documents(want))
    assert documents_of(out, "val") == val and documents_of(out, "train") == train
    assert m["split"] == {"rule": "random-documents", "seed": P.DEFAULT_SEED, "shuffled": True,
                          "drawn_from_documents": len(DOCS), "val_documents": val_ids}
    assert m["name"] == "corpus"
    names = [s["file"] for s in m["shards"]]
    assert names[0] == "corpus_val_000000.bin" and names[1] == "corpus_train_000001.bin"
    assert [s["split"] for s in m["shards"]] == ["val"] + ["train"] * (len(names) - 1)
    n_val = sum(map(len, val))
    assert n_val >= 5 and n_val - len(val[-1]) < 5  # whole documents, the fewest reaching --val-tokens
    full, rest = divmod(len(want) - n_val, 7)
    assert [s["tokens"] for s in m["shards"]] == [n_val] + [7] * full + ([rest] if rest else [])
    for s in m["shards"]:
        data = (out / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        assert s["documents"] == int(np.count_nonzero(read_shard(out / s["file"]) == EOT))
        assert read_header(out / s["file"]).vocab_size == 50257
    assert m["totals"] == {"documents": len(DOCS), "tokens": len(want), "shards": len(names),
                           "val_tokens": n_val, "train_tokens": len(want) - n_val}
    assert m["tokenizer"]["ranks_sha256"] == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert m["python"] and m["source"]["kind"] == "files"


def test_jsonl_and_parquet(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(DOCS[:3])) + "\n\n")
    pqf = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": DOCS[3:] + [None], "id": [1, 2, 3]}), pqf, row_group_size=1)
    out = tmp_path / "out"
    assert run("--input", jl, pqf, "--text-field", "body", "--out", out, "--name", "mix", "--val-tokens", 4,
               "--workers", 1, "--no-shuffle") == 0
    m, stream = read_all(out)
    val, train, _ = expected_layout(DOCS, 4, shuffle=False)
    assert stream == sum(val + train, [])
    assert train == [d for d in split_documents(expected_stream(DOCS)) if d not in val]  # input order, less val
    assert [s["file"] for s in m["shards"]] == ["mix_val_000000.bin", "mix_train_000001.bin"]
    assert m["totals"]["documents"] == len(DOCS) and m["split"]["shuffled"] is False


def test_worker_count_does_not_change_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "CHUNK_CHARS", 40)  # many chunks, so both workers get some
    texts = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(200)]
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        P.prepare(texts, out, "d", shard_size=300, val_tokens=100, workers=workers, verbose=False)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir() if p.suffix == ".bin")
    assert len(files) > 3 and files == sorted(p.name for p in outs[1].iterdir() if p.suffix == ".bin")
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    val, train, _ = expected_layout(texts, 100)
    assert read_all(outs[0])[1] == sum(val + train, [])


def test_missing_input_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert run("--input", missing, "--out", tmp_path / "out") == 2
    assert "nope.txt" in error_line(capsys)


def test_parquet_without_text_column_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["x"]}), bad)
    assert run("--input", bad, "--out", tmp_path / "out") == 2
    err = error_line(capsys)
    assert "bad.parquet" in err and "'text'" in err


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_jsonl_line_exit_2(tmp_path, capsys, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    out = tmp_path / "out"
    assert run("--input", bad, "--out", out / "a" / "b", "--workers", workers) == 2
    assert "bad.jsonl:2: not valid JSON" in error_line(capsys)
    assert not out.exists()  # found mid-stream: the folders the run made are gone with its shards and lock
    # A folder that was there before keeps what it held, less the refused run's shards.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run("--input", bad, "--out", out, "--workers", workers) == 2
    assert sorted(p.name for p in out.iterdir()) == [".prepare.lock", "notes.txt"]
    # What existed is judged on the real path: `x/../empty` is an empty folder that was there, and stays.
    (tmp_path / "empty").mkdir()
    assert run("--input", bad, "--out", tmp_path / "x" / ".." / "empty", "--workers", workers) == 2
    assert (tmp_path / "empty").is_dir()


def test_negative_seed_exit_2(tmp_path, txt_dir, capsys):
    assert run("--input", txt_dir, "--out", tmp_path / "out", "--seed", -3) == 2
    assert error_line(capsys) == "error: --seed must be >= 0 (got -3)"


def test_hf_without_datasets_is_clean_error(tmp_path, txt_dir, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails without touching the network
    assert run("--hf", "some/dataset", "--out", tmp_path / "out") == 2
    assert "datasets" in error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before the output folder was made
    # A folder prepared already is kept without reading the source: no `datasets`, no network, exit 0.
    assert run("--input", txt_dir, "--out", tmp_path / "out") == 0
    assert run("--hf", "some/dataset", "--out", tmp_path / "out") == 0


def test_stdlib_documents():
    docs = P.stdlib_documents()
    assert len(docs) > 500
    assert docs == P.stdlib_documents()
    rel = [d.as_posix() for d in docs]
    assert rel == sorted(rel)
    assert not any("site-packages" in r for r in rel)
    assert any(r.endswith("pydoc_data/topics.py") for r in rel)
    assert any(r.endswith("/os.py") for r in rel)


def test_workers_do_not_fork_a_process_that_loaded_jax(tmp_path):
    """The trainers prepare the default corpus after importing JAX, which warns (RuntimeWarning) that
    os.fork() may deadlock; the workers then come from a forkserver, with the same bytes."""
    script = f"""
import warnings
import jax  # noqa: F401  (its at-fork hook warns on os.fork)
warnings.simplefilter("error")
from common import prepare as P, shard_writing as W
W.CHUNK_CHARS = 40
texts = [f"document {{i}}: " + "lorem ipsum " * (i % 7) for i in range(200)]
assert W.pool_context().get_start_method() == "forkserver"
P.prepare(texts, {str(tmp_path / 'w2')!r}, "d", shard_size=300, val_tokens=100, workers=2, verbose=False)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    texts = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(200)]
    val, train, _ = expected_layout(texts, 100)
    assert read_all(tmp_path / "w2")[1] == sum(val + train, [])


def distinct_texts(n):
    return [f"document {i}: " + "lorem ipsum " * (i % 11) for i in range(n)]


def test_document_order_and_val_sample(tmp_path):
    """The permutation is deterministic per seed and covers every document once; the val documents are a
    seeded sample that never appears in the train shards."""
    texts = distinct_texts(300)
    docs = split_documents(expected_stream(texts))
    layouts = {}
    for run_name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / run_name
        m = P.prepare(texts, out, "d", shard_size=500, val_tokens=400, workers=1, verbose=False, seed=seed)
        val, train = documents_of(out, "val"), documents_of(out, "train")
        assert sorted(val + train) == sorted(docs)  # every document exactly once
        assert not {tuple(d) for d in val} & {tuple(d) for d in train}
        assert [docs[i] for i in m["split"]["val_documents"]] == val
        assert sum(map(len, val)) >= 400 > sum(map(len, val[:-1]))
        assert (val, train) == expected_layout(texts, 400, seed=seed)[:2]
        layouts[run_name] = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert layouts["a"] == layouts["b"]  # same seed and inputs: the same bytes
    assert layouts["a"] != layouts["c"]
    assert [docs.index(d) for d in documents_of(tmp_path / "a", "train")] != sorted(
        docs.index(d) for d in documents_of(tmp_path / "a", "train"))  # shuffled, not input order


def test_unshuffled_val_comes_from_the_head(tmp_path, monkeypatch):
    """--no-shuffle streams: only the first VAL_POOL × val_tokens tokens are held to draw val from."""
    monkeypatch.setattr(W, "CHUNK_CHARS", 40)
    texts = distinct_texts(300)
    docs = split_documents(expected_stream(texts))
    m = P.prepare(texts, tmp_path, "d", shard_size=500, val_tokens=100, workers=1, verbose=False, shuffle=False)
    val, train = documents_of(tmp_path, "val"), documents_of(tmp_path, "train")
    held = m["split"]["drawn_from_documents"]
    assert 4 * 100 <= sum(map(len, docs[:held])) < 4 * 100 + 100  # held up to the chunk that reached 4 × 100
    assert max(m["split"]["val_documents"]) < held < len(docs)
    assert train == [d for d in docs if d not in val]
    assert not list(tmp_path.glob("*.tmp"))


def test_hf_keeps_its_order_unless_asked(tmp_path, monkeypatch):
    texts = distinct_texts(50)
    monkeypatch.setattr(P, "hf_documents", lambda *a, **k: iter(texts))
    for flag, shuffled in ((None, False), ("--shuffle", True)):
        out = tmp_path / str(flag)
        assert run("--hf", "some/dataset", "--out", out, "--val-tokens", 30, "--workers", 1,
                   *([flag] if flag else [])) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["split"]["shuffled"] is shuffled and m["split"]["seed"] == P.DEFAULT_SEED
        assert (documents_of(out, "train") == [d for d in split_documents(expected_stream(texts))
                                               if d not in documents_of(out, "val")]) is not shuffled


def test_empty_input_is_an_error_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    assert run("--input", empty, "--out", out) == 2
    assert error_line(capsys) == f"error: {empty}: no text to tokenize (every document is empty)"
    assert not (out / "manifest.json").exists() and not list(out.glob("*.bin"))


def test_a_binary_file_is_named_on_stderr_with_its_share_of_replaced_bytes(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain text, all UTF-8 " * 20)
    (corpus / "b.txt").write_bytes(b"ok" + bytes(range(128, 256)) * 2 + b"ok")  # 256 of 260 bytes are not UTF-8
    (corpus / "c.txt").write_bytes(b"caf\xe9 " + b"x" * 995)  # 1 byte in 1000: below the threshold
    assert run("--input", corpus, "--out", tmp_path / "out", "--val-tokens", 4, "--workers", 1) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: 1 input file(s) are largely not UTF-8 text (binary, or another encoding); "
                            f"their undecodable bytes became U+FFFD: {corpus / 'b.txt'} (98% of its bytes)\n")
    assert "not UTF-8" not in captured.out


def test_lone_surrogates_in_jsonl_encode_as_encode_does(tmp_path):
    jl = tmp_path / "s.jsonl"
    jl.write_text('{"text": "a\\ud800b"}\n{"text": "\\udfff x \\ud83d\\ude00"}\n')  # JSON escapes, as written
    out = tmp_path / "out"
    assert run("--input", jl, "--out", out, "--val-tokens", 0, "--workers", 1, "--no-shuffle") == 0
    texts = ["a\ud800b", "\udfff x \U0001F600"]
    assert read_all(out)[1] == expected_stream(texts) == [EOT, 64, 4210, 65, EOT, 4210, 2124, 30325, 222]


def test_no_train_shard_warning_goes_to_stderr(tmp_path, capsys):
    P.prepare(["tiny"], tmp_path / "out", "t", val_tokens=100, workers=1)
    captured = capsys.readouterr()
    assert "warning: no train shard" in captured.err and "no train shard" not in captured.out
