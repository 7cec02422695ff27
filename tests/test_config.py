import dataclasses

import pytest

from common.config import Config, ConfigError, grad_accum_steps, model_shape_diff, validate

from common.config_files import (CONFIG_DIR, apply_overrides, config_from_dict, load_toml, parse_args,

                                 resolve_config_path)
from common.plan import flops_per_token, main as plan_main, make_plan, num_params


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_toml(path)
    validate(cfg)


def test_gpt2_124m_preset_matches_build_nanogpt():
    cfg = load_toml(resolve_config_path("gpt2-124m"))
    m, o = cfg.model, cfg.optim
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.padded_vocab_size) == (12, 12, 768, 1024, 50304)
    assert (o.total_batch_size, o.max_lr, o.min_lr, o.warmup_steps, o.max_steps) == (524288, 6e-4, 6e-5, 715, 19073)
    assert (o.weight_decay, o.betas, o.eps, o.grad_clip) == (0.1, (0.9, 0.95), 1e-8, 1.0)
    assert grad_accum_steps(cfg, world_size=8) == 1 and grad_accum_steps(cfg, world_size=1) == 8


def test_dotted_overrides_set_typed_values():
    cfg = apply_overrides(Config(), ["--model.n_layer", "6", "--optim.max_lr=3e-4", "--run.compile",
                                     "--optim.betas", "0.8,0.99", "--run.dtype", "bf16"])
    assert cfg.model.n_layer == 6 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.max_lr == 3e-4 and cfg.run.compile is True
    assert cfg.optim.betas == (0.8, 0.99) and cfg.run.dtype == "bf16"


def test_parse_args_reads_preset_then_overrides_and_resume():
    args = parse_args(["--config", "gpt2-124m", "--model.n_layer", "2", "--resume"], "prog", "desc")
    assert args.config.model.n_layer == 2 and args.config.model.n_embd == 768
    assert args.resume == "latest"
    args = parse_args(["--resume", "runs/x/checkpoints/step_00000010"], "prog", "desc")
    assert args.resume == "runs/x/checkpoints/step_00000010" and args.config.model.n_layer == 4


@pytest.mark.parametrize("argv, message", [
    (["--model.n_layers", "6"], "unknown key 'model.n_layers'"),
    (["--modle.n_layer", "6"], "unknown section 'modle'"),
    (["--model.n_layer", "six"], "--model.n_layer: cannot read 'six' as int"),
    (["--model.n_layer"], "--model.n_layer: missing value"),
    (["stray"], "unrecognized argument 'stray'"),
])
def test_bad_overrides_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(Config(), argv)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\nn_layers = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'model.n_layers'"):
        load_toml(p)


def test_a_config_file_that_is_not_utf8_text_or_not_a_file_is_named(tmp_path):
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe[model]\n")
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'binary.toml'}: not a TOML file"):
        load_toml(tmp_path / "binary.toml")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'folder.toml'}: cannot read the config: Is a directory"):
        load_toml(tmp_path / "folder.toml")


def test_missing_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="no preset 'gpt9'.*default"):
        resolve_config_path("gpt9")


@pytest.mark.parametrize("changes, world, message", [
    ({"model": {"n_embd": 130, "n_head": 4}}, 1, r"n_embd \(130\) is not divisible by model.n_head \(4\)"),
    ({"optim": {"total_batch_size": 4000}}, 1, r"total_batch_size \(4000\) is not divisible"),
    ({}, 3, r"world size \(16 × 128 × 3 = 6144\)"),
    ({"model": {"padded_vocab_size": 100}}, 1, r"padded_vocab_size \(100\) is smaller"),
    ({"optim": {"warmup_steps": 500}}, 1, r"warmup_steps \(500\)"),
    ({"run": {"dtype": "fp8"}}, 1, "run.dtype must be one of"),
    ({"run": {"dtype": "fp16", "parallel": "fsdp"}}, 2, "run.dtype fp16 with run.parallel fsdp"),
    ({"optim": {"eps": 0.0}}, 1, r"optim.eps must be > 0, got 0.0"),
    ({"optim": {"weight_decay": -0.1}}, 1, r"optim.weight_decay must be ≥ 0"),
    ({"optim": {"grad_clip": -1.0}}, 1, r"optim.grad_clip must be ≥ 0"),
    ({"run": {"seed": -1}}, 1, r"run.seed must be in \[0, 2\*\*32\), got -1"),
    ({"run": {"seed": 2**32}}, 1, r"run.seed must be in \[0, 2\*\*32\)"),
    ({"run": {"out_dir": " "}}, 1, "run.out_dir is empty"),
    ({"run": {"peak_tflops": -5.0}}, 1, r"run.peak_tflops must be ≥ 0"),
])
def test_validation_messages(changes, world, message):
    cfg = load_toml(resolve_config_path("default"))
    for section, fields in changes.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_fp16_is_refused_only_where_parameters_are_sharded():
    """A loss scaler skips a step on any non-finite shard gradient; sharded ranks would each decide alone."""
    cfg = load_toml(resolve_config_path("default"))
    fp16 = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype="fp16"))
    for parallel, world in (("ddp", 2), ("fsdp", 1)):
        validate(dataclasses.replace(fp16, run=dataclasses.replace(fp16.run, parallel=parallel)), world)
    with pytest.raises(ConfigError, match="fp16 with run.parallel fsdp"):
        validate(dataclasses.replace(fp16, run=dataclasses.replace(fp16.run, parallel="fsdp", fsdp_size=2)), 2)


