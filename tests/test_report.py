import json
import struct

import pytest

from common import report
from common.report import load_run, main, summarize, write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(step, loss, ms, tokens, elapsed, val=None, backend="torch", **extra):
    rec = {"backend": backend, "step": step, "loss": loss, "lr": 1e-3 * (step + 1) / 6, "grad_norm": 2.0 / (step + 1),
           "ms": ms, "tokens_per_s": 1000 * 1000 / ms, "mfu": 0.1, "tokens": tokens, "elapsed_s": elapsed}
    if val is not None:
        rec["val_loss"] = val
    rec.update(extra)
    return rec


# Six steps of 1,000 tokens; the process restarted (resume) before step 4, so elapsed_s restarts at 0.
TORCH = [record(0, 10.0, 1000, 1000, 1.0), record(1, 8.0, 500, 2000, 1.5), record(2, 6.0, 250, 3000, 1.75, val=6.5),
         record(3, 5.0, 500, 4000, 2.25), record(4, 4.5, 250, 5000, 0.25, val=4.2),
         record(5, 4.4, 250, 6000, 0.5, val=4.3)]
JAX = [record(s, 9.0 - s, 400, 1000 * (s + 1), 0.4 * (s + 1), val=(8.5 - s if s % 2 else None), backend="jax",
              grad_to_weight={"h.0.attn.c_attn.weight": 1e-2 / (s + 1), "h.0.mlp.c_fc.weight": 2e-2 / (s + 1)})
       for s in range(6)]


def write_run(folder, records, extra_lines=()):
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / "exp" / "torch", TORCH), write_run(tmp_path / "exp" / "jax", JAX)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_summary_numbers():
    s = summarize(TORCH, target=4.25)
    assert s["steps"] == 6
    assert (s["min_val_loss"], s["min_val_step"], s["final_val_loss"]) == (4.2, 5, 4.3)
    assert s["final_loss"] == 4.4
    assert s["tokens"] == 6000
    assert s["wall_s"] == pytest.approx(2.25 + 0.5)  # two process segments
    # Steps 2..5: 4,000 tokens in 0.25 + 0.5 + 0.25 + 0.25 s (the plain mean of tokens/s would be 3,500).
    assert s["mean_tokens_per_s"] == pytest.approx(3200.0)
    assert (s["target_step"], s["target_tokens"]) == (5, 5000)
    assert summarize(TORCH, target=4.0)["target_step"] is None
    no_val = summarize([{"step": 0, "loss": 3.0}])
    assert (no_val["min_val_loss"], no_val["mean_tokens_per_s"], no_val["wall_s"]) == (None, None, None)


def test_two_runs_overlaid(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out), "--target", "4.25"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["grad_norm.png", "grad_to_weight.png", "loss.png", "lr.png", "tokens_per_s.png"]
    for name in written:
        assert (out / name).stat().st_size > 10_000
    assert png_size(out / "loss.png") == (1540, 605)  # 14 × 5.5 in at 110 dpi: full run + zoom panel
    assert png_size(out / "lr.png") == (990, 605)
    stdout = capsys.readouterr().out
    assert "torch exp  (" in stdout and "jax exp  (" in stdout  # '<backend> <name>' for runs/<name>/<backend>
    assert "min val loss       4.2000 at step 5" in stdout
    assert "mean tokens/s      3,200" in stdout
    assert "val loss ≤ 4.25    at step 5 (5,000 tokens)" in stdout
    assert "min val loss       3.5000 at step 6" in stdout  # jax: vals 7.5, 5.5, 3.5 at steps 2, 4, 6


def test_labels_single_run_default_out_and_metrics_path(runs, capsys):
    torch_run = runs[0]
    assert main([str(torch_run / "metrics.jsonl"), "--labels", "baseline"]) == 0
    assert "baseline  (" in capsys.readouterr().out
    assert {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"} <= {p.name for p in torch_run.iterdir()}
    assert not (torch_run / "grad_to_weight.png").exists()  # only runs that log it get the plot
    assert load_run(torch_run).label == "torch exp"


def test_missing_run_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: no such run folder or metrics file\n"


def test_folder_without_metrics_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty' / 'metrics.jsonl'}: no metrics.jsonl in this run folder\n"


def test_invalid_json_line_exits_2_naming_the_line(tmp_path, capsys):
    run = write_run(tmp_path / "bad", TORCH[:2], extra_lines=['{"step": 2, "loss": '])
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'metrics.jsonl'}:3: invalid JSON") and err.count("\n") == 1


def test_record_without_loss_exits_2(tmp_path, capsys):
    run = write_run(tmp_path / "bad", TORCH[:1] + [{"step": 1}])
    assert main([str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}:2: missing or non-numeric field(s) loss" in capsys.readouterr().err


def test_label_count_must_match(runs, capsys):
    assert main([str(runs[0]), str(runs[1]), "--labels", "only-one"]) == 2
    assert "--labels: 1 label(s) for 2 run(s)" in capsys.readouterr().err


def test_run_report_into_the_run_folder(runs, capsys):
    lines = []
    paths = write_run_report(runs[1], lines.append)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "grad_to_weight.png"]
    assert all(p.parent == runs[1] and p.stat().st_size > 10_000 for p in paths)
    assert lines == ["report: " + ", ".join(str(p) for p in paths)]
    assert capsys.readouterr().err == ""


def test_run_report_failure_is_a_warning(tmp_path, runs, monkeypatch, capsys):
    lines = []
    assert write_run_report(tmp_path / "nothing", lines.append) == []
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {tmp_path / 'nothing'}: no report written (ReportError: ") and err.count("\n") == 1

    def broken(*args, **kwargs):
        raise RuntimeError("no display backend")

    monkeypatch.setattr(report, "write_plots", broken)
    assert write_run_report(runs[0], lines.append) == []
    assert capsys.readouterr().err == f"warning: {runs[0]}: no report written (RuntimeError: no display backend)\n"
    assert lines == []


def test_trainer_ends_with_the_report(tmp_path, tiny_shards, monkeypatch, capsys):
    from helpers import trainer_args
    from torch_impl.train import main as train_main

    args = trainer_args(tiny_shards, {"model.n_layer": 1, "optim.total_batch_size": 64, "optim.max_steps": 3,
                                      "data.val_tokens": 128})  # 3 steps: throughput leaves out the first 2
    assert train_main(args + ["--run.out_dir", str(tmp_path / "a")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "report: " + ", ".join(str(tmp_path / "a" / f"{k}.png")
                                          for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    assert all((tmp_path / "a" / f"{k}.png").stat().st_size > 10_000 for k in ("loss", "lr", "grad_norm"))

    monkeypatch.setattr(report, "write_plots", lambda *a, **k: 1 / 0)
    assert train_main(args + ["--run.out_dir", str(tmp_path / "b")]) == 0  # a plot failure never fails the run
    assert "no report written (ZeroDivisionError" in capsys.readouterr().err
    assert (tmp_path / "b" / "metrics.jsonl").exists() and not (tmp_path / "b" / "loss.png").exists()

    assert train_main(args + ["--run.out_dir", str(tmp_path / "c"), "--data.order", "foo"]) == 2
    assert capsys.readouterr().err == "error: data.order must be one of shuffled, stream, got 'foo'\n"

    assert train_main(args + ["--run.out_dir", str(tmp_path / "d"), "--run.report", "false"]) == 0
    assert not (tmp_path / "d" / "loss.png").exists() and "report:" not in capsys.readouterr().out
