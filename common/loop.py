"""The training loop, written once for both backends (see common/backend.py for what they provide).

Logging, evaluation, sampling and checkpoint intervals, the non-finite stop, resume and the
metrics records are all here, so `python -m torch_impl.train` and `python -m jax_impl.train` behave
the same by construction and differ only inside `backend.train_step` and friends.

The hot loop never waits for the device: train_step's metrics stay device values (lazy under JAX's
asynchronous dispatch) and are converted to floats in batches at flush points (every
run.log_interval steps, at most every MAX_PENDING_STEPS steps, and before evaluation, HellaSwag,
samples, diagnostics, checkpoints and the end), where every pending step gets its record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from common.backend import Backend, DistInfo
from common.checkpoints import (CheckpointError, CheckpointMeta, check_model_matches, code_version, latest_checkpoint,
                                read_meta, resolve)
from common.usage import InputError
from common.config import Config, ConfigError, DataConfig, validate
from common.config_files import build_parser, parse_args
from common.data import DataError, DataLoader, loader_for, val_batches_for
from common.hellaswag import HellaSwagError, load_examples
from common.levers import Levers
from common.loggers import Sinks, open_sinks
from common.outdir import hold, in_use
from common.plan import flops_per_token, plan_lines
from common.records import MetricsLog, format_line
from common.report import write_run_report
from common.usage import env_int


# With run.log_interval 0 (or larger than this), step metrics are still flushed to records at least
# every this many steps, so the non-finite check and metrics.jsonl are never further behind.
MAX_PENDING_STEPS = 50


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message names the step."""


@dataclass
class TrainResult:
    state: Any
    records: list[dict[str, Any]]
    dist: DistInfo
    out_dir: Path
    checkpoint: Path | None = None
    samples: list[str] = field(default_factory=list)


def resolve_out_dir(cfg: Config, backend: Backend) -> Path:
    """`{backend}` in run.out_dir lets one config hold a torch and a jax run side by side."""
    return Path(cfg.run.out_dir.replace("{backend}", backend.name))


def launch_rank() -> int:
    """This process's rank as its launcher set it: torchrun's RANK, else JAX_PROCESS_ID (a JAX launch), else 0.
    RANK wins, so only the variable that decides is read (a malformed one is a UsageError naming it)."""
    if os.environ.get("RANK", "").strip():
        return env_int("RANK", None)
    return env_int("JAX_PROCESS_ID", 0)


def ensure_data(cfg: Config, log: Callable[..., None]) -> None:
    """Prepare the embedded default corpus on first use; any other folder must already exist."""
    folder = Path(cfg.data.dir)
    if folder.resolve() != Path(DataConfig().dir).resolve():
        return
    from common.prepare import ensure_default_data, is_current
    if is_current(folder):
        return
    if launch_rank() == 0:
        log(f"preparing the default corpus (Python {sys.version.split()[0]} standard library) into {folder} ...")
        ensure_default_data(str(folder))
    else:  # other ranks wait for rank 0's manifest rather than tokenizing the same files again
        deadline = time.time() + 3600
        while not is_current(folder):
            if time.time() > deadline:
                raise DataError(f"{folder}: timed out waiting for rank 0 to prepare the default corpus")
            time.sleep(1)


def _check_resumable(saved: CheckpointMeta, cfg: Config, path: Path) -> list[str]:
    """Refuse a checkpoint this config cannot continue; returns the optimizer fields it continues with
    changed ("optim.max_steps 10 → 20"): each makes the run differ from a straight one, so is named."""
    check_model_matches(path, saved, cfg)
    saved_cfg = saved.run_config(path)
    if saved_cfg.optim.total_batch_size != cfg.optim.total_batch_size:
        raise CheckpointError(f"{path}: cannot resume with a different optim.total_batch_size "
                              f"(checkpoint {saved_cfg.optim.total_batch_size}, config {cfg.optim.total_batch_size})")
    # micro_batch_size only splits the same batch differently (accumulation), so it may change unnamed.
    return [f"optim.{f.name} {getattr(saved_cfg.optim, f.name)} → {getattr(cfg.optim, f.name)}"
            for f in dataclasses.fields(cfg.optim)
            if f.name != "micro_batch_size" and getattr(saved_cfg.optim, f.name) != getattr(cfg.optim, f.name)]


