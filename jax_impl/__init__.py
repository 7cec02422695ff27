"""GPT-2 pre-training in JAX / Flax / optax / orbax, mirroring torch_impl file for file.

`--devices N` (or `--run.devices N`) on a jax_impl command line needs N XLA host devices on CPU, and
XLA fixes the device count when JAX starts; this package is imported before any entry point's code
runs (`python -m jax_impl.train` imports it first), so it is the one place that can add the flag in time.
"""
from __future__ import annotations

import os
import sys

from common.config import MAX_HOST_DEVICES


def _devices_from_argv(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        for flag in ("--devices", "--run.devices"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            try:
                return int(value)
            except ValueError:
                return None  # the argument parser reports it with the flag's name
    return None


def _force_host_devices() -> None:
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return  # too late to change, or the caller chose explicitly
    if not (sys.argv and sys.argv[0] in ("-m", "-c") or "jax_impl" in (sys.argv[0] if sys.argv else "")):
        return  # imported by another program (pytest, a notebook): its arguments are not ours
    n = _devices_from_argv(sys.argv[1:])
    if n and 1 < n <= MAX_HOST_DEVICES:  # more: not forced, so the mesh check refuses it instead of XLA hanging
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()


_force_host_devices()