def test_config_dict_round_trip_and_shape_diff():
    cfg = apply_overrides(Config(), ["--model.n_layer", "3", "--optim.betas", "0.5,0.6"])
    assert config_from_dict(cfg.to_dict()) == cfg
    other = apply_overrides(cfg, ["--model.n_embd", "64", "--optim.max_steps", "7"])
    assert model_shape_diff(cfg.model, other.model) == ["model.n_embd"]


def test_plan_figures_for_124m():
    cfg = load_toml(resolve_config_path("gpt2-124m"))
    # 124,439,808 is GPT-2 small with 50257 rows; padding to 50304 adds 47 × 768.
    assert num_params(cfg.model) == 124_439_808 + 47 * 768
    n = num_params(cfg.model, include_wpe=False)
    assert flops_per_token(cfg.model) == 6 * n + 12 * 12 * 768 * 1024
    plan = make_plan(cfg, world_size=8)
    assert plan.grad_accum == 1 and plan.chinchilla_tokens == 20 * num_params(cfg.model)


def test_plan_cli(capsys):
    assert plan_main(["--config", "gpt2-124m", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "124.48M" in out and "8 replicas × 1 accumulation steps" in out and "meets" in out
    assert plan_main(["--model.n_head", "3"]) == 2
    assert "not divisible by model.n_head (3)" in capsys.readouterr().err


def test_dump_toml_round_trips(tmp_path):
    cfg = apply_overrides(load_toml(resolve_config_path("gpt2-124m")),
                          ["--run.sample_prompt", 'say "hi"\n', "--optim.betas", "0.8,0.9"])
    path = tmp_path / "c.toml"
    from common.config_files import dump_toml
    path.write_text(dump_toml(cfg))
    assert load_toml(path) == cfg


def test_loss_chunk_rows_is_a_compute_choice_not_a_shape():
    cfg = Config()
    other = apply_overrides(cfg, ["--run.loss_chunk_rows", "0"])
    assert other.run.loss_chunk_rows == 0 and model_shape_diff(cfg.model, other.model) == []
    assert validate(apply_overrides(cfg, ["--run.loss_chunk_rows", "-1"])).run.loss_chunk_rows == -1  # the machine's
    with pytest.raises(ConfigError, match="run.loss_chunk_rows must be ≥ 0"):
        validate(apply_overrides(cfg, ["--run.loss_chunk_rows", "-2"]))
    # A checkpoint written when the field was model.loss_chunk_rows reads it into run.loss_chunk_rows.
    old = {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "loss_chunk_rows": 256}}
    old["run"] = {k: v for k, v in old["run"].items() if k != "loss_chunk_rows"}
    assert config_from_dict(old).run.loss_chunk_rows == 256


def test_docs_config_md_is_generated_from_the_schema():
    """docs/config.md is `python -m common.config_doc`'s output; every field has a meaning there."""
    from common import config_doc

    with open(CONFIG_DIR.parent / config_doc.DOC_PATH, encoding="utf-8") as f:
        assert f.read() == config_doc.render(), "docs/config.md is stale: python -m common.config_doc > docs/config.md"
    comments = config_doc.field_comments()
    fields = {f"{s}.{k}" for s, table in Config().to_dict().items() for k in table}
    assert set(comments) == fields and all(comments.values()), sorted(k for k in fields if not comments.get(k))


def test_the_default_preset_is_the_schema_defaults():
    """One source of defaults: `--config default` and a config file that sets nothing give the same run."""
    assert load_toml(resolve_config_path("default")) == Config()
    assert (Config().optim.total_batch_size, Config().optim.max_steps, Config().run.log_interval) == (4096, 150, 10)
