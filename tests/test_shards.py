import json

import numpy as np
import pytest

from common.shards import (HEADER_BYTES, MAGIC, VERSION, ShardError, list_shards, read_header, read_shard,
                           write_shard)


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50257, size=n, dtype=np.int64).astype(np.uint16)


def test_round_trip(tmp_path):
    t = tokens(1000)
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, t)
    assert np.array_equal(read_shard(path), t)
    assert path.stat().st_size == HEADER_BYTES + 2 * t.size
    assert not list(tmp_path.glob("*.tmp"))


def test_header_fields(tmp_path):
    path = tmp_path / "x_val_000000.bin"
    write_shard(path, tokens(10), vocab_size=50257, eot=50256)
    raw = np.fromfile(path, dtype="<i4", count=256)
    assert list(raw[:5]) == [MAGIC, VERSION, 10, 50257, 50257]
    assert not raw[5:].any()
    h = read_header(path)
    assert (h.version, h.num_tokens, h.vocab_size, h.eot) == (1, 10, 50257, 50256)


def test_empty_shard(tmp_path):
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, np.zeros(0, dtype=np.uint16))
    assert read_shard(path).size == 0


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0] ^= 0xFF
    elif how == "version":
        data[4:8] = (7).to_bytes(4, "little")
    elif how == "truncated":
        data = data[:-3]
    elif how == "extra":
        data += b"\0\0"
    elif how == "short_header":
        data = data[:100]
    elif how == "big_id":
        data[HEADER_BYTES:HEADER_BYTES + 2] = (60000).to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["magic", "version", "truncated", "extra", "short_header", "big_id"])
def test_corruption_is_shard_error_naming_the_file(tmp_path, how):
    path = tmp_path / "corpus_train_000001.bin"
    write_shard(path, tokens(100))
    _corrupt(path, how)
    with pytest.raises(ShardError, match="corpus_train_000001.bin"):
        read_shard(path)


def test_ids_above_model_vocab(tmp_path):
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, np.array([1, 2, 50000], dtype=np.uint16))
    assert read_shard(path, vocab_size=50257).tolist() == [1, 2, 50000]
    with pytest.raises(ShardError, match="x_train_000001.bin"):
        read_shard(path, vocab_size=1000)


def test_write_rejects_out_of_vocab(tmp_path):
    with pytest.raises(ShardError, match="bad.bin"):
        write_shard(tmp_path / "bad.bin", np.array([50257]))


def test_build_nanogpt_npy(tmp_path):
    t = tokens(500)
    path = tmp_path / "edufineweb_train_000001.npy"
    np.save(path, t)
    assert np.array_equal(read_shard(path), t)
    h = read_header(path)
    assert (h.num_tokens, h.vocab_size, h.eot) == (500, 50257, 50256)


def test_llmc_header_without_vocab_and_eot(tmp_path):
    t = tokens(50)
    path = tmp_path / "fineweb_val_000000.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = MAGIC, 1, t.size  # llm.c writes only slots 0-2
    path.write_bytes(header.tobytes() + t.astype("<u2").tobytes())
    assert np.array_equal(read_shard(path), t)
    h = read_header(path)
    assert (h.vocab_size, h.eot) == (50257, 50256)


def test_list_shards(tmp_path):
    for name in ["d_train_000002.bin", "d_val_000000.bin", "d_train_000001.bin", "e_train_000003.npy",
                 "d_train_000004.bin.tmp", "notes.txt", "manifest.json"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "d_train_000001.bin", "d_train_000002.bin", "e_train_000003.npy"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["d_val_000000.bin"]
    with pytest.raises(ShardError, match="missing"):
        list_shards(tmp_path / "missing", "train")


def test_a_manifest_decides_which_shards_a_folder_holds(tmp_path):
    # Two preparations under different names in one folder; the manifest is the second one's.
    for name in ["a_val_000000.bin", "a_train_000001.bin", "b_val_000000.bin", "b_train_000001.bin",
                 "b_train_000002.bin"]:
        (tmp_path / name).write_bytes(b"")
    shards = [{"file": f, "split": f.split("_")[1]} for f in ["b_val_000000.bin", "b_train_000001.bin",
                                                              "b_train_000002.bin"]]
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "b", "shards": shards}))
    assert [p.name for p in list_shards(tmp_path, "train")] == ["b_train_000001.bin", "b_train_000002.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["b_val_000000.bin"]
    (tmp_path / "b_train_000002.bin").unlink()
    with pytest.raises(ShardError, match="b_train_000002.bin: listed in manifest.json but missing"):
        list_shards(tmp_path, "train")


def test_negative_npy_ids_are_named_as_they_are(tmp_path):
    path = tmp_path / "x_train_000001.npy"
    np.save(path, np.array([1, -5, 7, 50256], dtype=np.int32))
    with pytest.raises(ShardError, match=r"x_train_000001\.npy: token id -5 is out of range for vocab size 50257"):
        read_shard(path)
    np.save(path, np.array([1, 60000, 7], dtype=np.int32))
    with pytest.raises(ShardError, match=r"token id 60000 is out of range"):
        read_shard(path)
