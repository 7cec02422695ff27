"""What each run.dtype means, once: the dtype the matmuls compute in, the dtype parameters and optimizer
state are kept in, and which backends run it. Each backend maps these names to its framework's dtypes in
one place (torch_impl/dist.py, jax_impl/dist.py); config validation and the CLIs' --dtype choices come
from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    compute: str  # dtype of the matmuls (autocast's dtype in torch)
    params: str  # dtype of parameters, gradients and AdamW's moments
    backends: tuple[str, ...]  # backends that run it
    loss_scaling: bool = False  # gradients underflow without a scaled loss (fp16's narrow exponent)
    why_not: str = ""  # for a backend it lacks: why

    @property
    def float64(self) -> bool:
        """Whether anything runs in float64 (JAX then needs x64; GPUs must not take TF32 shortcuts)."""
        return "float64" in (self.compute, self.params)


PRECISIONS = {
    "fp32": Precision(compute="float32", params="float32", backends=("torch", "jax")),
    # Mixed precision: fp32 master weights and optimizer state, bf16 matmuls.
    "bf16": Precision(compute="bfloat16", params="float32", backends=("torch", "jax")),
    "fp16": Precision(compute="float16", params="float32", backends=("torch",), loss_scaling=True,
                      why_not="it needs a loss scaler, which only torch's GradScaler provides here"),
    # Everything in float64: the parity mode, where rounding no longer hides an algorithmic difference.
    "fp64": Precision(compute="float64", params="float64", backends=("torch", "jax")),
}
DTYPES = tuple(PRECISIONS)


def dtypes_for(backend: str) -> tuple[str, ...]:
    """The run.dtype names `backend` runs, in table order (a CLI's --dtype choices)."""
    return tuple(name for name, p in PRECISIONS.items() if backend in p.backends)


def unsupported(dtype: str, backend: str) -> str | None:
    """Why `backend` cannot run `dtype` (a message naming run.dtype), or None when it can."""
    p = PRECISIONS.get(dtype)
    if p is None:
        return f"run.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'"
    if backend not in p.backends:
        return (f"run.dtype {dtype} is {'/'.join(p.backends)}-only ({p.why_not}); use one of "
                f"{', '.join(dtypes_for(backend))} with {backend}")
    return None
