"""A bench worker: one training step (one of our backends or a plain baseline) timed in windows on request.

`python -m bench.trainee NAME --config C.toml [--weights W.npz]`, started by bench.pairwise: it builds the
step, trains one step (compilation, for what compiles) and answers with its time, then answers each
`window N` with the wall seconds of N more steps, and `exit` with its peak RSS (bench.workers protocol).
Every worker reads its batches from the shared loader, so all of them train on the same tokens. Under
torchrun (parity.bench --parallel) every rank runs this: rank 0 reads the commands, broadcasts each to the
others, and answers alone.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("bench.trainee")

import argparse
import importlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from bench.workers import answer_channel, commands, reply
from common.backend import BACKENDS, DistInfo, load_backend
from common.config import Config
from common.config_files import load_toml
from common.data import loader_for
from common.levers import cached_peak

PLAIN = {"torch": "plain_torch", "jax": "plain_jax"}  # each backend's plain baseline (bench/plain_*.py)
TRAINEES = BACKENDS + tuple(PLAIN.values())


@dataclass
class Trainee:
    step: Callable[[np.ndarray, np.ndarray], Any]  # one optimizer step on (accum, rows, T) batches → its loss
    peak_flops: float | None  # FLOP/s for MFU (None: not measured)
    dist: DistInfo = DistInfo()  # what this process trains of the global batch
    levers: str = ""  # the run header's levers line (our backends only)


def start(name: str, cfg: Config, weights: dict[str, np.ndarray] | None) -> Trainee:
    """The step of `name` at step 0, from `weights` (common layout) or, for a backend, its own init.

    The losses a step returns may be lazy device values: the worker converts them once per window, as
    the trainer does once per log interval, so JAX keeps dispatching the next step while one computes.
    """
    if name in BACKENDS:
        b = load_backend(name)
        dist = b.setup(cfg)
        state = b.init_state(cfg, dist, weights=weights)

        def step(x: np.ndarray, y: np.ndarray) -> Any:
            nonlocal state
            state, metrics = b.train_step(state, x, y)
            return metrics["loss"]

        chosen = b.levers(cfg, dist)
        return Trainee(step, chosen.peak_flops, dist, chosen.line())
    if name not in TRAINEES or weights is None:
        raise ValueError(f"unknown trainee {name!r}, or a plain baseline without weights")
    step, _ = importlib.import_module(f"bench.{name}").build(cfg, weights)
    # The plain step sets no lever of its own; MFU against its framework's peak, if a backend probed one here.
    base = next(b for b, plain in PLAIN.items() if plain == name)
    peak = cfg.run.peak_tflops * 1e12 if cfg.run.peak_tflops > 0 else (cached_peak(base, cfg.run.dtype) or (None,))[0]
    return Trainee(step, peak)


def serve(name: str, cfg_path: Path, weights_path: Path | None) -> None:
    channel = answer_channel()
    cfg = load_toml(cfg_path)
    weights = dict(np.load(weights_path)) if weights_path else None
    trainee = start(name, cfg, weights)
    dist = trainee.dist
    loader = loader_for(cfg, dist)

    def steps(n: int) -> dict[str, Any]:
        """Wall seconds of n steps (loader included, as in the trainer), the loader's part, and the losses."""
        losses, loader_s = [], 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            t1 = time.perf_counter()
            x, y = loader.next_step()
            loader_s += time.perf_counter() - t1
            losses.append(trainee.step(x, y))
        losses = [float(v) for v in losses]  # the window's one host sync
        return {"seconds": time.perf_counter() - t0, "loader_seconds": loader_s, "losses": losses}

    def answer(result: dict[str, Any]) -> None:
        if dist.is_main:  # the other ranks' answers would be the same
            reply(channel, result)

    first = steps(1)
    answer({"first_step_s": first["seconds"], "loader_seconds": first["loader_seconds"],
            "losses": first["losses"], "peak_flops": trainee.peak_flops, "levers": trainee.levers})
    for command, arg in rank_commands(dist):
        if command == "window":
            answer(steps(int(arg)))
        elif command == "exit":
            answer({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            return


def rank_commands(dist: DistInfo) -> Iterator[tuple[str, str]]:
    """The parent's commands: from stdin, or with several processes (torch ranks: JAX runs its devices in one
    process here) from rank 0's stdin, broadcast so that every rank takes the same steps."""
    if dist.process_count == 1:
        yield from commands()
        return
    import torch.distributed as tdist

    mine = commands() if dist.is_main else None
    while True:
        box = [next(mine, ("exit", "")) if mine else None]  # a closed stdin ends every rank
        tdist.broadcast_object_list(box, src=0)
        yield box[0]
        if box[0][0] == "exit":
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.trainee", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=TRAINEES)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--weights", type=Path, default=None, help="initial weights (common layout, .npz)")
    args = p.parse_args(argv)
    serve(args.name, args.config, args.weights)


if __name__ == "__main__":
    main()
