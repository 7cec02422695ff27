"""common/checkpoints.py integrity data: meta.json records a sha256 per file of its step folder, checked by
every reader (resume, evaluate, sample, convert: open_checkpoint and read_portable) before a file is used."""
from __future__ import annotations

import hashlib
import json
import warnings

import pytest

from common.checkpoints import CheckpointError, file_hashes, open_checkpoint, read_meta
from common.portable import read_portable
from conftest import tiny_config
from helpers import backend_of, meta

BACKENDS = ["torch", "jax"]


@pytest.fixture(scope="module", params=BACKENDS)
def saved(request, tmp_path_factory):
    """(backend, config, step folder) of a fresh state saved as step 1."""
    backend = backend_of(request.param)
    out = tmp_path_factory.mktemp(f"{request.param}-ckpt")
    cfg = tiny_config(out, out)
    state = backend.init_state(cfg, backend.setup(cfg))
    return backend, cfg, backend.save_checkpoint(state, out, meta(backend, cfg, 1))


def test_every_file_but_meta_json_is_recorded_with_its_sha256(saved):
    backend, _, folder = saved
    files = read_meta(folder).files
    on_disk = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in folder.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert files == on_disk == file_hashes(folder)
    if backend.name == "torch":
        assert sorted(files) == ["model.safetensors", "train_state.pt"]
    else:  # every file orbax wrote, its metadata as well as the arrays
        assert {"params/manifest.ocdbt", "opt_state/manifest.ocdbt", "rng/manifest.ocdbt"} <= set(files)
        assert len(files) > 10


def copy_of(folder, tmp_path):
    import shutil

    dst = tmp_path / "checkpoints" / folder.name
    shutil.copytree(folder, dst)
    return dst


def test_any_changed_byte_is_refused_by_every_reader_naming_the_file(saved, tmp_path):
    backend, cfg, folder = saved
    for rel in sorted(read_meta(folder).files):
        bad = copy_of(folder, tmp_path / rel.replace("/", "_"))
        target = bad / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1  # one bit
        target.write_bytes(bytes(data))
        for read in (lambda: read_portable(bad), lambda: open_checkpoint(bad, cfg),
                     lambda: backend.load_checkpoint(bad, cfg, backend.setup(cfg))):
            with pytest.raises(CheckpointError, match=f"^{target}: sha256 .* differs from the .* recorded at save"):
                read()


def test_a_missing_file_is_refused_naming_it(saved, tmp_path):
    _, _, folder = saved
    bad = copy_of(folder, tmp_path)
    victim = bad / max(read_meta(bad).files)
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"^{victim}: checkpoint file unreadable"):
        read_portable(bad)


def test_a_checkpoint_saved_before_hashes_were_recorded_still_loads_quietly(saved, tmp_path, capsys):
    backend, cfg, folder = saved
    legacy = copy_of(folder, tmp_path)
    data = json.loads((legacy / "meta.json").read_text())
    del data["files"]
    (legacy / "meta.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = read_portable(legacy).weights
        backend.load_checkpoint(legacy, cfg, backend.setup(cfg))
    assert read_meta(legacy).files is None and set(weights) == set(read_portable(folder).weights)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
