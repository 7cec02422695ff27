"""The plain baselines (bench/plain_torch.py, bench/plain_jax.py) and `parity.bench --vs-plain` (bench/vs_plain.py).

A baseline that computed another function would make every speed-up it reports void, so the first test holds
both to our backends' loss on the same weights and batch.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bench import pairwise, plain_jax, plain_torch, vs_plain
from common.backend import DistInfo, load_backend
from bench.workers import MAKEFILE_TUNABLES
from common.config_files import dump_toml
from common.data import loader_for
from conftest import tiny_config, with_optim
from parity import bench as cli

LOSS_TOL = 1e-5  # step 0: the same function on the same weights, up to fp32 summation order


def first_losses(cfg, steps: int = 2) -> dict[str, list[float]]:
    """Losses of the first `steps` steps of each backend and baseline, from torch's init, on the loader's batches."""
    tb = load_backend("torch")
    weights = tb.to_common(tb.init_state(cfg, tb.setup(cfg)))
    loader = loader_for(cfg, DistInfo())
    batches = [loader.next_step() for _ in range(steps)]
    losses = {}
    for name in ("torch", "jax"):
        b = load_backend(name)
        state = b.init_state(cfg, b.setup(cfg), weights=weights)
        losses[name] = []
        for x, y in batches:
            state, metrics = b.train_step(state, x, y)
            losses[name].append(float(metrics["loss"]))
    for name, module in (("plain_torch", plain_torch), ("plain_jax", plain_jax)):
        step, device = module.build(cfg, weights)
        assert device == "cpu"
        losses[name] = [float(step(x, y)) for x, y in batches]
    return losses


@pytest.mark.parametrize("accum", [1, 2])
def test_plain_baselines_compute_our_backends_loss_on_the_same_weights_and_batch(tiny_shards, accum):
    # A padded vocabulary (256 real ids, 320 rows) checks that padded rows stay out of every softmax.
    cfg = with_optim(tiny_config(tiny_shards), total_batch_size=64 * accum)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, padded_vocab_size=320))
    losses = first_losses(cfg)
    assert 5.0 < losses["torch"][0] < 6.0  # about ln 256: an untrained model over 256 tokens
    for name in ("jax", "plain_torch", "plain_jax"):
        assert losses[name][0] == pytest.approx(losses["torch"][0], abs=LOSS_TOL), name
        # After one update: the same AdamW, weight-decay groups, clipping and learning rate (decaying the
        # LayerNorm gains and biases as well fails this).
        assert losses[name][1] == pytest.approx(losses["torch"][1], abs=LOSS_TOL), name
    assert losses["torch"][1] < losses["torch"][0] - 0.01


def test_same_round_ratios_are_inverse_second_ratios_and_the_summary_their_median_and_spread():
    # Tokens/s of A over B: B's seconds over A's, round by round.
    ratios = pairwise.same_round_ratios([2.0, 4.0, 1.0], [3.0, 4.0, 3.0])
    assert ratios == [1.5, 1.0, 3.0]
    assert pairwise.ratio_summary(ratios) == {"median": 1.5, "min": 1.0, "max": 3.0, "rounds": [1.5, 1.0, 3.0]}
    assert pairwise.ratio_summary([0.8, 1.2])["median"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pairwise.same_round_ratios([1.0], [1.0, 2.0])


def test_vs_plain_table_gives_each_backend_its_speed_up_and_spread():
    def worker(tok_s, first, warm=None):
        return {"tokens_per_s": tok_s, "ms_per_step": 1024e3 / tok_s, "first_step_s": first, "peak_rss_mb": 700.0,
                **({} if warm is None else {"warm_first_step_s": warm})}

    cfg = pairwise.bench_config("default", "tiny", [], "fp32", False, 10)
    report = {"config": cfg.to_dict(), "rounds": 3, "window_steps": 5, "warmup_steps": 2, "pinned_cpu": None,
              "usable_cpus": 2,
              "backends": {"torch": worker(1500, 0.9), "jax": worker(1800, 6.9, 1.5), "plain_torch": worker(1900, 0.8),
                           "plain_jax": worker(1750, 1.2)},
              "speedup_over_plain": {"torch": pairwise.ratio_summary([0.78, 0.8, 0.85]),
                                     "jax": pairwise.ratio_summary([1.0, 1.03, 1.1])},
              "jax_over_torch": 1.2, "jax_over_torch_spread": pairwise.ratio_summary([1.1, 1.2, 1.3])}
    lines = vs_plain.format_vs_plain(report, "GLIBC_TUNABLES=x").splitlines()
    assert lines[0].startswith("config: L4 H4 C128 T128 B8 vocab 50304, 1024 tokens/step, dtype fp32")
    assert lines[1] == "workers on all 2 usable CPUs; allocator: GLIBC_TUNABLES=x"
    assert "| JAX | 1,800 | 568.9 | 6.90 (1.50) | 700 |" in lines
    assert "| plain torch | 1,900 | 538.9 | 0.80 | 700 |" in lines
    assert "| torch | 0.80× | 0.78–0.85 |" in lines and "| JAX | 1.03× | 1.00–1.10 |" in lines
    assert lines[-1] == "JAX / PyTorch tokens/s: 1.20 (median of same-round ratios; spread 1.10–1.30)"
    pinned = vs_plain.format_vs_plain({**report, "pinned_cpu": "0"}, "a").splitlines()
    assert pinned[0].endswith(", pinned to CPU 0") and pinned[1] == "workers pinned to CPU 0 (taskset); allocator: a"


def test_vs_plain_runs_the_four_workers_in_rounds_from_one_init(tiny_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", MAKEFILE_TUNABLES)
    config = tmp_path / "tiny.toml"
    config.write_text(dump_toml(tiny_config(tiny_shards)))
    out = tmp_path / "vs-plain.json"
    assert cli.main(["--vs-plain", "--config", str(config), "--rounds", "2", "--steps", "1", "--warmup", "0",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["backends"]) == ["torch", "jax", "plain_torch", "plain_jax"]
    for name, r in report["backends"].items():
        assert len(r["windows"]) == 2 and r["first_step_s"] > 0 and r["peak_rss_mb"] > 0, name
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, name
        assert len(r["losses"]) == 3, name
        # One init and one loader: every worker's first loss is the same function of the same numbers.
        assert r["losses"][0] == pytest.approx(report["backends"]["torch"]["losses"][0], abs=LOSS_TOL), name
    assert report["backends"]["jax"]["warm_first_step_s"] > 0
    ratios = [report["jax_over_torch"], *report["jax_over_torch_spread"]["rounds"]]
    for b in ("torch", "jax"):
        s = report["speedup_over_plain"][b]
        assert len(s["rounds"]) == 2 and s["min"] <= s["median"] <= s["max"]
        ratios += [s["median"], s["min"], s["max"], *s["rounds"]]
        assert f"| {vs_plain.LABELS[b]} | {s['median']:.2f}× |" in text
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert "JAX / PyTorch tokens/s: " in text and f"allocator: GLIBC_TUNABLES={MAKEFILE_TUNABLES}" in text
