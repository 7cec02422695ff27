"""The JAX parameter tree's layout: nested dicts named as the common weights, the blocks stacked by layer.

The tree is the common weights' names nested at the dots ("wte.weight" -> {"wte": {"weight"}}), except that
the transformer blocks are one stack: {"h": {"attn": {"c_attn": {"weight": (n_layer, C, 3C)}}}}, which a
scan over layers reads slice by slice. These helpers move between that tree and per-layer common names, and
tell the optimizer, the shardings and the checkpoints which leaves carry the layer axis. torch's modules hold
their layers apart, so torch_impl has no counterpart.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.config import ModelConfig
from common.names import param_shapes

LAYERS = "h"  # the stacked blocks' name in the params tree, and the prefix of their common names


def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; the stacked blocks keep their layer axis ("h.attn.c_attn.weight")."""
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def unstacked(params) -> dict[str, Any]:
    """A params-shaped tree (parameters, gradients, moments, per-tensor figures) by common name, the block
    leaves split into their layers, layer by layer: {"h.0.attn.c_attn.weight": stack[0], ...} (views where
    the leaves are numpy)."""
    prefix = LAYERS + "."
    flat = flatten(params)
    blocks = {name[len(prefix):]: v for name, v in flat.items() if name.startswith(prefix)}
    first = prefix + next(iter(blocks), "")
    out: dict[str, Any] = {}
    for name, v in flat.items():
        if not name.startswith(prefix):
            out[name] = v
        elif name == first:  # every layer, in order, where the stack begins
            out.update({f"{prefix}{i}.{rest}": b[i] for i in range(v.shape[0]) for rest, b in blocks.items()})
    return out


def stacked(flat: dict[str, Any]) -> dict:
    """The inverse of unstacked: common names -> the params tree, block leaves stacked by layer (numpy)."""
    layers: dict[str, dict[int, Any]] = {}
    tree = {}
    for name, v in flat.items():
        parts = name.split(".", 2)
        if parts[0] == LAYERS:
            layers.setdefault(parts[2], {})[int(parts[1])] = v
        else:
            tree[name] = v
    for rest, by_layer in layers.items():
        tree[f"{LAYERS}.{rest}"] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return unflatten(tree)


def in_layer_stack(path) -> bool:
    """Whether a jax.tree_util key path (of params, or of an optimizer state holding params-shaped trees)
    leads into the stacked blocks, whose leading axis is the layer."""
    return any(isinstance(k, jax.tree_util.DictKey) and k.key == LAYERS for k in path)


def per_tensor(fn, *trees):
    """fn(leaf, ...) over params-shaped trees, once per layer in the stacked blocks (vmapped over their axis)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, *leaves: (jax.vmap(fn) if in_layer_stack(path) else fn)(*leaves), *trees)


def stacked_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The params tree's leaves by dotted name and shape: common.names.param_shapes with the blocks stacked."""
    shapes = {}
    for name, shape in param_shapes(cfg).items():
        parts = name.split(".", 2)
        if parts[0] != LAYERS:
            shapes[name] = shape
        elif parts[1] == "0":
            shapes[f"{LAYERS}.{parts[2]}"] = (cfg.n_layer, *shape)
    return shapes


def abstract_params(cfg: ModelConfig, param_dtype: Any = jnp.float32) -> dict:
    """Shapes and dtypes of the params tree, without any values (for optax/orbax templates)."""
    return unflatten({k: jax.ShapeDtypeStruct(s, jnp.dtype(param_dtype)) for k, s in stacked_shapes(cfg).items()})