def _sample_texts(backend: Backend, state: Any, cfg: Config) -> list[str]:
    from common.tokenizer import EOT, decode, encode

    r = cfg.run
    prompt = encode(r.sample_prompt)  # empty: generation starts from EOT (common.sampling.context)
    if max(prompt, default=EOT) >= cfg.model.vocab_size:  # a toy vocabulary (tests) cannot hold GPT-2's ids
        return []
    rows: list[list[int]] = [[] for _ in range(r.num_samples)]
    for tokens in backend.generate(state, prompt, r.num_samples, r.sample_tokens, r.temperature, r.top_k, r.seed):
        for row, t in zip(rows, tokens):
            row.append(int(t))
    return [r.sample_prompt + decode(row) for row in rows]


def _check_hellaswag(cfg: Config) -> None:
    """Fail at start, not after hours of training, on a HellaSwag file that cannot be scored."""
    from common.tokenizer import VOCAB_SIZE

    r = cfg.run
    if not r.hellaswag_path:
        return
    if cfg.model.vocab_size < VOCAB_SIZE:
        raise ConfigError(f"run.hellaswag_path: HellaSwag needs a model over GPT-2's {VOCAB_SIZE} tokens, "
                          f"model.vocab_size is {cfg.model.vocab_size}")
    try:
        load_examples(r.hellaswag_path, limit=1)
    except HellaSwagError as e:
        raise ConfigError(f"run.hellaswag_path: {e}") from None


def _hellaswag(backend: Backend, state: Any, cfg: Config) -> dict[str, float]:
    from common.hellaswag import evaluate_hellaswag
    from common.tokenizer import encode

    r = cfg.run
    # Every process scores the whole file: a JAX mesh computes on all processes together.
    hs = evaluate_hellaswag(r.hellaswag_path, lambda t: backend.token_losses(state, t[:, :-1], t[:, 1:]), encode,
                            limit=r.hellaswag_limit or None, block_size=cfg.model.block_size)
    return {"hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"], "hellaswag_n": hs["n"]}


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(backend: Backend, cfg: Config, resume: str | None = None, log: Callable[..., None] = print) -> TrainResult:
    """Run (or continue) training as configured; see the module docstring. The main process holds
    run.out_dir's lock throughout (common/outdir.py): a second run into the same folder is refused."""
    dist = backend.setup(cfg)
    cfg = validate(cfg, dist.data_parallel_size)
    say = log if dist.is_main else (lambda *a, **k: None)
    _check_hellaswag(cfg)
    # Before the output folder exists: a lever value this backend cannot take is refused with nothing written.
    chosen = backend.levers(cfg, dist)
    ensure_data(cfg, say)
    loader = loader_for(cfg, dist)  # unusable shards, too, are refused before the output folder exists
    out_dir = resolve_out_dir(cfg, backend)
    if resume is not None:
        folder, meta = _resume_folder(backend, out_dir, resume)
        _check_resumable(meta, cfg, folder)  # a checkpoint this config cannot continue, too
    with hold(out_dir, "run.out_dir") if dist.is_main else contextlib.nullcontext():
        return _train(backend, cfg, dist, chosen, loader, out_dir, resume, say)


def _resume_folder(backend: Backend, out_dir: Path, resume: str, locked: bool = False) -> tuple[Path, CheckpointMeta]:
    """The checkpoint step folder `resume` names ("latest": the newest in out_dir) and its meta.json, refused
    when there is none or another backend saved it. `locked`: this run holds out_dir's lock (so the holder is
    not asked)."""
    if resume == "latest":
        folder = latest_checkpoint(out_dir)
        if folder is None:
            busy = None if locked else in_use(out_dir)
            raise CheckpointError(f"{out_dir}: no checkpoint to resume from" +
                                  (f"; it is in use by {busy}, which has not saved one yet" if busy else ""))
    else:
        folder = resolve(Path(resume))
    meta = read_meta(folder)
    if (saved_by := meta.backend) != backend.name:
        raise CheckpointError(f"{folder}: a {saved_by} checkpoint; `python -m parity.convert {folder} DST --to "
                              f"{backend.name}` makes a {backend.name} one to resume from")
    own_run = folder.absolute().parent.parent  # run/checkpoints/step_N
    if resume != "latest" and own_run.resolve() != out_dir.resolve() and (other := latest_checkpoint(out_dir)):
        raise CheckpointError(f"run.out_dir {out_dir} already holds another run's checkpoints (newest: {other.name}); "
                              f"--resume alone continues that run, or give a new run.out_dir for {folder}")
    return folder, meta


