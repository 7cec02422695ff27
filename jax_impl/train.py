"""The JAX backend of the shared training loop (common/loop.py): `python -m jax_impl.train`.

The training state is a pytree of arrays (step, params, opt_state, rng) plus a static field naming the
`Runtime` it belongs to: the model, optimizer, shardings and jitted functions of one (model + optim + dtype,
mesh). A mesh's Runtimes live in its `MeshContext`, which `JaxBackend.setup` hands out in DistInfo.context,
so `init_state(cfg, dist_info)` finds them as torch's finds its device; runs that differ only in paths or
intervals share a Runtime and so its compiled programs, and states of different configs can be stepped side
by side.
torch_impl/train.py is the same module in PyTorch, in the same order.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("jax_impl.train")

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from common import loop
from common.backend import DistInfo
from common.checkpoints import CheckpointMeta, open_checkpoint
from common.config import Config, ConfigError, DataConfig, RunConfig
from common.diagnostics import summarize_diagnostics
from common.levers import Levers, configured
from common.names import init_weights, param_shapes
from jax_impl import checkpoint, dist, levers
from jax_impl.evaluate import token_losses
from jax_impl.layout import abstract_params, per_tensor
from jax_impl.model import GPT, from_common, scan_layers_for, to_common
from jax_impl.ops import attention_for
from jax_impl.optim import build_optimizer, lr_schedule, pre_clip_norm
from jax_impl.sample import generate


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps completed; indexes the lr table
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key, split once per step for dropout
    # Static (not an array): the Runtime this state belongs to, so states of several configs can coexist.
    rt: "Runtime" = flax.struct.field(pytree_node=False, default=None)


def compiled_part(cfg: Config) -> Config:
    """The fields the jitted functions depend on (model, optimizer, dtype); runs that differ only in
    paths, intervals or seed share one Runtime and its compiled programs."""
    return dataclasses.replace(cfg, data=DataConfig(),
                               run=RunConfig(dtype=cfg.run.dtype, loss_chunk_rows=cfg.run.loss_chunk_rows))


class Runtime:
    """Model, optimizer and jitted step functions for one (compiled_part(config), mesh)."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.dtype, self.param_dtype = dist.dtypes(cfg.run.dtype)
        platform = mesh.devices.flat[0].platform
        self.model = GPT(cfg.model, dtype=self.dtype, param_dtype=self.param_dtype,
                         attention=attention_for(platform, self.dtype, cfg.model.dropout),
                         scan_layers=scan_layers_for(platform), loss_chunk_rows=cfg.run.loss_chunk_rows)
        self.replicated = dist.replicated(mesh)
        self.batch_sharding, self.eval_sharding = dist.batch_sharding(mesh), dist.eval_sharding(mesh)
        self.lr = lr_schedule(cfg.optim, self.param_dtype)
        shapes = abstract_params(cfg.model, self.param_dtype)
        self.tx = build_optimizer(shapes, cfg, self.param_dtype)
        # Where each array of a state lives (dist.sharding_of): sharded under fsdp, replicated under ddp.
        self.param_shardings = dist.state_shardings(mesh, shapes)
        self.opt_shardings = dist.state_shardings(mesh, jax.eval_shape(self.tx.init, shapes))
        self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                          opt_state=self.opt_shardings, rng=self.replicated, rt=self)
        self.train_step = jax.jit(self._train_step, donate_argnums=0,
                                  out_shardings=(self.state_shardings, self.replicated))
        self.eval_loss = jax.jit(self._eval_loss, out_shardings=self.replicated)
        self.grads = jax.jit(self._grads, out_shardings=(self.param_shardings, self.replicated))
        self.logits = jax.jit(lambda params, x: self.model.apply({"params": params}, x)[..., :cfg.model.vocab_size],
                              out_shardings=self.replicated)
        self.init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
        self.tensor_sums = jax.jit(lambda grads, params: per_tensor(_tensor_sums, grads, params),
                                   out_shardings=self.replicated)
        self.gather = jax.jit(lambda tree: tree, out_shardings=self.replicated)

    def _loss(self, params, x, y, rng, train: bool):
        # GPT.loss: the row-chunked tied head + cross-entropy (never the full (B·T, V) logits).
        return self.model.apply({"params": params}, x, y, train=train, rngs={"dropout": rng} if train else None,
                                method=GPT.loss)

    def _grads(self, params, x, y, rng):
        """(mean gradient, per-micro-step losses) over the (accum, rows, T) micro-batches."""
        # Accumulation is a lax.scan inside the one jitted step rather than optax.MultiSteps: one
        # optimizer update per call (the loop's step = an optimizer step, metrics per step), one
        # compiled program whatever accum is, and only one micro-batch's activations alive at a time.
        accum = x.shape[0]

        def scaled_loss(p, xb, yb, key):
            loss = self._loss(p, xb, yb, key, True)
            return loss / accum, loss  # 1/accum per micro-step: the summed gradient is the full-batch mean

        def micro_grads(i, xb, yb):
            (_, loss), g = jax.value_and_grad(scaled_loss, has_aux=True)(params, xb, yb, jax.random.fold_in(rng, i))
            return g, loss

        def micro(grads, inputs):
            g, loss = micro_grads(*inputs)
            return jax.tree.map(jnp.add, grads, g), loss

        if accum == 1:  # no accumulator to zero and add into: one pass over the gradients fewer
            g, loss = micro_grads(0, x[0], y[0])
            return g, loss[None]
        zeros = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(micro, zeros, (jnp.arange(accum), x, y))

    def _train_step(self, state: TrainState, x, y):
        rng, dropout_rng = jax.random.split(state.rng)
        grads, losses = self._grads(state.params, x, y, dropout_rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        metrics = {"loss": losses.mean(), "grad_norm": pre_clip_norm(opt_state), "lr": self.lr(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    def _eval_loss(self, params, x, y):
        return self._loss(params, x, y, None, False)

    def state(self, step: int, params, opt_state, rng) -> TrainState:
        return TrainState(step=dist.place(jnp.asarray(step, jnp.int32), self.replicated), params=params,
                          opt_state=opt_state, rng=dist.place(rng, self.replicated), rt=self)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of a state on this mesh, without computing one (what orbax restores
        into, whatever mesh the checkpoint was saved from)."""
        def spec(a, sharding):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
        params = abstract_params(self.cfg.model, self.param_dtype)
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                            opt_state=jax.eval_shape(self.tx.init, params),
                            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)), rt=self)
        return jax.tree.map(spec, shapes, self.state_shardings)

    def put_batch(self, a: np.ndarray, sharding=None) -> jax.Array:
        """Host token ids as int32 on the mesh, split over the data axes (`sharding`: the training batch's)."""
        return dist.put_batch(a.astype(np.int32), self.batch_sharding if sharding is None else sharding)

    def readable(self, tree):
        """`tree` as arrays this process can read whole: arrays sharded over other processes' devices are
        gathered (replicated) first."""
        if all(a.is_fully_addressable for a in jax.tree.leaves(tree)):
            return tree
        return self.gather(tree)


def _tensor_sums(g, w):
    """[Σg, Σg², Σw, Σw²] of one parameter, at least in fp32 (common.diagnostics groups them)."""
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    w = w.astype(g.dtype)
    return jnp.stack([g.sum(), jnp.square(g).sum(), w.sum(), jnp.square(w).sum()])


class MeshContext:
    """A mesh and the Runtimes compiled for it, one per compiled_part of a config (what DistInfo.context holds)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.platform = mesh.devices.flat[0].platform
        self._runtimes: dict[Config, Runtime] = {}

    def runtime(self, cfg: Config) -> Runtime:
        """The Runtime of `cfg` (with its levers already chosen: common.levers.configured) on this mesh."""
        key = compiled_part(cfg)
        if key not in self._runtimes:
            self._runtimes[key] = Runtime(key, self.mesh)
        return self._runtimes[key]


def runtime_of(state: TrainState) -> Runtime:
    """The Runtime that made `state`, with x64 switched back on or off if another dtype ran since."""
    dist.set_x64(state.rt.cfg.run.dtype)
    return state.rt


def init_state(cfg: Config, dist_info: DistInfo, weights: dict[str, np.ndarray] | None = None,
               moments: dict[str, Any] | None = None) -> TrainState:
    """Params + optimizer state + dropout key at step 0, from `weights` or the common GPT-2 init of run.seed
    (the same arrays as the torch backend's); `moments` restores AdamW's state and step. The levers of
    this machine are chosen (probed the first time) before anything is compiled."""
    ctx: MeshContext = dist_info.context
    dist.set_x64(cfg.run.dtype)
    rt = ctx.runtime(configured(cfg, levers.choose(cfg, ctx.platform)))
    source = "initial weights" if weights is not None else "init"
    params = from_common(init_weights(cfg.model, cfg.run.seed) if weights is None else weights, cfg.model,
                         rt.param_dtype, source)
    params = dist.place(params, rt.param_shardings)
    state = rt.state(0, params, rt.init_opt(params), jax.random.PRNGKey(cfg.run.seed))
    return set_moments(state, moments) if moments is not None else state


def set_moments(state: TrainState, moments: dict[str, Any]) -> TrainState:
    """`state` with AdamW's m, v and step set from common-named arrays (parity.convert moves them between
    backends)."""
    rt = runtime_of(state)
    m = from_common(moments["m"], rt.cfg.model, rt.param_dtype, "moments m")
    v = from_common(moments["v"], rt.cfg.model, rt.param_dtype, "moments v")
    step = int(moments["step"])
    # "count" is both Adam's bias-correction step and the lr schedule's index: both are `step`.
    # Set on host values and placed leaf by leaf, so no two leaves share a (donated) buffer.
    host = optax.tree.set(jax.device_get(rt.readable(state.opt_state)), mu=m, nu=v, count=np.int32(step))
    return rt.state(step, state.params, dist.place(host, rt.opt_shardings), state.rng)


def train_step(state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step over this process's micro-batches x, y of shape (accum, rows, T)."""
    rt = runtime_of(state)
    return rt.train_step(state, rt.put_batch(x), rt.put_batch(y))


def evaluate(state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean loss over every process's batches (all pass the same number of batches; none is an error)."""
    rt = runtime_of(state)
    total, n = 0.0, 0
    for x, y in batches:
        total = total + rt.eval_loss(state.params, rt.put_batch(x, rt.eval_sharding), rt.put_batch(y, rt.eval_sharding))
        n += 1
    if n == 0:
        raise ValueError("evaluate() got no batches")
    return float(total) / n


class JaxBackend:
    """common.backend.Backend and ParityHooks over the functions above, with a MeshContext per mesh set up."""
    name = "jax"

    def __init__(self):
        self.context: MeshContext | None = None  # the last setup's
        self._contexts: dict[Mesh, MeshContext] = {}  # so a config set up again keeps its compiled Runtimes

    # --- command line ---------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--devices", type=int, default=None, metavar="N",
                            help="devices in the mesh (same as --run.devices N); on CPU, "
                                 "N host devices are created before JAX starts")

    def apply_arguments(self, extra: dict[str, Any], cfg: Config) -> Config:
        n = extra.get("devices")
        if n is None:
            return cfg
        if n < 0:
            raise ConfigError(f"--devices must be ≥ 0, got {n}")
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, devices=n))

    def compile_label(self, cfg: Config) -> str:
        return "jit"  # run.compile is torch.compile; JAX's step is compiled by jit whatever the flag says

    # --- training -------------------------------------------------------------------------------------
    def setup(self, cfg: Config) -> DistInfo:
        info, mesh = dist.setup_distributed(cfg)
        self.context = self._contexts.setdefault(mesh, MeshContext(mesh))
        return dataclasses.replace(info, context=self.context)

    def teardown(self) -> None:
        dist.teardown_distributed()

    def runtime(self, cfg: Config) -> Runtime:
        """The Runtime of `cfg` on this backend's mesh (set up on first use), with this machine's levers."""
        return self.context.runtime(configured(cfg, self._levers(cfg)))

    def _levers(self, cfg: Config) -> Levers:
        """This machine's levers for `cfg` (jax_impl/levers.py; common.levers resolves them once per process)."""
        if self.context is None:
            self.setup(cfg)
        dist.set_x64(cfg.run.dtype)
        return levers.choose(cfg, self.context.platform)

    def init_state(self, cfg: Config, dist_info: DistInfo, weights: dict[str, np.ndarray] | None = None,
                   moments: dict[str, Any] | None = None) -> TrainState:
        return init_state(cfg, dist_info, weights, moments)

    def train_step(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
        return train_step(state, x, y)

    def evaluate(self, state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        return evaluate(state, batches)

    def token_losses(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        rt = runtime_of(state)
        return token_losses(rt.model, state.params, x, y, put=lambda a: dist.place(a, rt.replicated))

    def diagnostics(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
        """The gradient of train_step's batch (same dropout key) from the separately jitted gradient
        function; nothing is donated or stored, so train_step's numbers are unchanged bit for bit."""
        rt = runtime_of(state)
        _, dropout_rng = jax.random.split(state.rng)
        g, _ = rt.grads(state.params, rt.put_batch(x), rt.put_batch(y), dropout_rng)
        sums = to_common(jax.tree.map(lambda s: s.addressable_data(0), rt.tensor_sums(g, state.params)))
        shapes = param_shapes(rt.cfg.model)
        return summarize_diagnostics({name: (len(shapes[name]), math.prod(shapes[name]),
                                             np.asarray(s, dtype=np.float64).tolist()) for name, s in sums.items()})

    def generate(self, state: TrainState, prompt: list[int], num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
        rt = runtime_of(state)
        return generate(rt.model, state.params, prompt, num_samples, max_new_tokens, temperature, top_k, seed)

    def to_common(self, state: TrainState) -> dict[str, np.ndarray]:
        return to_common(runtime_of(state).readable(state.params))

    def save_checkpoint(self, state: TrainState, out_dir: Path, meta: CheckpointMeta) -> Path:
        return checkpoint.save_checkpoint(state, out_dir, meta)

    def params_finite(self, state: TrainState) -> bool:
        return checkpoint.params_finite(state)

    def load_checkpoint(self, path: Path, cfg: Config, dist_info: DistInfo) -> tuple[TrainState, CheckpointMeta]:
        folder, meta = open_checkpoint(path, cfg)
        rt = dist_info.context.runtime(configured(cfg, self._levers(cfg)))
        return checkpoint.load_checkpoint(folder, rt.abstract_state()), meta

    def levers(self, cfg: Config, dist_info: DistInfo) -> Levers:
        chosen = self._levers(cfg)
        if (dist_info.device == "cpu" and dist_info.local_replicas > 1 and cfg.run.peak_tflops <= 0
                and chosen.peak_flops is not None):
            # XLA's host devices all share the same cores: each replica gets a share of the machine.
            return dataclasses.replace(chosen, peak_flops=chosen.peak_flops / dist_info.local_replicas,
                                       peak_source=f"{chosen.peak_source}, shared by {dist_info.local_replicas} "
                                                   f"host devices")
        return chosen

    # --- common.backend.ParityHooks -------------------------------------------------------------------
    def logits(self, state: TrainState, x: np.ndarray) -> np.ndarray:
        rt = runtime_of(state)
        return np.array(rt.logits(state.params, rt.put_batch(x, rt.eval_sharding)), copy=True)

    def grads(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The gradient train_step would clip and apply (same dropout key), in the parameter dtype."""
        rt = runtime_of(state)
        _, dropout_rng = jax.random.split(state.rng)
        g, _ = rt.grads(state.params, rt.put_batch(x), rt.put_batch(y), dropout_rng)
        return to_common(rt.readable(g))

    def optimizer_moments(self, state: TrainState) -> dict[str, Any]:
        opt_state = runtime_of(state).readable(state.opt_state)
        return {"step": int(state.step), "m": to_common(optax.tree.get(opt_state, "mu")),
                "v": to_common(optax.tree.get(opt_state, "nu"))}


BACKEND = JaxBackend()


def main(argv: list[str] | None = None) -> int:
    return loop.main(BACKEND, argv)


if __name__ == "__main__":
    sys.exit(main())
