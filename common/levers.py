"""The speed levers a trainer runs with, chosen on the machine at hand (never by vendor string).

A lever changes speed, not results (beyond summation order): which library runs the fp32 GEMMs, how
many rows the fused head + loss takes per chunk (0: the full logits), how many threads the framework
uses, and glibc's malloc tunables. Every lever has a value and a source, printed in each trainer's
run header:

  config  the run's config set it (an explicit value always wins)
  device  fixed on CUDA devices, where nothing is probed
  cache   an earlier probe on this machine decided it (levers-<backend>-<machine>.json in CACHE_DIR)
  probe   timed just now (then cached)
  fixed   a rule that needs no timing: the framework has one way (XLA's dot kernels and thread pool),
          the dtype has one library (bf16 autocast), or `run.levers = "fixed"` takes the defaults
  env     the process environment (GLIBC_TUNABLES)

A machine is its CPU model, the instruction-set extensions that decide kernels (AVX2, AVX-512,
avx512_bf16, AMX) and the CPUs this process may run on, so a `taskset`-pinned run has its own entry.
The probes time framework code and live in the backends (torch_impl/levers.py, jax_impl/levers.py);
this module holds what both share: the machine, the mode, the cache, the decision rule over timings
and the header line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from common.config import AUTO_CHUNK_ROWS, GEMM_PATHS, LEVER_MODES, Config, ConfigError
from common.cpuinfo import cpuinfo_field
from common.launch import allocator_setting
from common.numbers import is_finite_number, is_int

# run.levers: auto probes a machine the first time it is seen and reads the cache afterwards; probe
# times again and rewrites the cache; fixed takes fixed rules without timing or caching anything (the
# test suite's tiny runs). GPT2TWIN_LEVERS, when set, replaces an `auto` of the config.
MODE_ENV = "GPT2TWIN_LEVERS"
CACHE_DIR = Path(os.environ.get("GPT2TWIN_CACHE_DIR") or "~/.cache/gpt2-twin").expanduser()  # empty: unset
# The extensions that pick GEMM kernels, in the order a header lists them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# A probed candidate replaces the framework's own default only when it is this much faster (median of
# same-round ratios): noise must not flip a lever between runs.
MARGIN = 0.05
CACHE_VERSION = 2  # raised when the probe measures differently, so that older entries are probed again
FIXED_CHUNK_ROWS = 128  # run.levers fixed, and accelerators: the row-chunked head
PROBE_ROUNDS = 3
# Rows timed per head pass: the best chunk size depends on how many chunks a micro-step splits into, so
# the probe times the run's own rows, up to this many (larger micro-steps too, so that it takes seconds).
MAX_PROBE_ROWS = 1024
GEMM_PEAK_N = 1024  # the CPU GEMM peak's N×N product


@dataclass(frozen=True)
class Machine:
    cpu: str
    isa: tuple[str, ...]
    cpus: int  # CPUs this process may run on

    def key(self) -> str:
        """A file-name-safe name: readable model and core count, plus a hash of the whole identity."""
        digest = hashlib.sha1(f"{self.cpu}|{','.join(self.isa)}|{self.cpus}".encode()).hexdigest()[:8]
        slug = re.sub(r"[^a-z0-9]+", "-", self.cpu.lower()).strip("-")[:40] or "cpu"
        return f"{slug}-{self.cpus}cpu-{digest}"

    def describe(self) -> str:
        return f"{self.cpu} ({', '.join(self.isa) or 'no AVX2'}; {self.cpus} usable CPUs)"


def usable_cpu_ids() -> set[int] | None:
    """The CPUs this process may run on (taskset narrows them), where the OS says (Linux); None elsewhere."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    ids = usable_cpu_ids()
    return len(ids) if ids is not None else (os.cpu_count() or 1)


def this_machine() -> Machine:
    flags = set(cpuinfo_field("flags").split())
    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"
    return Machine(cpu=cpu, isa=tuple(f for f in ISA_FLAGS if f in flags), cpus=usable_cpus())


@dataclass(frozen=True)
class Choice:
    value: Any
    source: str  # config, device, cache, probe, fixed or env (the module docstring)
    note: str = ""  # what the value means, when the value alone does not say


@dataclass
class Levers:
    """The chosen levers in header order, and the GEMM peak MFU is measured against."""
    backend: str
    choices: dict[str, Choice] = field(default_factory=dict)
    peak_flops: float | None = None
    peak_source: str = ""

    def value(self, name: str) -> Any:
        return self.choices[name].value

    def line(self) -> str:
        parts = []
        for name, c in self.choices.items():
            value = f"{c.value} ({c.note})" if c.note else str(c.value)
            parts.append(f"{name} {value} [{c.source}]")
        return f"levers ({self.backend}): " + ", ".join(parts)


def probe_rows(cfg: Config) -> int:
    return min(cfg.optim.micro_batch_size * cfg.model.block_size, MAX_PROBE_ROWS)


