"""`python -m parity.bench`: both backends' training throughput on the same config and the same batches.

Each backend runs in its own worker process, started from the same common weights and fed the same
batches by the shared loader, through the same `train_step` the trainers use; after compile/warm-up the
workers time windows in alternation, round by round, and the report gives medians and the JAX/PyTorch
ratio within each round (bench/pairwise.py).

`--parallel fsdp` runs each backend under ddp and under fsdp on `--devices N` replicas (torch: gloo ranks under
torchrun; JAX: XLA host devices) and reports both throughputs and their same-round ratio.

`--suite` runs the README's rows (tiny, small, GPT-2 124M × fp32, bf16) that way and prints one markdown
table (parity/bench_suite.py). `--vs-plain` runs each backend against the plain step a user would write
first in its framework, in the same rounds, and prints each one's speed-up over it (bench/vs_plain.py).
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("parity.bench")

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from bench.pairwise import bench, bench_config, format_table, parse_backends, plot
from bench.vs_plain import check_config, format_vs_plain, vs_plain
from bench.workers import allocator_env, parse_pin
from common.benchtiming import DEFAULT_SHAPE, SHAPES
from common.config import MAX_HOST_DEVICES, PARALLELISMS, ConfigError
from common.loop import ensure_data
from common.usage import InputError
from common.outdir import output_file, write_output
from common.usage import ExitingParser
from parity.bench_suite import SUITE_DTYPES, SUITE_ROWS, run_suite, suite_options, suite_text

SUITE_ONLY = ("rows", "dtypes", "no_pin", "pin_rounds", "compile_time", "profile")


def build_parser() -> argparse.ArgumentParser:
    p = ExitingParser(prog="python -m parity.bench", description=__doc__.splitlines()[0],
                                epilog="Config fields can be overridden: --optim.micro_batch_size 4 ... "
                                       "(with --suite, on top of each row's shape)")
    p.add_argument("--config", default="default", help="preset or TOML path (default: configs/default.toml)")
    p.add_argument("--shape", choices=tuple(SHAPES), help="a named model/batch shape applied over the config")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="compute dtype (default: the config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile on/off for the torch backend (default: the config's)")
    p.add_argument("--rounds", type=int, default=None, help="timed windows per backend, interleaved (default 5; "
                   "--suite: per row)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per timed window (default 5; --suite: "
                   "per row)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (compile) step "
                   "(default 2; --suite: per row)")
    p.add_argument("--backends", default="torch,jax", help="comma-separated subset of torch,jax")
    p.add_argument("--pin", default=None, help="run each worker under `taskset -c PIN` (e.g. 0); with --suite: "
                   "the CPUs of the single-CPU pass (default: the first CPU this process may use)")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--plot", type=Path, help="write a PNG of tokens/s per window and loss curves")
    p.add_argument("--parallel", choices=PARALLELISMS, default=None,
                   help="run each backend on --devices replicas under ddp, or under ddp and fsdp side by side")
    p.add_argument("--devices", type=int, default=None, help="replicas with --parallel (default 2)")
    p.add_argument("--vs-plain", action="store_true", help="also run each backend's plain baseline (bench/plain_*.py) "
                   "in the same rounds and print each backend's speed-up over it (fp32)")
    suite = p.add_argument_group("suite", "the README's table: rows × dtypes, both backends")
    suite.add_argument("--suite", action="store_true", help="run the benchmark suite and print one markdown table")
    suite.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(SUITE_ROWS)}")
    suite.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(SUITE_DTYPES)}")
    suite.add_argument("--no-pin", action="store_true", help="skip the single-CPU (taskset) pass")
    suite.add_argument("--pin-rounds", type=int, default=None, help="rounds of the single-CPU pass (default: "
                       "half the row's)")
    suite.add_argument("--compile-time", action="store_true", help="also time torch.compile (tens of seconds "
                       "per row)")
    suite.add_argument("--profile", action="store_true", help="per-op profile of every row (parity.profile)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        backends = parse_backends(args.backends)
        for flag in ("rounds", "steps"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ConfigError(f"--{flag} must be ≥ 1")
        if args.warmup is not None and args.warmup < 0:
            raise ConfigError("--warmup must be ≥ 0")
        args.pin = parse_pin(args.pin)
        for flag in ("json", "plot"):  # checked before the work whose result they hold
            if getattr(args, flag) is not None:
                output_file(getattr(args, flag), f"--{flag}")
        if args.devices is not None and (args.parallel is None or not 1 <= args.devices <= MAX_HOST_DEVICES):
            raise ConfigError(f"--devices needs --parallel and must be in [1, {MAX_HOST_DEVICES}]")
        if args.parallel and (args.suite or args.vs_plain):
            raise ConfigError(f"--parallel does not apply to {'--suite' if args.suite else '--vs-plain'}")
        if args.suite:
            if args.vs_plain:
                raise ConfigError("--vs-plain does not apply to --suite")
            opts = suite_options(args, overrides, backends)
            command = "python -m parity.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
            report = run_suite(opts, command, args.json, lambda msg: print(msg, file=sys.stderr, flush=True))
            print(suite_text(report))
            return 0
        used = [f"--{f.replace('_', '-')}" for f in SUITE_ONLY if getattr(args, f) not in (None, False)]
        if used:
            raise ConfigError(f"{used[0]} needs --suite")
        rounds, steps, warmup = args.rounds or 5, args.steps or 5, 2 if args.warmup is None else args.warmup
        devices = (args.devices or 2) if args.parallel else 1
        cfg = bench_config(args.config, args.shape or DEFAULT_SHAPE, overrides, args.dtype, args.compile,
                           1 + warmup + rounds * steps, devices)
        if args.vs_plain:
            check_config(cfg)  # before preparing any data
            ensure_data(cfg, print)
            extra_env, env_note = allocator_env(os.environ)
            report = vs_plain(cfg, rounds, steps, warmup, args.pin, backends, extra_env)
            print(format_vs_plain(report, env_note))
        else:
            ensure_data(cfg, print)
            modes = {None: (), "ddp": ("ddp",), "fsdp": ("ddp", "fsdp")}[args.parallel]
            report = bench(cfg, rounds, steps, warmup, args.pin, backends, parallel=modes)
            print(format_table(report))
        if args.json:
            write_output(args.json, json.dumps(report, indent=1) + "\n")
        if args.plot:
            plot(report, args.plot)
            print(f"plot written to {args.plot}")
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
