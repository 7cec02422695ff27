"""Training diagnostics both backends log: per-group gradient norms and grad-to-weight ratios."""
from __future__ import annotations

from typing import Mapping, Sequence


def diagnostic_group(name: str) -> str:
    """Parameters are grouped by role across layers ("h.3.mlp.c_fc.weight" -> "mlp.c_fc.weight")."""
    return name.split(".", 2)[2] if name.startswith("h.") else name


def summarize_diagnostics(tensors: Mapping[str, tuple[int, int, Sequence[float]]]) -> dict[str, dict[str, float]]:
    """{name: (ndim, size, [Σg, Σg², Σw, Σw²])} per parameter -> the record's "group_grad_norms" (L2 norm of
    each group's gradient) and "grad_to_weight" (std(grad) / std(weight), pooled over the group's layers)."""
    sums: dict[str, list[float]] = {}
    for name, (ndim, size, moments) in tensors.items():
        entry = sums.setdefault(diagnostic_group(name), [ndim, 0, 0.0, 0.0, 0.0, 0.0])
        entry[1] += size
        entry[2:] = [a + float(b) for a, b in zip(entry[2:], moments)]
    norms, ratios = {}, {}
    for key, (ndim, n, g1, g2, w1, w2) in sums.items():
        norms[key] = g2 ** 0.5
        if ndim >= 2:  # biases and LayerNorm gains start constant: their std is 0
            ratios[key] = max(g2 / n - (g1 / n) ** 2, 0.0) ** 0.5 / max(w2 / n - (w1 / n) ** 2, 0.0) ** 0.5
    return {"group_grad_norms": norms, "grad_to_weight": ratios}