def entry_key(cfg: Config) -> str:
    """The cache entry of a run: the levers depend on the dtype, the width, the vocabulary and the rows per micro-step."""
    return (f"{cfg.run.dtype} C{cfg.model.n_embd} V{cfg.model.vocab_size} "
            f"rows{cfg.optim.micro_batch_size * cfg.model.block_size}")


def config_choices(cfg: Config) -> dict[str, Choice]:
    """The levers every backend reads from the config alike (run.loss_chunk_rows ≥ 0)."""
    if cfg.run.loss_chunk_rows != AUTO_CHUNK_ROWS:
        return {"loss_chunk_rows": Choice(cfg.run.loss_chunk_rows, "config")}
    return {}


def on_device(backend: str, fixed: dict[str, Choice], explicit: dict[str, Choice], order: Sequence[str]) -> Levers:
    """The levers on an accelerator: the device's own values, overridden by the config's except run.cpu_gemm
    (gemm, head_gemm), which picks among CPU libraries only."""
    explicit = {n: c for n, c in explicit.items() if n not in ("gemm", "head_gemm")}
    return Levers(backend, {n: {**fixed, **explicit}[n] for n in order})


def allocator_choice() -> Choice:
    return Choice(*allocator_setting())


def timings_record(seconds: Mapping[Any, Sequence[float]]) -> dict[str, list[float]]:
    """Probe timings as the cache keeps them."""
    return {str(k): [round(s, 5) for s in v] for k, v in seconds.items()}


def configured(cfg: Config, chosen: Levers) -> Config:
    """`cfg` with run.loss_chunk_rows the chosen one, which the trainers build their models with."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, loss_chunk_rows=int(chosen.value("loss_chunk_rows"))))


def lever_mode(cfg: Config) -> str:
    """run.levers, or GPT2TWIN_LEVERS in place of its default `auto`."""
    mode = cfg.run.levers
    env = os.environ.get(MODE_ENV, "")
    if mode == "auto" and env:
        if env not in LEVER_MODES:
            raise ConfigError(f"{MODE_ENV}: expected one of {', '.join(LEVER_MODES)}, got '{env}'")
        mode = env
    return mode


# ---- the decision rule -------------------------------------------------------------------------------

def fastest(timings: Mapping[Any, Sequence[float]], default: Any, margin: float = MARGIN) -> Any:
    """The candidate that beats `default` by the largest median same-round speed-up, if that is over 1 + margin.

    timings[c][r] are the seconds of candidate c in round r; every candidate ran once per round, so the
    ratio t[default][r] / t[c][r] cancels what the machine did in that round.
    """
    if default not in timings:
        raise ValueError(f"the default {default!r} was not timed")
    base = timings[default]
    best, best_ratio = default, 1.0 + margin
    for candidate, seconds in timings.items():
        if candidate == default:
            continue
        if len(seconds) != len(base) or not seconds:
            raise ValueError("every candidate needs one time per round")
        ratio = statistics.median(b / s for b, s in zip(base, seconds))
        if ratio > best_ratio:
            best, best_ratio = candidate, ratio
    return best


def interleaved(candidates: Mapping[Any, Callable[[], None]], rounds: int) -> dict[Any, list[float]]:
    """Seconds of each candidate's call, `rounds` times in alternation, after one untimed call each."""
    for fn in candidates.values():
        fn()
    out: dict[Any, list[float]] = {c: [] for c in candidates}
    for _ in range(rounds):
        for c, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            out[c].append(time.perf_counter() - t0)
    return out


def chunk_candidates(rows: int) -> list[int]:
    """loss_chunk_rows worth timing for `rows` rows per micro-step: the full logits (0) and chunks that split them."""
    return [0] + [c for c in (128, 256, 512) if c < rows]


# ---- the cache ---------------------------------------------------------------------------------------

def cache_path(backend: str, machine: Machine, root: Path | None = None) -> Path:
    return (root or CACHE_DIR) / f"levers-{backend}-{machine.key()}.json"


