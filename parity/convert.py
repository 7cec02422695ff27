"""`python -m parity.convert SRC DST --to torch|jax|hf`: move a checkpoint between backends and HF.

Sources: a torch checkpoint, a JAX (orbax) checkpoint, either's run folder (newest checkpoint), or a
Hugging Face GPT-2 folder (`config.json` + `model.safetensors`), read by common/portable.py. Model
weights always move; AdamW's moments and step move between the two backends (a Hugging Face folder
holds weights only). Weights pass through common weights (common/names.py), which neither side
transposes, so torch → JAX → torch is bit-identical.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

from common.backend import load_backend
from common.checkpoints import CHECKPOINT_SUBDIR, CheckpointMeta, latest_checkpoint, step_of
from common.usage import InputError, Parser
from common.config import ConfigError
from common.hf import save_hf_folder
from common.outdir import LOCK, FolderError, hold, make_output_dir
from common.portable import BACKENDS, Portable, read_portable


def get_backend(name: str):
    """`{name}_impl.train.BACKEND`."""
    if name not in BACKENDS:
        raise ConfigError(f"--to: unknown target '{name}' (torch, jax or hf)")
    return load_backend(name)


def write_portable(p: Portable, dst: str | Path, target: str) -> Path:
    """Write `p` as a checkpoint of `target` under run folder `dst` (or as a HF folder at `dst`)."""
    dst = Path(dst)
    if target == "hf":
        return save_hf_folder(dst, p.config.model, p.weights)
    backend = get_backend(target)
    # Writing needs no training mesh: a run trained on N JAX devices is written from one.
    local = dataclasses.replace(p.config, run=dataclasses.replace(p.config.run, devices=1))
    state = backend.init_state(local, backend.setup(local), weights=p.weights, moments=p.moments)
    meta = p.meta or CheckpointMeta(step=p.step, backend=target, config=p.config.to_dict())
    return backend.save_checkpoint(state, dst, meta.replace(step=p.step, backend=target, config=p.config.to_dict()))


def convert(src: str | Path, dst: str | Path, target: str) -> tuple[Portable, Path]:
    """Read `src` and write it as `target` at `dst`, a run folder held under its lock as a training run holds
    it (common/outdir.py): (what was read, the folder written)."""
    portable = read_portable(src, moments=target != "hf")  # first: a source refused leaves no DST behind
    check_destination(dst, target)
    make_output_dir(dst, "DST")
    with hold(dst, "DST") if target != "hf" else contextlib.nullcontext():
        check_destination(dst, target)  # again under the lock: a run may have saved into it meanwhile
        return portable, write_portable(portable, dst, target)


def check_destination(dst: str | Path, target: str) -> None:
    """Refuse a DST whose contents the conversion would overwrite or mix with: a run folder that holds
    checkpoints (SRC's own included), or for --to hf any folder with files in it."""
    dst = Path(dst).resolve()  # a link or `..` must not hide a checkpoint's folder
    if target == "hf":
        if dst.is_dir() and any(p.name != LOCK for p in dst.iterdir()):
            raise FolderError(f"DST: {dst} is not empty; the Hugging Face files go into a new folder")
    elif any(step_of(p) is not None or p.name == CHECKPOINT_SUBDIR for p in (dst, *dst.parents)):
        raise FolderError(f"DST: {dst} is a checkpoint's own folder; give a run folder")
    elif dst.is_dir() and (latest := latest_checkpoint(dst)) is not None:
        raise FolderError(f"DST: {dst} already holds checkpoints (newest: {latest.name}); give a new run folder")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m parity.convert", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="torch or JAX checkpoint / run folder, or a HF GPT-2 folder")
    p.add_argument("dst", type=Path, help="run folder to write the checkpoint into (for --to hf: the HF folder)")
    p.add_argument("--to", required=True, choices=("torch", "jax", "hf"))
    try:
        args = p.parse_args(argv)
        portable, out = convert(args.src, args.dst, args.to)
        moved = "weights + optimizer state" if portable.moments and args.to != "hf" else "weights"
        print(f"{portable.kind} {args.src} → {args.to} {out} (step {portable.step}, {moved})")
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
