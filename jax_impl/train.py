"""The JAX backend of the shared training loop (common/loop.py): `python -m jax_impl.train`.

The training state is a pytree of arrays (step, params, opt_state, rng) plus two static fields naming
the `Runtime` it belongs to: the model, optimizer, shardings and jitted functions of one
(model + optim + dtype, mesh). Runs that differ only in paths or intervals share a Runtime and so
its compiled programs; states of different configs can be stepped side by side.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("jax_impl.train")

import dataclasses
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from common.backend import DistInfo
from common.checkpoints import check_model_matches
from common.diagnostics import diagnostic_group, summarize_diagnostics
from common.config import Config, ConfigError, DataConfig, RunConfig
from common.plan import peak_flops as stated_peak_flops
from jax_impl import checkpoint, dist
from jax_impl.model import GPT, abstract_params, flatten, from_common, init_params
from jax_impl.optim import build_optimizer, grad_norm, lr_schedule

# run.dtype -> (compute dtype, parameter/optimizer-state dtype)
DTYPES = {"fp32": (jnp.float32, jnp.float32), "bf16": (jnp.bfloat16, jnp.float32), "fp64": (jnp.float64, jnp.float64)}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps completed; indexes the lr table
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key, split once per step for dropout
    # Static (not arrays): which Runtime this state belongs to, so states of several configs can coexist.
    cfg: Config = flax.struct.field(pytree_node=False, default=None)  # compiled_part of the run's config
    mesh: Mesh = flax.struct.field(pytree_node=False, default=None)


def set_precision(cfg: Config) -> None:
    """fp16 has no JAX path here (no loss scaler); fp64 needs x64, which is enabled for fp64 runs only."""
    if cfg.run.dtype == "fp16":
        raise ConfigError("run.dtype fp16 is torch-only (it needs a GradScaler); use bf16 or fp32 with jax")
    if cfg.run.dtype not in DTYPES:
        raise ConfigError(f"run.dtype must be one of {', '.join(DTYPES)} for jax, got '{cfg.run.dtype}'")
    jax.config.update("jax_enable_x64", cfg.run.dtype == "fp64")
    # GPUs/TPUs default to TF32 / bf16-pass matmuls for fp32; parity (fp64) runs pin full precision,
    # as torch_impl.dist does with TF32. CPUs ignore the setting.
    jax.config.update("jax_default_matmul_precision", "highest" if cfg.run.dtype == "fp64" else None)


# Compiled programs are kept here across runs unless JAX_COMPILATION_CACHE_DIR names another folder: a
# second run of a config starts in well under a second instead of re-compiling (docs/performance.md).
COMPILATION_CACHE_DIR = Path("~/.cache/gpt2-twin/jax").expanduser()


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default (JAX_COMPILATION_CACHE_DIR wins if set)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE_DIR))


def replicate(tree, sharding) -> Any:
    """Host arrays -> global arrays with `sharding`; works across processes (every host holds the values)."""
    def put(a):
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(put, tree)


def compiled_part(cfg: Config) -> Config:
    """The fields the jitted functions depend on (model, optimizer, dtype); runs that differ only in
    paths, intervals or seed share one Runtime and its compiled programs."""
    return dataclasses.replace(cfg, data=DataConfig(), run=RunConfig(dtype=cfg.run.dtype))


class Runtime:
    """Model, optimizer and jitted step functions for one (compiled_part(config), mesh)."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.dtype, self.param_dtype = DTYPES[cfg.run.dtype]
        self.model = GPT(cfg.model, dtype=self.dtype, param_dtype=self.param_dtype)
        self.replicated = dist.param_sharding(mesh)
        self.batch_sharding, self.eval_sharding = dist.batch_sharding(mesh), dist.eval_sharding(mesh)
        self.lr = lr_schedule(cfg.optim, self.param_dtype)
        shapes = abstract_params(cfg.model, self.param_dtype)
        self.tx = build_optimizer(shapes, cfg, self.param_dtype)
        self.train_step = jax.jit(self._train_step, donate_argnums=0, out_shardings=self.replicated)
        self.eval_loss = jax.jit(self._eval_loss, out_shardings=self.replicated)
        self.grads = jax.jit(self._grads, out_shardings=self.replicated)
        self.logits = jax.jit(lambda params, x: self.model.apply({"params": params}, x)[..., :cfg.model.vocab_size],
                              out_shardings=self.replicated)
        self.init_opt = jax.jit(self.tx.init, out_shardings=self.replicated)

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
        metrics = {"loss": losses.mean(), "grad_norm": grad_norm(opt_state), "lr": self.lr(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    def _eval_loss(self, params, x, y):
        return self._loss(params, x, y, None, False)

    def new_state(self, params, seed: int) -> TrainState:
        params = replicate(params, self.replicated)
        opt_state = self.init_opt(params)
        rng = jax.random.PRNGKey(seed)
        return self.state(0, params, opt_state, rng)

    def state(self, step: int, params, opt_state, rng) -> TrainState:
        return TrainState(step=replicate(jnp.asarray(step, jnp.int32), self.replicated), params=params,
                          opt_state=opt_state, rng=replicate(rng, self.replicated), cfg=self.cfg, mesh=self.mesh)

    def with_moments(self, state: TrainState, moments: dict[str, Any]) -> TrainState:
        """`state` with AdamW's m, v and step counters set from common-named arrays (parity.convert)."""
        m = from_common(moments["m"], self.cfg.model, self.param_dtype, "moments m")
        v = from_common(moments["v"], self.cfg.model, self.param_dtype, "moments v")
        step = int(moments["step"])
        # "count" is both Adam's bias-correction step and the lr schedule's index: both are `step`.
        # Set on host values and replicated leaf by leaf, so no two leaves share a (donated) buffer.
        host = optax.tree.set(jax.device_get(state.opt_state), mu=m, nu=v, count=np.int32(step))
        return self.state(step, state.params, replicate(host, self.replicated), state.rng)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of a state, without computing one (for orbax restores)."""
        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated)
        params = abstract_params(self.cfg.model, self.param_dtype)
        opt_state = jax.eval_shape(self.tx.init, params)
        rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        return TrainState(step=spec(jax.ShapeDtypeStruct((), jnp.int32)), params=jax.tree.map(spec, params),
                          opt_state=jax.tree.map(spec, opt_state), rng=spec(rng))


def _numpy(tree) -> dict[str, np.ndarray]:
    """Common-named fresh numpy copies in the arrays' own dtype (fp64 stays fp64 for parity)."""
    return {k: np.array(jax.device_get(v), copy=True) for k, v in flatten(tree).items()}


class JaxBackend:
    name = "jax"

    def __init__(self):
        self.mesh: Mesh | None = None
        self.cfg: Config | None = None  # the config of the current run (keep_checkpoints, seed)
        self._runtimes: dict[tuple[Config, Mesh], Runtime] = {}

    # --- CLI hooks used by common.loop.main -------------------------------------------------------
    def add_arguments(self, parser) -> None:
        parser.add_argument("--devices", type=int, default=None, metavar="N",
                            help="data-parallel devices in the mesh (same as --run.devices N); on CPU, "
                                 "N host devices are created before JAX starts")

    def apply_arguments(self, extra: dict[str, Any], cfg: Config) -> Config:
        n = extra.get("devices")
        if n is None:
            return cfg
        if n < 0:
            raise ConfigError(f"--devices must be ≥ 0, got {n}")
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, devices=n))

    # --- Backend protocol ------------------------------------------------------------------------
    def setup(self, cfg: Config) -> DistInfo:
        set_precision(cfg)
        enable_compilation_cache()
        dist.initialize_distributed()
        self.mesh = dist.make_mesh(cfg)
        return dist.dist_info(self.mesh)

    def teardown(self) -> None:
        dist.shutdown_distributed()

    def runtime(self, cfg: Config) -> Runtime:
        if self.mesh is None:
            self.setup(cfg)
        set_precision(cfg)
        self.cfg = cfg
        key = (compiled_part(cfg), self.mesh)
        if key not in self._runtimes:
            self._runtimes[key] = Runtime(key[0], self.mesh)
        return self._runtimes[key]

    def init_state(self, cfg: Config, dist_info: DistInfo | None = None,
                   weights: dict[str, np.ndarray] | None = None, moments: dict[str, Any] | None = None) -> TrainState:
        rt = self.runtime(cfg)
        if weights is not None:
            params = from_common(weights, cfg.model, rt.param_dtype)
        else:
            params = init_params(cfg.model, cfg.run.seed, rt.param_dtype)
        state = rt.new_state(params, cfg.run.seed)
        return rt.with_moments(state, moments) if moments is not None else state

    def _rt(self, state: TrainState) -> Runtime:
        """The Runtime that made `state` (x64 switched back on or off if another dtype ran since)."""
        if jax.config.jax_enable_x64 != (state.cfg.run.dtype == "fp64"):
            set_precision(state.cfg)
        return self._runtimes[(state.cfg, state.mesh)]

    def train_step(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
        rt = self._rt(state)
        return rt.train_step(state, dist.put_batch(x.astype(np.int32), rt.batch_sharding),
                             dist.put_batch(y.astype(np.int32), rt.batch_sharding))

    def evaluate(self, state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        rt = self._rt(state)
        total, n = 0.0, 0
        for x, y in batches:
            total = total + rt.eval_loss(state.params, dist.put_batch(x.astype(np.int32), rt.eval_sharding),
                                         dist.put_batch(y.astype(np.int32), rt.eval_sharding))
            n += 1
        return float(total) / n if n else float("nan")

    def generate(self, state: TrainState, prompt: list[int], num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
        from jax_impl.sample import generate

        rt = self._rt(state)
        return generate(rt.model, state.params, prompt, num_samples, max_new_tokens, temperature, top_k, seed)

    def to_common(self, state: TrainState) -> dict[str, np.ndarray]:
        return _numpy(state.params)

    def save_checkpoint(self, state: TrainState, out_dir: Path, step: int, meta: dict[str, Any],
                        val_loss: float | None) -> Path:
        return checkpoint.save_checkpoint(state.params, state.opt_state, state.rng, Path(out_dir), step, meta,
                                          val_loss, self.cfg.run.keep_checkpoints)

    def load_checkpoint(self, path: Path, cfg: Config, dist_info: DistInfo | None = None
                        ) -> tuple[TrainState, dict[str, Any]]:
        step_dir = checkpoint.resolve(Path(path))
        meta = checkpoint.read_meta(step_dir)
        check_model_matches(step_dir, meta, cfg)
        rt = self.runtime(cfg)
        abstract = rt.abstract_state()
        items = checkpoint.restore(step_dir, {"params": abstract.params, "opt_state": abstract.opt_state,
                                              "rng": {"key": abstract.rng}})
        step = int(meta["step"])  # steps completed; save_checkpoint always records it
        return rt.state(step, items["params"], items["opt_state"], items["rng"]["key"]), meta

    # --- common.backend.ParityHooks ----------------------------------------------------------------
    def logits(self, state: TrainState, x: np.ndarray) -> np.ndarray:
        rt = self._rt(state)
        return np.array(rt.logits(state.params, dist.put_batch(x.astype(np.int32), rt.eval_sharding)), copy=True)

    def grads(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The gradient train_step would apply (same dropout key), in the parameter dtype."""
        rt = self._rt(state)
        _, dropout_rng = jax.random.split(state.rng)
        g, _ = rt.grads(state.params, dist.put_batch(x.astype(np.int32), rt.batch_sharding),
                        dist.put_batch(y.astype(np.int32), rt.batch_sharding), dropout_rng)
        return _numpy(g)

    def optimizer_moments(self, state: TrainState) -> dict[str, Any]:
        return {"step": int(state.step), "m": _numpy(optax.tree.get(state.opt_state, "mu")),
                "v": _numpy(optax.tree.get(state.opt_state, "nu"))}

    # --- evaluation and diagnostics hooks of common/loop.py (mirrored in torch_impl/train.py) ----------
    def token_losses(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B, T) float64 per-token cross-entropy of y given x, eval mode, real vocabulary (HellaSwag)."""
        from jax_impl.evaluate import token_losses

        rt = self._rt(state)
        return token_losses(rt.model, state.params, x, y, put=lambda a: replicate(a, rt.replicated))

    def diagnostics(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
        """Per-group gradient norms and std(grad) / std(weight) for the step about to run on x, y.

        The gradient is that of train_step's batch (same dropout key), from the separately jitted
        gradient function; nothing is donated or stored, so train_step's numbers are unchanged bit for
        bit. Ratios are per group, pooled over the group's layers.
        """
        rt = self._rt(state)
        _, dropout_rng = jax.random.split(state.rng)
        g, _ = rt.grads(state.params, dist.put_batch(x.astype(np.int32), rt.batch_sharding),
                        dist.put_batch(y.astype(np.int32), rt.batch_sharding), dropout_rng)
        if getattr(self, "_moments", None) is None:  # one jitted program, not an eager op per tensor
            def tensor_moments(gv, wv):
                gv, wv = gv.astype(jnp.promote_types(gv.dtype, jnp.float32)), wv.astype(gv.dtype)
                return jnp.stack([gv.sum(), jnp.square(gv).sum(), wv.sum(), jnp.square(wv).sum()])
            self._moments = jax.jit(lambda grads, params: jax.tree.map(tensor_moments, grads, params))
        moments = flatten(self._moments(g, state.params))
        weights = flatten(state.params)
        sums: dict[str, list[float]] = {}
        for name, m in moments.items():
            entry = sums.setdefault(diagnostic_group(name), [weights[name].ndim, 0, 0.0, 0.0, 0.0, 0.0])
            entry[1] += weights[name].size
            values = np.asarray(m.addressable_data(0), dtype=np.float64).tolist()
            entry[2:] = [a + b for a, b in zip(entry[2:], values)]
        return summarize_diagnostics(sums)

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        return checkpoint.latest_checkpoint(Path(out_dir))

    def peak_flops(self, cfg: Config, dist_info: DistInfo) -> tuple[float, str]:
        flops, source = stated_peak_flops(dist_info.device, cfg.run.dtype, cfg.run.peak_tflops)
        if dist_info.device == "cpu" and dist_info.local_replicas > 1 and cfg.run.peak_tflops <= 0:
            # XLA's host devices all share the same cores: each replica gets a share of the machine.
            return flops / dist_info.local_replicas, f"{source}, shared by {dist_info.local_replicas} host devices"
        return flops, source


BACKEND = JaxBackend()


def main(argv: list[str] | None = None) -> int:
    from common import loop

    return loop.main(BACKEND, argv)


if __name__ == "__main__":
    sys.exit(main())
