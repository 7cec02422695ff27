"""The weight contract: Hugging Face GPT-2 parameter names and shapes, shared by both backends.

Both backends exchange weights as a flat dict {name: numpy array} in this layout ("common
weights"). Names are GPT2Model's (`wte.weight`, `h.0.attn.c_attn.weight`, ...); linear weights are
stored as HF's Conv1D does, (in_features, out_features), which is also the layout of a Flax Dense
kernel, so no tensor is ever transposed on the way between torch, JAX and safetensors. `wte.weight`
keeps the padded vocabulary rows; only the Hugging Face export crops them (see common/hf.py).
"""
from __future__ import annotations

import numpy as np

from common.config import ModelConfig

BLOCK_PARAMS = (  # (suffix, shape as a function of n_embd C)
    ("ln_1.weight", lambda C: (C,)),
    ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)),
    ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)),
    ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)),
    ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)),
    ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)),
    ("mlp.c_proj.bias", lambda C: (C,)),
)

# Projections into the residual stream: initialised with std 0.02 / sqrt(2 · n_layer) (GPT-2 paper).
RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight")
LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon (torch's default; Flax's is 1e-6)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the order of HF's state_dict)."""
    C = cfg.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (cfg.padded_vocab_size, C),
        "wpe.weight": (cfg.block_size, C),
    }
    for i in range(cfg.n_layer):
        for suffix, shape in BLOCK_PARAMS:
            if not cfg.bias and suffix.endswith(".bias"):
                continue
            shapes[f"h.{i}.{suffix}"] = shape(C)
    shapes["ln_f.weight"] = (C,)
    if cfg.bias:
        shapes["ln_f.bias"] = (C,)
    return shapes


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """Weight decay applies to matrices and embeddings (ndim ≥ 2), never to biases or LayerNorm gains."""
    return len(shape) >= 2


def decay_groups(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(decayed names, undecayed names), each in param_shapes order: AdamW's two parameter groups."""
    shapes = param_shapes(cfg)
    return ([n for n, s in shapes.items() if decays(n, s)], [n for n, s in shapes.items() if not decays(n, s)])


def init_std(name: str, cfg: ModelConfig) -> float:
    """Std of the normal init of a ≥2-D parameter (1-D: LayerNorm weight 1, biases 0)."""
    if name.endswith(RESIDUAL_PROJECTIONS):
        return 0.02 / (2 * cfg.n_layer) ** 0.5
    return 0.02


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The GPT-2 init as common weights (float32), the same arrays for both backends: normal(0.02)
    matrices and embeddings, 0.02/sqrt(2L) residual projections, zero biases, unit LayerNorm gains.

    Drawn tensor by tensor in param_shapes order, the i-th from numpy's PCG64 seeded with (seed, i), so
    a tensor's values depend only on the seed and its place in the contract. Always float32: a run in
    another dtype casts these (an fp64 parity run starts from the fp32 run's weights).
    """
    weights = {}
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        if len(shape) >= 2:
            a = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
            a *= np.float32(init_std(name, cfg))
        elif name.endswith(".bias"):
            a = np.zeros(shape, np.float32)
        else:  # the only 1-D weights are LayerNorm gains
            a = np.ones(shape, np.float32)
        weights[name] = a
    return weights


def check_weights(weights: dict, cfg: ModelConfig, source: str) -> None:
    """Names and shapes must equal the contract exactly; the message names the first mismatch."""
    expected = param_shapes(cfg)
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing or extra:
        raise ValueError(f"{source}: weights do not match the GPT-2 layout "
                         f"(missing: {missing[:3]}, unexpected: {extra[:3]})")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise ValueError(f"{source}: {k} has shape {tuple(weights[k].shape)}, expected {shape}")
