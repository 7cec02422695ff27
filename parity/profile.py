"""`python -m parity.profile`: where each backend's train step spends its time, op by op.

For each backend, in its own process (as parity.bench's workers: same config machinery, the real
`BACKEND.train_step`, batches from the shared loader): a first step (JAX: compilation), warm-up
steps, then a few profiled steps, and a top-N table of ops by time per step. The plain baselines of
`parity.bench --vs-plain` (`--backends plain_torch,plain_jax`) are profiled the same way, from the
common init, so a backend's lead over its baseline, or the lack of one, can be traced to ops.

- torch: `torch.profiler` (CPU activity), `key_averages()` by self CPU time.
- JAX: `jax.profiler.trace` around the steps, then the `.xplane.pb` it writes, read back with
  `jax.profiler.ProfileData`. On CPU, XLA's thunk runtime records one event per executed HLO
  instruction (fusion, dot, copy, while ...) on its worker-thread lines of the `/host:CPU` plane, each
  carrying an `hlo_op` stat; Python-level events (the `python` line, `ThreadpoolListener`, "end: ..."
  markers) carry none and are left out. Control-flow thunks (`while`: the accumulation loop, the
  chunked loss's scan) contain their body's events, so every event is counted by its self time (its
  duration minus the events nested in it on the same thread line). Instruction names are described
  from the compiled HLO text: the output type, the main ops inside a fusion and the JAX op path.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bench import trainee, workers
from bench.pairwise import bench_config, parse_backends
from bench.trainee import BACKENDS, TRAINEES
from common.backend import load_backend
from common.benchtiming import SHAPES
from common.config import Config, ConfigError
from common.config_files import dump_toml, load_toml
from common.loop import ensure_data
from common.usage import InputError
from common.outdir import output_file, write_output
from common.usage import ExitingParser

DEFAULT_STEPS = 2
DEFAULT_WARMUP = 2
# HLO ops that only move or name data inside a fusion; the rest say what the fusion computes.
STRUCTURAL = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "broadcast", "reshape", "iota"}
# Op-path components that say nothing about an op (the jitted step, loops, the blocks' common entry);
# GPT.loss stays: below it and outside GPT.features are the head and the loss.
NOISE = {"_train_step", "Runtime._train_step", "train_step", "while", "body", "closed_call", "cond", "GPT.features"}
StepFn = Callable[[Any, Any], Any]  # one training step on an (x, y) batch → its loss
WRAPPER = re.compile(r"^(?:jvp|transpose|jit|pjit|vmap|remat|checkpoint|custom_jvp_call|custom_vjp_call)\((.*)\)$")


# ----------------------------------------------------------------------------------------- children

def child_step(name: str, cfg: Config, warmup: int, steps: int) -> tuple[StepFn, Any, list[tuple[Any, Any]]]:
    """(step, lower, batches): `step(x, y)` trains one step of `name` (a backend or a plain baseline) and returns
    its loss, `lower(x, y)` is the jitted program it runs (JAX; None for torch), and the batches to profile.
    The first step and `warmup` more have run. A plain baseline starts from the common init of the run's seed,
    as in parity.bench --vs-plain."""
    from common.data import loader_for

    if name in BACKENDS:
        b = load_backend(name)
        dist = b.setup(cfg)
        state = b.init_state(cfg, dist)

        def step(x: Any, y: Any) -> Any:
            nonlocal state
            state, m = b.train_step(state, x, y)
            return m["loss"]

        lower = _jax_lower(b.runtime(cfg), lambda: state) if name == "jax" else None
    else:
        from common.names import init_weights

        plain = trainee.start(name, cfg, init_weights(cfg.model, cfg.run.seed))
        step, dist, lower = plain.step, plain.dist, getattr(plain.step, "lower", None)
    loader = loader_for(cfg, dist)
    for _ in range(1 + warmup):  # the first step compiles (JAX) or builds kernels (torch): never profiled
        float(step(*loader.next_step()))
    # Batches read before profiling, so the tables hold the step's own ops only (the loader's share of a
    # step is in parity.bench --suite).
    return step, lower, [loader.next_step() for _ in range(steps)]


def _jax_lower(rt: Any, state: Callable[[], Any]) -> Callable[[Any, Any], Any]:
    """Our JAX step's program, lowered with the arguments exactly as BACKEND.train_step passes them, so the jit
    cache returns the executable the warm-up ran (no second compilation) and the HLO names are the ones the
    trace's events carry."""
    import numpy as np

    from jax_impl import dist as jdist

    def lower(x: Any, y: Any) -> Any:
        x, y = (jdist.put_batch(np.asarray(a).astype(np.int32), rt.batch_sharding) for a in (x, y))
        return rt.train_step.lower(state(), x, y)

    return lower


