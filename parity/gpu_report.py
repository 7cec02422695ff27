"""gpu-report.md: the JSON report of `python -m parity.gpu` as markdown tables (one per section that has figures)."""
from __future__ import annotations

from typing import Any, Callable

NONE = "—"


def _f(value: Any, spec: str) -> str:
    return NONE if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table and the blank line that ends it (a text line right after a table would join it)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def env_lines(r: dict[str, Any]) -> list[str]:
    v = r["versions"]
    smi = (r.get("nvidia_smi") or [{}])[0]
    memory = f" ({r['torch']['memory_gib']:.0f} GiB)" if "memory_gib" in r["torch"] else ""
    lines = [f"- device: {r['device']}{memory}; driver {smi.get('driver_version', NONE)}; "
             f"CUDA {r['torch']['cuda'] or NONE} (torch), cuDNN {r['torch']['cudnn'] or NONE}; "
             f"JAX backend {r['jax']['backend']} ({r['jax']['device_kind']})",
             f"- Python {r['python']}; CPU {r['cpu']} ({r['cpus']} cores)",
             "- " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    return lines


def peaks_lines(r: dict[str, Any]) -> list[str]:
    kinds = ("bf16", "fp32", "tf32")
    rows = []
    for fw in ("torch", "jax"):
        best = {k: max((x["tflops"] for x in r["rows"] if x["framework"] == fw and x["kind"] == k), default=None)
                for k in kinds}
        rows.append([fw] + [_f(best[k], ",.4g") for k in kinds])
    return _table(["GEMM peak TFLOP/s", "bf16", "fp32 (TF32 off)", "TF32"], rows) + \
        [f"sizes N={', '.join(map(str, r['sizes']))}; {r['note']}"]


def parity_lines(r: dict[str, Any]) -> list[str]:
    rows = []
    for dtype, d in r["dtypes"].items():
        if "worst" not in d:
            rows.append([dtype] + [NONE] * 7 + [f"exit {d['exit_code']}"])
            continue
        w, t = d["worst"], d["tolerances"]
        rows.append([dtype] + [f"{w[k]:.1e} ({t[k]:.0e})" for k in ("logits", "loss", "grad_norm", "grads", "params",
                                                                      "moments")]
                    + [str(d["steps"]), "pass" if d["passed"] else "FAIL"])
    return _table(["dtype", "step-0 logits", "loss", "grad norm", "step-0 grads", "params", "AdamW m, v", "steps",
                   "verdict"], rows) + ["worst value over the steps (GPU tolerance); JAX matmul precision "
                                        f"{r['jax_matmul_precision']}, torch TF32 {r['torch_tf32']}"]


def bench_lines(r: dict[str, Any]) -> list[str]:
    m = r["model"]
    rows = []
    for name, b in r["backends"].items():
        if "tokens_per_s" not in b:
            rows.append([name, str(b.get("micro_batch", NONE))] + [NONE] * 6)
            continue
        mem = f"{b['memory']['gib']:.1f}" + ("" if b["memory"]["kind"] == "device" else " (RSS)")
        rows.append([name, f"{b['micro_batch']}×{b['accum']}", f"{b['tokens_per_s']:,.0f}",
                     _f(None if b["mfu"] is None else 100 * b["mfu"], ".1f"), f"{b['ms_per_step']:.1f}", mem,
                     f"{b['compile_s']:.1f}", b["attention"]["implementation"]])
    ratio = r["jax_over_torch"]
    targets = ", ".join(f"{k} {'yes' if v else 'no' if v is not None else NONE}" for k, v in r["targets"].items())
    return [f"L{m['n_layer']} C{m['n_embd']} T{m['block_size']} vocab {m['vocab']}, {m['dtype']}, torch.compile "
            f"{m['torch_compile']}; MFU against the measured bf16 peak {_f(r['bf16_peak_tflops'], ',.4g')} TFLOP/s", ""] + \
        _table(["backend", "micro-batch × accum", "tok/s", "MFU %", "ms/step", "peak memory GiB", "cold compile s",
                "attention"], rows) + \
        [f"JAX/torch tokens/s: {_f(ratio, '.3f')} (median of {r['rounds']} same-round ratios); targets: {targets}"]


def train_lines(r: dict[str, Any]) -> list[str]:
    rows = []
    for name, t in r["backends"].items():
        if "steps" not in t:
            rows.append([name, NONE, NONE, NONE, NONE, f"exit {t['exit_code']}"])
            continue
        rows.append([name, f"{t['steps']} × B{t['micro_batch']}", f"{t['train_seconds']:.0f}",
                     f"{t['first_loss']:.3f} → {t['last_loss_mean']:.3f}", f"{t['tokens_per_s']:,.0f}",
                     f"exit {t['exit_code']}"])
    return _table(["backend", "steps", "train s", "loss first → last", "tok/s", "run"], rows) + \
        [f"the loss must fall by at least {r['drop_required']} nats"]


FORMATTERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "env": env_lines, "peaks": peaks_lines, "parity": parity_lines, "bench": bench_lines, "train": train_lines}


def format_report(report: dict[str, Any]) -> str:
    sections = report["sections"]
    env = (sections.get("env") or {}).get("result") or {}
    lines = [f"# parity.gpu report: {'PASS' if report['passed'] else 'FAIL'}", "",
             f"- command: `{report['command']}`", f"- device: {env.get('device') or report['device']}"
             + (" (dry run: CPU, tiny shapes)" if report["dry_run"] else ""),
             f"- started {report['started']}, updated {report['updated']}", ""]
    lines += _table(["section", "status", "seconds", "error"],
                    [[k, v["status"], f"{v['seconds']:.0f}", (v["error"] or "").replace("|", "/")[:300]]
                     for k, v in sections.items()])
    for name, entry in sections.items():
        if entry.get("result"):
            lines += ([""] if lines[-1] else []) + [f"## {name}", ""]
            try:
                lines += FORMATTERS[name](entry["result"])
            except (KeyError, TypeError) as e:  # a partial result: the JSON still has every figure
                lines.append(f"(no table: the result lacks {e})")
    return "\n".join(lines).rstrip() + "\n"
