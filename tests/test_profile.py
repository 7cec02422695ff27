"""parity.profile: reading XLA's per-HLO-op trace (xplane self times, HLO text) and the top-ops table."""
from __future__ import annotations

from types import SimpleNamespace

from conftest import tiny_config
from parity import profile


def event(start: int, duration: int, op: str | None, module: str = "jit__train_step") -> SimpleNamespace:
    stats = [("hlo_op", op), ("hlo_module", module)] if op else [("_src", "threadpool_listener.cc")]
    return SimpleNamespace(start_ns=start, duration_ns=duration, name=op or "ThreadpoolListener::Record", stats=stats)


def test_xplane_events_count_by_self_time():
    # while.1 [0, 100) holds fusion.1 [10, 40) and dot.2 [50, 90), which holds copy.3 [60, 70); a marker and
    # an event after the loop.
    events = [event(50, 40, "dot.2"), event(0, 100, "while.1"), event(10, 30, "fusion.1"), event(60, 10, "copy.3"),
              event(20, 0, None), event(120, 5, "fusion.1")]
    got = sorted(profile.xplane_self_times(events))
    assert got == sorted([("jit__train_step", "while.1", 30), ("jit__train_step", "fusion.1", 30),
                          ("jit__train_step", "dot.2", 30), ("jit__train_step", "copy.3", 10),
                          ("jit__train_step", "fusion.1", 5)])


HLO = """HloModule jit__train_step

%fused_computation.2 (param_0.4: f32[128,128], param_1.4: f32[50257,128]) -> f32[128,50257] {
  %param_0.4 = f32[128,128]{1,0} parameter(0)
  %param_1.4 = f32[50257,128]{1,0} parameter(1)
  %dot.1 = f32[128,50257]{1,0} dot(%param_0.4, %param_1.4), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %reduce.2 = f32[128]{0} reduce(%dot.1, %c), dimensions={1}, to_apply=%region_14.25
}

%wrapped_broadcast_computation (param_0.9: f32[]) -> f32[50257,128] {
  %param_0.9 = f32[] parameter(0)
  ROOT %broadcast.3 = f32[50257,128]{1,0} broadcast(%param_0.9), dimensions={}, metadata={op_name="jit(_train_step)/while/body/closed_call/jvp(GPT.loss)/broadcast_in_dim"}
}

ENTRY %main.3 (x.1: f32[128,128], w: f32[50257,128]) -> (f32[128], s32[]) {
  %ynn_fusion.2 = f32[128,50257]{1,0} fusion(%x.1, %w), kind=kCustom, calls=%fused_computation.2, metadata={op_name="jit(_train_step)/while/body/closed_call/jvp(GPT.loss)/while/body/closed_call/jit(log_softmax)/reduce_max" stack_frame_id=305}
  %while.25 = (s32[], f32[50257,128]{1,0}) while(%tuple.32), condition=%c, body=%b, metadata={op_name="jit(_train_step)/while"}
  %wrapped_broadcast = f32[50257,128]{1,0} fusion(%c), kind=kLoop, calls=%wrapped_broadcast_computation
  ROOT %copy.7 = f32[128,128]{1,0} copy(%x.1), metadata={op_name="jit(_train_step)/transpose(jvp(GPT.loss))/GPT.features/while/body/closed_call/h/h/ln_2/mul"}
}
"""


def test_hlo_instructions_are_described_for_the_jax_table():
    hlo = profile.parse_hlo(HLO)
    assert profile.describe("ynn_fusion.2", hlo) == (
        "f32[128,50257] fusion[dot,reduce] · GPT.loss/log_softmax/reduce_max")
    assert profile.describe("copy.7", hlo) == "f32[128,128] copy · bwd GPT.loss/h/ln_2/mul"
    # A fusion without metadata of its own: the contents are its only op, the path is its root's.
    assert profile.describe("wrapped_broadcast", hlo) == (
        "f32[50257,128] fusion[broadcast] · GPT.loss/broadcast_in_dim")
    assert hlo.instructions["while.25"]["type"] == "tuple" and hlo.instructions["while.25"]["opcode"] == "while"
    assert [profile.op_kind(op, hlo) for op in ("ynn_fusion.2", "while.25", "copy.7", "wrapped_broadcast")] == [
        "dot", "control flow", "copy/layout", "elementwise"]
    assert profile.describe("missing.1", hlo) == "" and profile.op_kind("missing.1", hlo) == "other"


def test_profile_table_lists_the_top_ops_against_the_step_time():
    result = {"backend": "jax", "source": "src", "steps": 2, "warmup": 2, "step_ms": 200.0,
              "ops": [{"name": "ynn_fusion.2", "ms_per_step": 50.0, "calls_per_step": 8, "detail": "f32[1] dot"},
                      {"name": "copy.7", "ms_per_step": 10.0, "calls_per_step": 1, "detail": ""}],
              "kinds": {"dot": 50.0, "copy/layout": 10.0, "other": 0.1}}
    text = profile.format_profile(result, top=1)
    assert "| ynn_fusion.2 | 50.00 | 25.0% | 8 | f32[1] dot |" in text and "copy.7" not in text
    assert "all ops sum to 60.0 ms/step (30% of the step" in text
    assert text.splitlines()[-1] == "by kind: dot 25%, copy/layout 5%"


def test_bad_profile_flags_are_one_line_and_exit_2(capsys):
    assert profile.main(["--backends", "torch,tf"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --backends: expected a subset of torch,jax,plain_torch,plain_jax, got 'torch,tf'\n"


def test_profile_runs_both_backends_and_the_plain_baselines_and_names_each_programs_ops(tiny_shards):
    cfg = tiny_config(tiny_shards)
    results = profile.profile_config(cfg, ("jax", "plain_jax", "torch", "plain_torch"), steps=1, warmup=0)
    assert list(results) == ["jax", "plain_jax", "torch", "plain_torch"]
    for name, r in results.items():
        assert r["backend"] == name and r["step_ms"] > 0 and r["ops"], name
        # Self times on two CPUs at most: counting nested events in full would add up past that. (At this
        # size dispatch, not the ops, is most of a step, so there is no useful lower bound.)
        assert 0 < sum(o["ms_per_step"] for o in r["ops"]) < 2.5 * r["step_ms"], name
    # Each JAX table is described from its own program's HLO: our model's op paths (the chunked loss, the
    # layer stack) in ours, the plain model's per-layer modules in the baseline's.
    ours = " ".join(o["detail"] for o in results["jax"]["ops"])
    plain = " ".join(o["detail"] for o in results["plain_jax"]["ops"])
    assert "GPT.loss" in ours and "h/mlp/" in ours and "GPT/h_1/" not in ours
    assert "GPT/h_1/" in plain and "GPT.loss" not in plain
    for name in ("torch", "plain_torch"):
        assert any(o["name"].startswith("aten::") for o in results[name]["ops"]), name