def run_steps(step: StepFn, batches: list[tuple[Any, Any]]) -> float:
    t0 = time.perf_counter()
    for x, y in batches:
        float(step(x, y))  # the trainer's own sync point, once per step
    return time.perf_counter() - t0


def torch_profile(step: StepFn, batches: list[tuple[Any, Any]]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = run_steps(step, batches)
    steps = len(batches)
    ops = [{"name": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps,
            "detail": ""} for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return {"source": "torch.profiler (CPU activity), self CPU time per op name", "per_op_events": True,
            "step_ms": wall * 1e3 / steps, "ops": ops}


def xplane_self_times(line_events: Iterable[Any]) -> list[tuple[str, str, int]]:
    """(hlo_module, hlo_op, self ns) of the HLO events of one thread line: duration minus nested events."""
    events = []
    for e in line_events:
        stats = dict(e.stats)
        if "hlo_op" in stats:
            events.append((int(e.start_ns), int(e.duration_ns), str(stats.get("hlo_module", "")),
                           str(stats["hlo_op"])))
    events.sort(key=lambda ev: (ev[0], -ev[1]))  # a parent starts no later than its children and lasts longer
    out: list[tuple[str, str, int]] = []
    stack: list[list[Any]] = []  # [end_ns, module, op, self_ns]
    for start, duration, module, op in events:
        while stack and stack[-1][0] <= start:
            _, m, o, s = stack.pop()
            out.append((m, o, s))
        if stack:
            stack[-1][3] -= duration
        stack.append([start + duration, module, op, duration])
    out += [(m, o, s) for _, m, o, s in stack]
    return out


def xplane_ops(path: str) -> tuple[dict[tuple[str, str], list[float]], list[str]]:
    """{(module, op): [self ns, events]} over the CPU plane's lines, and the names of the lines that had any."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    lines = []
    for plane in data.planes:
        for line in plane.lines:
            found = xplane_self_times(line.events)
            if found:
                lines.append(f"{plane.name}:{line.name.split('/')[0]}")
            for module, op, self_ns in found:
                totals[(module, op)][0] += self_ns
                totals[(module, op)][1] += 1
    return dict(totals), sorted(set(lines))


def _type_and_rest(text: str) -> tuple[str, str]:
    """Split `f32[2,3]{1,0} fusion(...)` or `(s32[], f32[4]) while(...)` into the type and the rest."""
    if not text.startswith("("):
        head, _, rest = text.partition(" ")
        return head, rest
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return "tuple", text[i + 1:].lstrip()
    return "tuple", ""


INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


@dataclasses.dataclass(frozen=True)
class HloIndex:
    """What the compiled HLO text says about each instruction name a profile event carries."""
    instructions: dict[str, dict[str, str]]  # name → {type, opcode, calls, op_name}
    opcodes: dict[str, list[str]]  # computation → its instructions' opcodes, in order
    root_op_names: dict[str, str]  # computation → its ROOT's op path (fusions often carry none themselves)


def parse_hlo(text: str) -> HloIndex:
    instructions: dict[str, dict[str, str]] = {}
    opcodes: dict[str, list[str]] = {}
    roots: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        m = COMPUTATION.match(line)
        if m:
            current = m.group(1)
            opcodes[current] = []
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        type_, rest = _type_and_rest(m.group(3))
        opcode = re.match(r"([\w\-]+)\(", rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        info = {"type": re.sub(r"\{[^}]*\}$", "", type_), "opcode": opcode.group(1) if opcode else "?",
                "calls": calls.group(1) if calls else "", "op_name": op_name.group(1) if op_name else ""}
        instructions[m.group(2)] = info
        if current:
            opcodes[current].append(info["opcode"])
            if m.group(1):
                roots[current] = info["op_name"]
    return HloIndex(instructions, opcodes, roots)


def short_op_path(op_name: str, keep: int = 4) -> str:
    """`jit(_train_step)/transpose(jvp(GPT.loss))/GPT.features/while/body/closed_call/h/h/ln_2/mul` →
    `bwd GPT.loss/h/ln_2/mul`: the model path of the op, without the wrappers every op has."""
    first = op_name.split(";")[0]
    parts = []
    for part in first.split("/"):
        while (m := WRAPPER.match(part)) is not None:
            part = m.group(1)
        if part and part not in NOISE and (not parts or parts[-1] != part):
            parts.append(part)
    return ("bwd " if "transpose(" in first else "") + "/".join(parts[-keep:])


def describe(op: str, hlo: HloIndex) -> str:
    """`f32[128,50257] fusion[dot,reduce] · GPT.loss/log_softmax/reduce_max`: output, contents, op path."""
    info = hlo.instructions.get(op)
    if info is None:
        return ""
    inside, op_name = info["opcode"], info["op_name"]
    if info["opcode"] == "fusion" and info["calls"] in hlo.opcodes:
        every = list(dict.fromkeys(hlo.opcodes[info["calls"]]))
        ops = [o for o in every if o not in STRUCTURAL] or [o for o in every if o != "parameter"]
        inside = "fusion[" + ",".join(ops[:4]) + (",…" if len(ops) > 4 else "") + "]"
        op_name = op_name or hlo.root_op_names.get(info["calls"], "")
    path = short_op_path(op_name)
    return f"{info['type']} {inside}" + (f" · {path}" if path else "")


def op_kind(op: str, hlo: HloIndex) -> str:
    """A coarse class for the roll-up: what dominates a fusion, or the instruction's own opcode."""
    info = hlo.instructions.get(op)
    if info is None:
        return "other"
    ops = set(hlo.opcodes.get(info["calls"], [])) | {info["opcode"]}
    for kind, members in (("dot", {"dot", "convolution"}), ("scatter", {"scatter"}), ("gather", {"gather"}),
                          ("sort", {"sort"}), ("control flow", {"while", "conditional", "call"}),
                          ("reduce", {"reduce", "reduce-window"}),
                          ("copy/layout", {"copy", "transpose", "dynamic-update-slice", "concatenate", "pad"})):
        if ops & members:
            return kind
    return "elementwise"


def jax_profile(step: StepFn, lower: Callable[[Any, Any], Any], batches: list[tuple[Any, Any]]) -> dict[str, Any]:
    import jax

    hlo = parse_hlo(lower(*batches[0]).compile().as_text())
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames are not wanted, and tracing them slows the step
    with tempfile.TemporaryDirectory(prefix="parity-profile-") as tmp:
        with jax.profiler.trace(tmp, profiler_options=options):
            wall = run_steps(step, batches)
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tmp}")
        totals, lines = xplane_ops(paths[0])
    steps = len(batches)
    main_module = next((m for m, _ in totals if "train_step" in m), "")
    ops, kinds = [], defaultdict(float)
    for (module, op), (ns, count) in totals.items():
        ours = module == main_module
        ms = ns / 1e6 / steps
        ops.append({"name": op if ours else f"{module}:{op}", "ms_per_step": ms, "calls_per_step": count / steps,
                    "detail": describe(op, hlo) if ours else ""})
        kinds[op_kind(op, hlo) if ours else "other"] += ms
    return {"source": "jax.profiler.trace → .xplane.pb, XLA CPU thunk events (stat hlo_op), self time per HLO "
                      "instruction", "per_op_events": bool(ops), "threads": lines,
            "step_ms": wall * 1e3 / steps, "ops": ops, "kinds": dict(kinds)}


def child(name: str, cfg_path: Path, warmup: int, steps: int) -> None:
    channel = workers.answer_channel()
    cfg = load_toml(cfg_path)
    step, lower, batches = child_step(name, cfg, warmup, steps)
    result = torch_profile(step, batches) if lower is None else jax_profile(step, lower, batches)
    result["ops"].sort(key=lambda o: -o["ms_per_step"])
    workers.reply(channel, {"backend": name, "steps": steps, "warmup": warmup, **result})


# ------------------------------------------------------------------------------------------- parent

def profile_config(cfg: Config, backends: Sequence[str] = BACKENDS, steps: int = DEFAULT_STEPS,
                   warmup: int = DEFAULT_WARMUP, extra_env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Profile each backend's train step on `cfg`, one process per backend, one after the other."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="parity-profile-") as tmp:
        cfg_path = Path(tmp) / "config.toml"
        cfg_path.write_text(dump_toml(cfg))
        for name in backends:
            cmd = workers.module_command("parity.profile", ["--child", name, "--config", cfg_path, "--steps", steps,
                                                            "--warmup", warmup])
            results[name] = workers.run(cmd, extra_env).answer(f"{name} profile")
    return results


def format_profile(r: dict[str, Any], top: int) -> str:
    step = r["step_ms"]
    listed = sum(o["ms_per_step"] for o in r["ops"])
    lines = [f"**{r['backend']}**: {r['source']}; {r['steps']} profiled steps after the first and "
             f"{r['warmup']} warm-up, "
             f"{step:,.1f} ms/step wall under the profiler; all ops sum to {listed:,.1f} ms/step "
             f"({100 * listed / step:.0f}% of the step; ops on parallel threads can sum past 100%)"]
    if not r["ops"]:
        return lines[0] + "\nno per-op events were recorded"
    detail = any(o["detail"] for o in r["ops"])
    lines += ["| op | ms/step | % of step | calls/step |" + (" what |" if detail else ""),
              "|---|---|---|---|" + ("---|" if detail else "")]
    for o in r["ops"][:top]:
        lines.append(f"| {o['name']} | {o['ms_per_step']:.2f} | {100 * o['ms_per_step'] / step:.1f}% | "
                     f"{o['calls_per_step']:g} |" + (f" {o['detail']} |" if detail else ""))
    if r.get("kinds"):
        kinds = sorted(((k, 100 * v / step) for k, v in r["kinds"].items()), key=lambda kv: -kv[1])
        lines.append("by kind: " + ", ".join(f"{k} {pct:.0f}%" for k, pct in kinds if pct >= 0.5))
    return "\n".join(lines)


def format_profiles(results: dict[str, dict[str, Any]], title: str, top: int = 12) -> str:
    return "\n\n".join([f"### Where the time goes: {title}"] + [format_profile(r, top) for r in results.values()])


def main(argv: Sequence[str] | None = None) -> int:
    p = ExitingParser(prog="python -m parity.profile", description=__doc__.splitlines()[0],
                                epilog="Config fields can be overridden on top of the shape: --model.n_layer 2 ...")
    p.add_argument("--config", default="default", help="preset or TOML path (default: configs/default.toml)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny", help="a named shape (default tiny)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="compute dtype (default: the config's)")
    p.add_argument("--backends", default="torch,jax",
                   help=f"comma-separated subset of {','.join(TRAINEES)} (the plain_* are bench/'s plain baselines)")
    p.add_argument("--top", type=int, default=12, help="ops per table")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="profiled steps")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unprofiled steps after the first")
    p.add_argument("--json", type=Path, help="write every op's figures here")
    p.add_argument("--child", choices=TRAINEES, help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if args.child:
        child(args.child, Path(args.config), args.warmup, args.steps)
        return 0
    try:
        backends = parse_backends(args.backends, TRAINEES)
        if args.top < 1 or args.steps < 1 or args.warmup < 0:
            raise ConfigError("--top and --steps must be ≥ 1, --warmup ≥ 0")
        if args.json is not None:
            output_file(args.json, "--json")
        cfg = bench_config(args.config, args.shape, overrides, args.dtype, False,
                           1 + args.warmup + args.steps)
        ensure_data(cfg, lambda msg: print(msg, file=sys.stderr))
        extra_env, env_note = workers.allocator_env(os.environ)
        results = profile_config(cfg, backends, args.steps, args.warmup, extra_env)
        m = cfg.model
        title = (f"{args.shape} L{m.n_layer} H{m.n_head} C{m.n_embd} T{m.block_size} B{cfg.optim.micro_batch_size} "
                 f"{cfg.run.dtype}")
        print(format_profiles(results, title, args.top))
        print(f"\nallocator: {env_note}")
        if args.json:
            write_output(args.json, json.dumps({"config": cfg.to_dict(), "profiles": results}, indent=1) + "\n")
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