def read_cache(path: Path, machine: Machine) -> dict[str, Any]:
    """The cache file's contents, or a fresh one when it is missing, unreadable, of another version or machine."""
    fresh = {"version": CACHE_VERSION, "machine": machine.describe(), "entries": {}, "peaks": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("machine") != machine.describe():
        return fresh
    # An entry or peak that is not what a probe writes (a hand-edited or damaged file) is dropped: probed again.
    entries, peaks = data.get("entries"), data.get("peaks")
    data["entries"] = {k: e for k, e in entries.items() if _valid_entry(e)} if isinstance(entries, dict) else {}
    data["peaks"] = {k: p for k, p in peaks.items() if _valid_peak(p)} if isinstance(peaks, dict) else {}
    return data


def _is_int(v: Any, low: int) -> bool:
    return is_int(v) and v >= low


_CHOSEN_GEMMS = set(GEMM_PATHS) - {"auto"}
# What a probe can have chosen for each lever.
_VALID_LEVER = {"loss_chunk_rows": lambda v: _is_int(v, 0), "threads": lambda v: _is_int(v, 1),
                "gemm": lambda v: v in _CHOSEN_GEMMS, "head_gemm": lambda v: v in _CHOSEN_GEMMS}


def _valid_entry(e: Any) -> bool:
    levers = e.get("levers") if isinstance(e, dict) else None
    return isinstance(levers, dict) and all(_VALID_LEVER.get(k, lambda v: False)(v) for k, v in levers.items())


def _valid_peak(p: Any) -> bool:
    return (isinstance(p, dict) and is_finite_number(p.get("flops")) and p["flops"] > 0 and isinstance(p.get("how"), str)
            and isinstance(p.get("probed"), str))


def write_cache(path: Path, data: dict[str, Any]) -> None:
    """Atomically (rename), so a concurrent reader sees the old file or the new one; a read-only cache
    directory only costs the next run a new probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- resolution --------------------------------------------------------------------------------------

_RESOLVED: dict[tuple, Levers] = {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file: processes started together (torchrun ranks, bench workers)
    probe one after the other, and the later ones find the first one's entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "w")
    except OSError:
        yield
        return
    with handle:
        try:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def resolve(backend: str, cfg: Config, *, explicit: Mapping[str, Choice], fixed: Mapping[str, Choice],
            defaults: Mapping[str, Choice], entry: str, probe: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
            peak_probe: Callable[[], tuple[float, str]] | None, order: Sequence[str],
            machine: Machine | None = None, root: Path | None = None,
            log: Callable[[str], None] = print) -> Levers:
    """Every lever of `order`: explicit (config) values, then the backend's fixed ones, then for the
    levers of `defaults` the cached entry `entry` of this machine, or a new probe (written to the cache),
    or under run.levers fixed the defaults themselves. `probe()` decides every lever of `defaults` and
    returns ({lever: value}, what it timed); `peak_probe()` gives the run dtype's GEMM peak (FLOP/s, how
    it was measured), cached beside the levers; None measures nothing."""
    machine = machine or this_machine()
    mode = lever_mode(cfg)
    # The defaults' values decide only under run.levers fixed; elsewhere they may depend on what an earlier
    # resolve applied (torch's thread count), which must not make a second resolve probe again.
    key = (backend, entry, mode, cfg.run.peak_tflops, cfg.run.dtype, tuple(explicit.items()), tuple(fixed.items()),
           tuple(defaults.items()) if mode == "fixed" else tuple(defaults), machine, root)
    if key in _RESOLVED:  # once per process: a second init_state, the header and MFU read the same choice
        return _RESOLVED[key]
    choices: dict[str, Choice] = {**fixed, **explicit}
    wanted = [name for name in defaults if name not in explicit]
    peak: tuple[float, str] | None = None
    if cfg.run.peak_tflops > 0:
        peak = (cfg.run.peak_tflops * 1e12, "run.peak_tflops")
    if mode == "fixed" or (not wanted and (peak or peak_probe is None)):
        choices.update({name: defaults[name] for name in wanted})
    else:
        path = cache_path(backend, machine, root)
        with _locked(path):
            data = read_cache(path, machine)
            hit = data["entries"].get(entry) if mode == "auto" else None
            if wanted and not (hit and all(name in hit["levers"] for name in defaults)):
                log(f"probing the {backend} levers for {entry} on {machine.describe()} (once per machine; "
                    f"--run.levers probe times them again) ...")
                values, timings = probe()
                hit = data["entries"][entry] = {"levers": values, "timings": timings, "probed": now()}
                source = "probe"
            else:
                source = "cache"
            choices.update({name: Choice(hit["levers"][name], source) for name in wanted})
            dtype = cfg.run.dtype
            cached_peak = data["peaks"].get(dtype) if mode == "auto" else None
            if peak is None and peak_probe is not None:
                if cached_peak:
                    peak = (cached_peak["flops"], f"{cached_peak['how']}, probed {cached_peak['probed']} (cache)")
                else:
                    flops, how = peak_probe()
                    data["peaks"][dtype] = {"flops": flops, "how": how, "probed": now()}
                    peak = (flops, f"{how}, probed now")
            write_cache(path, data)
    levers = Levers(backend, {name: choices[name] for name in order if name in choices})
    if peak is not None:
        levers.peak_flops, levers.peak_source = peak
    else:
        levers.peak_source = ("not measured: run.levers fixed times nothing (set run.peak_tflops)"
                              if mode == "fixed" else "not measured")
    _RESOLVED[key] = levers
    return levers


def cached_peak(backend: str, dtype: str, root: Path | None = None) -> tuple[float, str] | None:
    """A GEMM peak an earlier run of `backend` probed on this machine, without probing (the plain baselines'
    MFU, which must not change a lever of their own)."""
    machine = this_machine()
    entry = read_cache(cache_path(backend, machine, root), machine)["peaks"].get(dtype)
    return (entry["flops"], f"{entry['how']}, probed {entry['probed']} (cache)") if entry else None
