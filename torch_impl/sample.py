"""Sample text from a checkpoint: `python -m torch_impl.sample --checkpoint PATH [--prompt TEXT] ...`.

PATH is one of our checkpoints, a run folder (its newest checkpoint) or a Hugging Face GPT-2 folder
(config.json + model.safetensors). Without --prompt the prompt is read from stdin when it is not a
terminal; an empty prompt starts from EOT. Text is printed as tokens are produced.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence, TextIO

import torch

from common import sampling
from common.checkpoints import CheckpointError
from common.config import ConfigError, ModelConfig, config_from_dict
from common.hf import is_hf_folder, load_hf_folder
from torch_impl import checkpoint as ckpt
from torch_impl.model import GPT
from torch_impl.train import AUTOCAST_DTYPES, generate


def build_parser() -> argparse.ArgumentParser:
    p = sampling.build_parser("python -m torch_impl.sample", __doc__,
                              checkpoint_help="checkpoint folder, run folder, or HF GPT-2 folder",
                              prompt_help="text to continue (default: stdin when piped, else EOT)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp64"), default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def load_model(path: str | Path, dtype: str = "fp32", device: str = "cpu") -> GPT:
    """Our checkpoint (or run folder) or a HF GPT-2 folder, as an eval-mode GPT."""
    if is_hf_folder(path):
        cfg, weights = load_hf_folder(path)
        model = GPT.from_common(weights, cfg, source=str(path))
    else:
        folder = ckpt.resolve(path)
        meta = ckpt.read_meta(folder)
        try:
            cfg: ModelConfig = config_from_dict(meta["config"]).model
        except (KeyError, TypeError, AttributeError, ConfigError) as e:
            raise CheckpointError(f"{folder / ckpt.META}: no readable config ({e})") from None
        model = GPT(cfg)
        try:
            model.load_state_dict(ckpt.read_weights(folder), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / ckpt.WEIGHTS}: weights do not fit the model of its config ({e})") \
                from None
    return model.to(device=device, dtype=torch.float64 if dtype == "fp64" else torch.float32).eval()


def _device(flag: str) -> str:
    if flag == "cuda" and not torch.cuda.is_available():
        raise sampling.UsageError("--device cuda: torch sees no CUDA device")
    return "cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()) else "cpu"


def run(args: argparse.Namespace, model: GPT, prompt_text: str, out: TextIO) -> None:
    device = next(model.parameters()).device.type
    prompt = sampling.encode_prompt(prompt_text, model.cfg.vocab_size)
    dtype = AUTOCAST_DTYPES.get(args.dtype)

    def tokens(i: int):
        autocast = torch.autocast(device_type=device, dtype=dtype) if dtype else None
        # One sample at a time so each streams as it is produced; seed + i makes each reproducible alone.
        for new in generate(model, prompt, 1, args.max_new_tokens, args.temperature, args.top_k, args.seed + i,
                            autocast):
            yield new[0]

    sampling.write_samples(out, prompt_text, args.num_samples, tokens)


def main(argv: Sequence[str] | None = None) -> int:
    def load(args: argparse.Namespace) -> GPT:
        return load_model(args.checkpoint, args.dtype, _device(args.device))

    return sampling.main(argv, build_parser(), load, run)


if __name__ == "__main__":
    sys.exit(main())
