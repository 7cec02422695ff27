"""torch's speed levers (common/levers.py): what the probe times on this machine, and how a choice is applied.

Levers: `gemm` (the library of the blocks' fp32 linears and the head's backward products: aten's MKL
sgemm or oneDNN), `head_gemm` (the tied head's forward), `loss_chunk_rows` (rows per chunk of the fused
head + loss, 0 = the full logits), `threads` (torch's intra-op threads) and `allocator` (glibc's
tunables, set at start-up). The probe times the parts of a training step each lever changes, at the
run's own width, vocabulary and rows, candidates in alternation (common.levers.interleaved), and keeps
torch's own default (aten, full logits, all CPUs) unless another candidate is clearly faster
(common.levers.fastest). jax_impl/levers.py is the same module in JAX.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from common import levers
from common.config import Config, ConfigError
from common.levers import FIXED_CHUNK_ROWS, GEMM_PEAK_N, PROBE_ROUNDS, Choice, Levers
from common.plan import datasheet_peak
from torch_impl import ops
from torch_impl.loss import chunked_lm_loss, lm_loss

NAMES = ("gemm", "head_gemm", "loss_chunk_rows", "threads", "allocator")


def explicit_choices(cfg: Config) -> dict[str, Choice]:
    """The levers the config sets (run.loss_chunk_rows ≥ 0, run.threads > 0, run.cpu_gemm)."""
    out = levers.config_choices(cfg)
    if cfg.run.cpu_gemm != "auto":
        if cfg.run.cpu_gemm not in ops.GEMMS:
            raise ConfigError(f"run.cpu_gemm: torch's GEMMs are one of {', '.join(ops.GEMMS)}, got '{cfg.run.cpu_gemm}'")
        if cfg.run.cpu_gemm == "onednn" and not ops.onednn_available():
            raise ConfigError("run.cpu_gemm is onednn but this torch has no oneDNN")
        out["gemm"] = out["head_gemm"] = Choice(cfg.run.cpu_gemm, "config")
    if cfg.run.threads > 0:
        out["threads"] = Choice(cfg.run.threads, "config")
    return out


def choose(cfg: Config, device: torch.device, log: Callable[[str], None] = print) -> Levers:
    """The levers of `cfg` on `device`, applied to this process (threads, GEMM libraries)."""
    fixed = {"allocator": levers.allocator_choice()}
    explicit = explicit_choices(cfg)
    if device.type == "cuda":
        for name, v in (("gemm", "cublas"), ("head_gemm", "cublas"), ("loss_chunk_rows", FIXED_CHUNK_ROWS),
                        ("threads", torch.get_num_threads())):
            fixed[name] = Choice(v, "device")
        result = levers.on_device("torch", fixed, explicit, NAMES)
        result.peak_flops, result.peak_source = accelerator_peak(cfg, device)
        apply(result)  # run.threads: host-side ops still run on the CPU pool (cuBLAS is not a CPU GEMM to set)
        return result
    defaults = {"gemm": Choice("aten", "fixed"), "head_gemm": Choice("aten", "fixed"),
                "loss_chunk_rows": Choice(FIXED_CHUNK_ROWS, "fixed"), "threads": Choice(torch.get_num_threads(), "fixed")}
    if cfg.run.dtype != "fp32" or not ops.onednn_available():
        why = "no oneDNN in this torch" if cfg.run.dtype == "fp32" else f"{cfg.run.dtype}: aten's own kernels"
        for name in ("gemm", "head_gemm"):
            fixed[name] = Choice("aten", "fixed", why)
            defaults.pop(name)
    result = levers.resolve("torch", cfg, explicit=explicit, fixed=fixed, defaults=defaults, entry=levers.entry_key(cfg),
                            probe=lambda: probe(cfg, list(defaults)), peak_probe=lambda: gemm_peak(cfg.run.dtype),
                            order=NAMES, log=log)
    apply(result)
    return result


def apply(chosen: Levers) -> None:
    """Threads and GEMM libraries for this process (the chunk size reaches the model through its config)."""
    torch.set_num_threads(int(chosen.value("threads")))
    gemm, head = chosen.value("gemm"), chosen.value("head_gemm")
    if gemm in ops.GEMMS and head in ops.GEMMS:
        ops.set_gemm(gemm, head)


# ---- the probe -----------------------------------------------------------------------------------------

def _head_pass(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, vocab: int, chunk: int) -> Callable[[], None]:
    """One forward + backward of the tied head and loss as the model runs it at `chunk` rows (0: full logits)."""
    def run() -> None:
        h.grad = w.grad = None
        loss = chunked_lm_loss(h, w, t, vocab, chunk) if chunk else lm_loss(h @ w.T, t, vocab)
        loss.backward()
    return run


def _gemms_pass(x: dict[int, torch.Tensor], weights: list[tuple[torch.Tensor, torch.Tensor]],
                dy: dict[int, torch.Tensor], h_c: torch.Tensor, w: torch.Tensor, dlogits: torch.Tensor,
                grad_w: torch.Tensor) -> Callable[[], None]:
    """The products the `gemm` lever routes: forward + backward of one block's four linears (attention in/out,
    MLP in/out; x[k] has k columns, dy[k] is a dense incoming gradient of k columns, as in training), and
    one chunk's two backward products of the head (grad_h, and grad_wte accumulated in place)."""
    def run() -> None:
        outputs = []
        for wt, b in weights:
            wt.grad = b.grad = x[wt.shape[0]].grad = None
            outputs.append(ops.linear(x[wt.shape[0]], wt, b))
        torch.autograd.backward(outputs, [dy[y.shape[1]] for y in outputs])
        ops.matmul(dlogits, w)
        ops.matmul_add_(grad_w, dlogits.t(), h_c)
    return run


