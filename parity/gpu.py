"""`python -m parity.gpu`: one command that proves both backends on a CUDA GPU; writes gpu-report.json and .md.

Sections, each in its own subprocess with its own timeout (a failing or hung section is recorded and the
others still run), in this order:

  env     device, driver, CUDA, Python and library versions
  peaks   measured GEMM peaks: bf16, fp32 with TF32 off, TF32; torch (CUDA events) and JAX
  parity  `parity.check --steps 50` on the device in fp32 (full precision on both sides) and bf16, judged
          against the GPU tolerances of parity/gpu_sections.py (docs/gpu.md says why they are what they are)
  bench   GPT-2 124M, T=1024, bf16, the largest micro-batch up to 64 per backend: tok/s, MFU against the
          measured bf16 peak, peak memory, cold compile times, same-round JAX/torch ratio (parity/gpu_bench.py)
  train   the real trainers (`python -m torch_impl.train` / `jax_impl.train`) on the default corpus for a
          time budget each; the loss must fall

`--dry-run` runs the same sections on the CPU with tiny shapes (about a minute; the test suite runs it).
The report is rewritten after every section, so a time-out still leaves what was measured; `--only a,b`
reruns chosen sections into the report already in --out. Exit 0 when every section in the report passed,
1 otherwise, 2 on bad flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from common.usage import Parser, UsageError
from common.config import DataConfig
from common.outdir import FolderError, make_output_dir
from parity.gpu_options import REPORT_JSON, REPORT_MD, ROOT, SECTIONS, Options, Timer, child_env

# Each section's own limit (seconds) on a GPU and in the dry run; the train section adds its training budget.
# All are also capped by what is left of --time-limit, so a hung section cannot take the whole run with it.
TIMEOUTS = {"env": (120, 90), "peaks": (180, 120), "parity": (300, 240), "bench": (420, 300), "train": (300, 240)}


def stamp(start: float) -> str:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    return f"[{now} +{time.time() - start:4.0f}s]"


def load_report(out: Path) -> dict[str, Any]:
    path = out / REPORT_JSON
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not a report ({e}); remove it or choose another --out") from None
    return {"sections": {}}


def write_report(out: Path, report: dict[str, Any]) -> None:
    from parity.gpu_report import format_report

    report["passed"] = bool(report["sections"]) and all(s["status"] == "passed" for s in report["sections"].values())
    report["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tmp = out / (REPORT_JSON + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / REPORT_JSON)
    (out / REPORT_MD).write_text(format_report(report))


def _kill_group(proc: subprocess.Popen) -> None:
    """The section's whole process group: its own children (bench workers, trainers) too."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_section(name: str, opts: Options, work: Path, start: float) -> dict[str, Any]:
    """One section in its own process (and process group), its output streamed with timestamps and kept in
    logs/NAME.log; returns its entry for the report."""
    own, dry = TIMEOUTS[name]
    limit = (dry if opts.dry_run else own) + (2 * opts.train_seconds if name == "train" else 0)
    left = opts.deadline - time.time()
    entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "result": None, "error": None,
                             "log": f"logs/{name}.log",
                             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if left < 15:
        entry["error"] = f"not started: {left:.0f} s left of --time-limit {opts.time_limit:.0f}"
        print(f"{stamp(start)} {name}: skipped ({entry['error']})", flush=True)
        return entry
    timeout = min(limit, left)
    result_path = work / f"{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "parity.gpu", "--section", name, "--work", str(work)] + opts.flags()
    print(f"{stamp(start)} {name}: started (time-out {timeout:.0f} s)", flush=True)
    t0 = time.time()
    tail: list[str] = []
    with open(opts.out / entry["log"], "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        timer = Timer(timeout, lambda: _kill_group(proc))
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail = (tail + [line.rstrip()])[-30:]
            print(f"{stamp(start)} {name}: {line.rstrip()}", flush=True)
        proc.wait()
        timed_out = timer.cancel()
    entry["seconds"] = round(time.time() - t0, 1)
    if result_path.exists():
        entry["result"] = json.loads(result_path.read_text())
    if timed_out:
        entry["status"], entry["error"] = "timeout", f"stopped after {timeout:.0f} s"
    elif proc.returncode == 0 and entry["result"] is not None:
        entry["status"] = "passed"
    elif proc.returncode == 1 and entry["result"] is not None:
        entry["status"] = "failed"
        entry["error"] = "; ".join(entry["result"].get("failures", [])) or "failed"
    else:
        entry["status"] = "error"
        entry["error"] = f"exit code {proc.returncode}: " + " | ".join(line for line in tail[-6:] if line.strip())
    print(f"{stamp(start)} {name}: {entry['status'].upper()} in {entry['seconds']:.0f} s"
          + (f" ({entry['error']})" if entry["error"] else ""), flush=True)
    return entry


def run_one(name: str, opts: Options, work: Path) -> int:
    """In a section process: runs one section, writes its result for the parent, exits 0 if it passed, else 1."""
    from parity import gpu_bench, gpu_parity, gpu_sections, gpu_train

    fn = {"env": gpu_sections.section_env, "peaks": gpu_sections.section_peaks, "parity": gpu_parity.section_parity,
          "bench": gpu_bench.section_bench, "train": gpu_train.section_train}[name]
    result = fn(opts, work)
    (work / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    for failure in result["failures"]:
        print(f"FAILED: {failure}", flush=True)
    return 0 if result["passed"] else 1


def run_all(opts: Options, only: Sequence[str], command: str) -> int:
    start = time.time()
    if only == SECTIONS:  # a new report: no logs or training runs of an earlier one beside it
        for stale in ("logs", "train"):
            shutil.rmtree(opts.out / stale, ignore_errors=True)
    (opts.out / "logs").mkdir(exist_ok=True)
    report = load_report(opts.out) if only != SECTIONS else {"sections": {}}
    report.update({"command": command, "dry_run": opts.dry_run, "device": opts.device,
                   "options": {k: str(v) for k, v in dataclasses.asdict(opts).items()}})
    report.setdefault("started", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"{stamp(start)} parity.gpu: sections {','.join(only)} on {opts.device}; report in {opts.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpt2twin-gpu-") as tmp:
        work = Path(tmp)
        for name in SECTIONS:
            if name not in only:
                continue
            report["sections"][name] = run_section(name, opts, work, start)
            report["sections"] = {k: report["sections"][k] for k in SECTIONS if k in report["sections"]}
            write_report(opts.out, report)
    summary = ", ".join(f"{k} {v['status']}" for k, v in report["sections"].items())
    print(f"{stamp(start)} parity.gpu: {'PASS' if report['passed'] else 'FAIL'} ({summary}); "
          f"{opts.out / REPORT_JSON}, {opts.out / REPORT_MD}", flush=True)
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m parity.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/gpu"), help="folder of the report and logs (default out/gpu)")
    p.add_argument("--dry-run", action="store_true", help="the same sections on the CPU with tiny shapes")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}, rerun into the "
                                                "report already in --out")
    p.add_argument("--data-dir", default=None, help="corpus of the parity and train sections "
                                                    "(default: the stdlib corpus, prepared if missing)")
    p.add_argument("--max-micro-batch", type=int, default=None,
                   help="first micro-batch the bench tries, halved on out-of-memory (default 64; dry run 2)")
    p.add_argument("--parity-steps", type=int, default=None, help="steps of each parity check (default 50; dry run 10)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="training time per backend in the train section, compilation excluded (default 60; "
                        "dry run 3); shortened if --time-limit would otherwise be passed")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole command (default 480; dry run 600): sections are cut to fit it")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # run one section in this process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def _default(value, default):
    return default if value is None else value


def _data_dir(given: str | None) -> str:
    """The default corpus is prepared on demand by the sections (relative to ROOT, where they run); any other
    folder must exist before the run starts, and is resolved here so that it names the same folder there."""
    if given is None:
        return DataConfig().dir
    path = Path(given).resolve()
    if path != (ROOT / DataConfig().dir).resolve() and not path.is_dir():
        raise UsageError(f"--data-dir: {given} is not a folder")
    return str(path)


def parse_options(args: argparse.Namespace) -> Options:
    dry = args.dry_run
    opts = Options(out=args.out.resolve(), dry_run=dry, data_dir=_data_dir(args.data_dir),
                   max_micro_batch=_default(args.max_micro_batch, 2 if dry else 64),
                   parity_steps=_default(args.parity_steps, 10 if dry else 50),
                   train_seconds=_default(args.train_seconds, 3.0 if dry else 60.0),
                   time_limit=_default(args.time_limit, 600.0 if dry else 480.0), deadline=0.0)
    for flag, count in (("--max-micro-batch", opts.max_micro_batch), ("--parity-steps", opts.parity_steps)):
        if count < 1:
            raise UsageError(f"{flag} must be ≥ 1, got {count}")
    for flag, seconds in (("--train-seconds", opts.train_seconds), ("--time-limit", opts.time_limit)):
        if not (math.isfinite(seconds) and seconds > 0):
            raise UsageError(f"{flag} must be a finite number of seconds > 0, got {seconds:g}")
    return dataclasses.replace(opts, deadline=args.deadline or time.time() + opts.time_limit)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        opts = parse_options(args)
        if args.section:
            return run_one(args.section, opts, args.work)
        only = SECTIONS
        if args.only is not None:
            only = tuple(s.strip() for s in args.only.split(",") if s.strip())
            bad = [s for s in only if s not in SECTIONS]
            if not only or bad:
                raise UsageError(f"--only: expected a subset of {','.join(SECTIONS)}, got '{args.only}'")
        make_output_dir(opts.out, "--out")
        return run_all(opts, only, "python -m parity.gpu " + shlex.join(argv))
    except (UsageError, FolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