def _train(backend: Backend, cfg: Config, dist: DistInfo, chosen: Levers, loader: DataLoader, out_dir: Path,
           resume: str | None, say: Callable[..., None]) -> TrainResult:
    o, r = cfg.optim, cfg.run

    def evaluate(state: Any) -> float:
        return float(backend.evaluate(state, val_batches_for(cfg, dist)))

    history: list[dict[str, Any]] = []
    start = 0
    if resume is not None:
        folder, _ = _resume_folder(backend, out_dir, resume, locked=True)  # the newest may have changed
        state, meta = backend.load_checkpoint(folder, cfg, dist)
        changed = _check_resumable(meta, cfg, folder)
        if changed and dist.is_main:
            print(f"warning: resuming {folder} with changed optimizer settings: {', '.join(changed)} (checkpoint → "
                  f"now); the lr schedule and updates from step {meta.step} on differ from the run that saved it",
                  file=sys.stderr)
        start, history = meta.step, list(meta.history)
        if meta.loader:
            loader.load_state_dict(meta.loader)
        else:  # converted from weights alone: the data order still follows from the step
            loader.step = start
        say(f"resumed from {folder} at step {start}")
    else:
        latest = latest_checkpoint(out_dir)
        if latest is not None:
            raise CheckpointError(f"{out_dir} already holds checkpoints (newest: {latest.name}); pass --resume to "
                                  f"continue that run or --run.out_dir for a new one")
        state = backend.init_state(cfg, dist)

    for line in plan_lines(cfg, dist.data_parallel_size, loader.stream.epoch_tokens):
        say(line)
    peak = chosen.peak_flops
    mfu_line = (f"MFU against {peak / 1e12:.3g} TFLOP/s per replica ({chosen.peak_source})" if peak
                else f"no MFU: GEMM peak {chosen.peak_source}")
    say(f"backend: {backend.name} on {dist.device} ({dist.data_parallel_size} replicas, "
        f"{dist.process_count} processes), dtype {r.dtype}, {backend.compile_label(cfg)}; {mfu_line}")
    say(chosen.line())
    say(f"output: {out_dir}")

    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resume is not None else None) \
        if dist.is_main else None
    sinks = open_sinks(cfg, out_dir, backend.name) if dist.is_main else Sinks([])
    # The plumbing check: the first step's batch at every step (the loader's position never moves).
    fixed_batch = loader.step_batch(0) if r.overfit_single_batch else None
    flops_tok = flops_per_token(cfg.model)
    val_loss = None
    checkpoint = None
    run_start = time.perf_counter()
    window_start = run_start  # start of the current flush window's wall time
    steady: list[float] = []
    tokens = start * o.total_batch_size
    # Steps whose metrics are still device values: (step, metrics, data_ms, diagnostics). See flush().
    pending: list[tuple[int, dict[str, Any], float, dict[str, Any] | None]] = []

    def flush() -> list[dict[str, Any]]:
        """Turn the pending steps' metrics into records: the loop's only host sync on step metrics.

        Converting a device value with float() waits for the step that produced it, so doing it right
        after every train_step would stop JAX from dispatching step N+1 while step N computes. The
        pending steps are converted together here (every log_interval steps, at most every
        MAX_PENDING_STEPS steps, and before anything that reads the state: evaluation, HellaSwag,
        samples, diagnostics, checkpoints, the end of the run). The first non-finite step raises
        NonFiniteError before any record past it is written or any checkpoint is saved. Per-step `ms`
        of a window of n steps is the window's wall time / n (each step's own time is not observable
        without a sync per step); the run's first step is always a window of its own (compilation).
        """
        nonlocal window_start, tokens
        if not pending:
            return []
        values = [(float(m["loss"]), float(m["grad_norm"]), float(m["lr"])) for _, m, _, _ in pending]
        now = time.perf_counter()
        dt = (now - window_start) / len(pending)
        records = []
        for i, ((step, _, data_ms, diagnostics), (loss, norm, lr)) in enumerate(zip(pending, values)):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                pending.clear()
                emit(records)  # the steps before the first non-finite one, as when every step was checked
                good = latest_checkpoint(out_dir)
                raise NonFiniteError(f"step {step}: loss {loss} / grad norm {norm} is not finite; training "
                                     f"stopped (last good checkpoint: {good if good else 'none'})")
            tokens += o.total_batch_size
            tok_s = o.total_batch_size / dt
            if step - start >= 2:  # the first steps include compilation and warm-up
                steady.append(dt)
            rec = {"backend": backend.name, "step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                   "ms": dt * 1e3, "data_ms": data_ms, "tokens_per_s": tok_s,
                   "mfu": flops_tok * tok_s / (peak * dist.data_parallel_size) if peak else None, "tokens": tokens,
                   "elapsed_s": window_start + (i + 1) * dt - run_start}
            if diagnostics:
                rec.update(diagnostics)
            records.append(rec)
        pending.clear()
        window_start = now
        return records

    def emit(records: list[dict[str, Any]]) -> None:
        """history, metrics.jsonl, the sinks and the console line, in step order."""
        for rec in records:
            step, done = rec["step"], rec["step"] + 1
            history.append(rec)
            if metrics:
                metrics.write(rec)
            sinks.log(rec)
            if r.log_interval and (step % r.log_interval == 0 or "val_loss" in rec or done == o.max_steps):
                eta = (o.max_steps - done) * (sum(steady) / len(steady) if steady else rec["ms"] / 1e3)
                say(format_line(rec, o.max_steps) + f" | eta {_eta(eta)}" +
                    (" (includes compile)" if step == start else ""))

    for step in range(start, o.max_steps):
        done = step + 1
        diagnose = bool(r.diagnostics_interval and step % r.diagnostics_interval == 0)
        if diagnose:
            emit(flush())
        t0 = time.perf_counter()
        x, y = fixed_batch if fixed_batch is not None else loader.next_step()
        data_ms = (time.perf_counter() - t0) * 1e3
        diagnostics = None
        if diagnose:
            diagnostics = backend.diagnostics(state, x, y)  # before the step: the gradient it is about to apply
            window_start = time.perf_counter()
        state, m = backend.train_step(state, x, y)  # m stays on the device until flush()
        pending.append((step, m, data_ms, diagnostics))
        do_eval = bool(cfg.data.val_tokens and r.eval_interval
                       and (done % r.eval_interval == 0 or done == o.max_steps))
        do_hellaswag = bool(r.hellaswag_path and ((r.hellaswag_interval and done % r.hellaswag_interval == 0)
                                                  or done == o.max_steps))
        do_sample = bool(r.sample_interval and done % r.sample_interval == 0 and done != o.max_steps)
        do_checkpoint = bool(r.checkpoint_interval and (done % r.checkpoint_interval == 0 or done == o.max_steps))
        if not (step == start or done == o.max_steps or (r.log_interval and step % r.log_interval == 0)
                or len(pending) >= MAX_PENDING_STEPS or do_eval or do_hellaswag or do_sample or do_checkpoint):
            continue
        records = flush()
        rec = records[-1]  # this step's record
        if do_eval:
            val_loss = rec["val_loss"] = evaluate(state)
        if do_hellaswag:
            rec.update(_hellaswag(backend, state, cfg))
            say(f"hellaswag at step {done}: acc {rec['hellaswag_acc']:.4f} | "
                f"acc_norm {rec['hellaswag_acc_norm']:.4f} ({rec['hellaswag_n']} examples)")
        emit(records)
        if do_sample:
            for text in _sample_texts(backend, state, cfg):
                say(f"sample> {text!r}")
        if do_checkpoint:
            if not backend.params_finite(state):
                good = latest_checkpoint(out_dir)
                raise NonFiniteError(f"step {step}: the parameters after it are not finite (loss and grad norm "
                                     f"were); checkpoint {done} not written; training stopped (last good "
                                     f"checkpoint: {good if good else 'none'})")
            meta = CheckpointMeta(step=done, backend=backend.name, config=cfg.to_dict(), loader=loader.state_dict(),
                                  history=list(history), code_version=code_version(), val_loss=rec.get("val_loss"))
            checkpoint = backend.save_checkpoint(state, out_dir, meta) or checkpoint
        if do_eval or do_hellaswag or do_sample or do_checkpoint:
            window_start = time.perf_counter()  # evaluation, samples and checkpoints are not training throughput

    if steady:
        mean_tok_s = o.total_batch_size * len(steady) / sum(steady)
        say(f"done: {o.max_steps - start} steps in {time.perf_counter() - run_start:.1f} s; "
            f"{mean_tok_s:,.0f} tok/s after warm-up; final val loss {val_loss if val_loss is None else f'{val_loss:.4f}'}")
    sinks.close()
    samples = []
    if r.num_samples and r.sample_tokens and start < o.max_steps:
        samples = _sample_texts(backend, state, cfg)
        for text in samples:
            say(f"sample> {text}")
    if dist.is_main and r.report:
        write_run_report(out_dir, say)
    return TrainResult(state=state, records=history, dist=dist, out_dir=out_dir, checkpoint=checkpoint,
                       samples=samples)


def main(backend: Backend, argv: Sequence[str] | None = None) -> int:
    prog = f"python -m {backend.name}_impl.train"
    description = f"Train GPT-2 with the {backend.name} backend (no arguments: the default CPU run)."
    parser = build_parser(prog, description)
    backend.add_arguments(parser)
    try:
        args = parse_args(argv, prog, description, parser)
        cfg = backend.apply_arguments(args.extra, args.config)
        print(f"config: {args.config_path}")
        train(backend, cfg, resume=args.resume)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    finally:
        backend.teardown()