def _with(gemm: str, head: str, threads: int, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        ops.set_gemm(gemm, head)
        torch.set_num_threads(threads)
        fn()
    return run


def probe(cfg: Config, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Times the candidates of every lever in `names`, one lever after the other, each with the winners
    so far: the GEMM library of the products `gemm` routes, then of the head's forward (one chunk's
    product), then the chunk size (whole head + loss passes), then threads (both GEMM sets)."""
    m = cfg.model
    rows, c = levers.probe_rows(cfg), m.n_embd
    chunk = min(rows, FIXED_CHUNK_ROWS)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, c, generator=gen).requires_grad_()
    w = (0.02 * torch.randn(m.padded_vocab_size, c, generator=gen)).requires_grad_()
    t = torch.randint(0, m.vocab_size, (rows,), generator=gen)
    x = {k: torch.randn(rows, k, generator=gen).requires_grad_() for k in (c, 4 * c)}
    dy = {k: torch.randn(rows, k, generator=gen) for k in (c, 3 * c, 4 * c)}
    weights = [((0.02 * torch.randn(i, o, generator=gen)).requires_grad_(), torch.zeros(o, requires_grad=True))
               for i, o in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c))]
    w_real = w.detach()[:m.vocab_size]
    dlogits, grad_w = torch.randn(chunk, m.vocab_size, generator=gen), torch.zeros_like(w_real)
    gemms = _gemms_pass(x, weights, dy, h.detach()[:chunk], w_real, dlogits, grad_w)
    head_forward = functools.partial(ops.matmul, h.detach()[:chunk], w_real.t(), lever="head_gemm")

    def both(fn: Callable[[], None]) -> Callable[[], None]:
        return lambda: (gemms(), fn())

    threads0, gemm0 = torch.get_num_threads(), (ops.gemm_of("gemm"), ops.gemm_of("head_gemm"))
    chosen: dict[str, Any] = {"gemm": "aten", "head_gemm": "aten", "threads": threads0}
    timings: dict[str, Any] = {"rows": rows}

    def decide(name: str, candidates: list, default: Any, make: Callable[[Any], Callable[[], None]]) -> None:
        if name not in names:
            return
        seconds = levers.interleaved({cand: make(cand) for cand in candidates}, PROBE_ROUNDS)
        chosen[name] = levers.fastest(seconds, default)
        timings[name] = levers.timings_record(seconds)

    try:
        decide("gemm", list(ops.GEMMS), "aten", lambda g: _with(g, chosen["head_gemm"], threads0, gemms))
        decide("head_gemm", list(ops.GEMMS), "aten", lambda g: _with(chosen["gemm"], g, threads0, head_forward))
        head = functools.partial(_head_pass, h, w, t, m.vocab_size)
        decide("loss_chunk_rows", levers.chunk_candidates(rows), 0,
               lambda k: _with(chosen["gemm"], chosen["head_gemm"], threads0, head(k)))
        counts = sorted({threads0, max(1, threads0 // 2), 1}, reverse=True)
        decide("threads", counts, threads0,
               lambda n: _with(chosen["gemm"], chosen["head_gemm"], n, both(head_forward)))
    finally:
        torch.set_num_threads(threads0)
        ops.set_gemm(*gemm0)
    return {name: chosen[name] for name in names}, timings


def gemm_peak(dtype: str) -> tuple[float, str]:
    """The best of aten and oneDNN (fp32) on an N×N product in the run's dtype."""
    from common.benchtiming import time_gemm

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}.get(dtype, torch.float32)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(GEMM_PEAK_N, GEMM_PEAK_N, generator=gen).to(dt) for _ in range(2))
    cases = {"aten": lambda: a @ b}
    if ops.onednn_available() and dt == torch.float32:
        b_t = b.t().contiguous()
        cases["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
    best = max((time_gemm(fn, GEMM_PEAK_N, 0.3)["gflops"], name) for name, fn in cases.items())
    return best[0] * 1e9, (f"{dtype} GEMM peak {best[0]:,.0f} GFLOP/s ({best[1]}, N={GEMM_PEAK_N}, "
                           f"{torch.get_num_threads()} threads) on this machine")


def accelerator_peak(cfg: Config, device: torch.device) -> tuple[float, str]:
    """run.peak_tflops, else the GPU's datasheet peak by name, else a probed GEMM in the run's dtype."""
    if cfg.run.peak_tflops > 0:
        return cfg.run.peak_tflops * 1e12, "run.peak_tflops"
    return _probed_accelerator_peak(cfg.run.dtype, str(device))


@functools.cache
def _probed_accelerator_peak(dtype: str, device_name: str) -> tuple[float, str]:
    device = torch.device(device_name)
    name = torch.cuda.get_device_name(device)
    sheet = datasheet_peak(name, dtype)
    if sheet:
        return sheet
    from common.benchtiming import time_gemm

    n = 8192
    dt = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16}.get(dtype, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))

    def gemm() -> None:
        a @ b
        torch.cuda.synchronize(device)

    gflops = time_gemm(gemm, n, 0.5)["gflops"]
    return gflops * 1e9, f"{dtype} GEMM peak {gflops / 1e3:,.0f} TFLOP/s probed on {name} (not in the datasheet table)"
