"""The before/after report (table values are the checkpoints' and results files' own numbers;
plots written) and the progress bars (off under a pipe, forced on without changing what stdout
says).

    python -m pytest -q tests/test_report.py
"""

import json
import os

import pytest
import yaml

from conftest import tiny_text
from megatron_minitron import adapter, parallel, progress, report
from megatron_minitron.checkpoint import io
from megatron_minitron.cli import main as cli
from megatron_minitron.config import count_parameters
from megatron_minitron.recipe import load_recipe
from megatron_minitron.testing import tiny_config

SEQ = 32
TARGET = {"ffn_hidden_size": 64, "num_attention_heads": 2, "num_query_groups": 1}


def _save(path, cfg, tokenizer_dir):
    with parallel.parallel_context(1, 1):
        io.save_checkpoint(adapter.build_gpt_model(cfg), cfg, str(path),
                           tokenizer_from=tokenizer_dir)


def _recipe(path, workdir, teacher, steps):
    data = {"name": "tiny", "workdir": str(workdir), "teacher": str(teacher),
            "common": {"seq_length": SEQ, "micro_batch_size": 2}, "steps": steps}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _eval(name, load, text):
    return {"stage": "eval", "name": name, "load": load, "text_file": [text], "num_samples": 4}


def _steps(text):
    return [
        {"stage": "importance", "load": "@teacher", "text_file": [text], "num_samples": 8,
         "depth": False},
        {"stage": "prune", "load": "@teacher", "scores": "@importance", "target": dict(TARGET)},
        _eval("eval_teacher", "@teacher", text),
        _eval("eval_pruned", "@prune", text),
        {"stage": "distill", "student": "@prune", "teacher": "@teacher", "text_file": [text],
         "train_tokens": 3 * 4 * SEQ, "global_batch_size": 4, "lr": 1.0e-3,
         "eval_interval": 2, "eval_samples": 4},
        _eval("eval_distilled", "@distill", text),
    ]


@pytest.fixture
def finished(tmp_path, tiny_tokenizer_dir):
    """A finished recipe's outputs, written by hand: checkpoints, results, log, cost."""
    work = tmp_path / "work"
    teacher_cfg = tiny_config(vocab_size=320)
    student_cfg = teacher_cfg.replace(**TARGET)
    _save(work / "teacher", teacher_cfg, tiny_tokenizer_dir)
    _save(work / "prune", student_cfg, tiny_tokenizer_dir)
    _save(work / "distill" / "final", student_cfg, tiny_tokenizer_dir)
    results = {"eval_teacher": (2.5, {"piqa": 0.7, "arc_easy": 0.5}),
               "eval_pruned": (6.25, {"piqa": 0.5, "arc_easy": 0.25}),
               "eval_distilled": (3.75, {"piqa": 0.6, "arc_easy": 0.375})}
    for name, (loss, tasks) in results.items():
        body = {"loss": loss, "ppl": 2.0 ** loss, "tokens": 124, "samples": 4, "seq_length": SEQ,
                "tasks": {task: {"acc": acc, "acc_stderr": 0.05, "items": 8,
                                 "chance": 0.5 if task == "piqa" else 0.25,
                                 "split": "validation"}
                          for task, acc in tasks.items()}, "limit": 8}
        (work / f"{name}.json").write_text(json.dumps(body))
    records = [{"split": "train", "step": s, "loss": 4.0 / s, "ce": 5.0 / s, "tokens": 128}
               for s in (1, 2, 3)] + [{"split": "valid", "step": 2, "loss": 2.5, "ce": 3.0,
                                       "tokens": 128}]
    (work / "distill" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                                + '{"cut sho')
    (work / "importance.png").write_bytes(b"\x89PNG")
    cost = {"total": {"tokens": 1234, "flops": 5.0e9},
            "steps": [{"name": "distill", "seconds": 12.5}, {"name": "prune", "seconds": None}]}
    (work / "cost.json").write_text(json.dumps(cost))
    path = _recipe(tmp_path / "r.yaml", work, work / "teacher", _steps("corpus.txt"))
    return path, work, results


def test_table_holds_the_inputs_and_plots_are_written(finished, capsys):
    path, work, results = finished
    os.symlink(path, work / "recipe.yaml")
    assert report.main([str(work)]) == 0  # a WORKDIR holding recipe.yaml
    printed = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert (work / "summary.md").read_text().strip() == summary["table"] and \
        summary["table"] in printed
    rows = {row["step"]: row for row in summary["models"]}
    assert [row["name"] for row in summary["models"]] == ["teacher", "pruned", "distilled"]
    for name, folder in (("eval_teacher", "teacher"), ("eval_pruned", "prune"),
                         ("eval_distilled", "distill/final")):
        loss, tasks = results[name]
        params = count_parameters(io.load_config(str(work / folder)))["total"]
        row = rows[name]
        assert row["params"] == params and row["loss"] == loss and row["ppl"] == 2.0 ** loss
        assert row["tasks"] == tasks
        mean = sum(tasks.values()) / len(tasks)
        assert (f"| {row['name']} | {params:,} | {loss:.4f} | {2.0 ** loss:.2f} | "
                f"{tasks['piqa']:.3f} ± 0.050 | {tasks['arc_easy']:.3f} ± 0.050 | "
                f"{mean:.3f} |") in summary["table"]
    assert "8 piqa (chance 0.50), 8 arc_easy (chance 0.25) items; ± one standard error" in \
        summary["table"]
    assert rows["eval_pruned"]["params"] < rows["eval_teacher"]["params"]
    assert "cost: 1,234 tokens trained or forwarded, 5.000e+09 FLOPs" in summary["table"]
    assert "time: distill 12 s" in summary["table"]
    names = sorted(os.path.basename(p) for p in summary["plots"])
    assert names == ["distill_loss.png", "importance.png", "metrics.png"]
    for name in ("distill_loss.png", "metrics.png"):
        assert (work / name).read_bytes()[:4] == b"\x89PNG" and (work / name).stat().st_size > 5000


def test_log_tokens_are_cumulative(finished):
    _, work, _ = finished
    log = report.read_log(str(work / "distill" / "log.jsonl"))
    assert [r["tokens_seen"] for r in log["train"]] == [128, 256, 384]
    assert [r["tokens_seen"] for r in log["valid"]] == [256]


def test_report_before_any_eval_is_one_line(tmp_path, capsys):
    path = _recipe(tmp_path / "r.yaml", tmp_path / "work", tmp_path / "teacher",
                   _steps("corpus.txt"))
    assert report.main([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no eval step has results" in err[0]


# ----------------------------------------------------------------------------- progress bars

@pytest.mark.parametrize("setting,shown", [(None, False), ("0", False), ("1", True)])
def test_bar_setting(setting, shown, monkeypatch):
    if setting is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, setting)
    assert progress.enabled() is shown  # pytest's stderr is no terminal
    with progress.bar(total=3, desc="x") as bar:
        assert bar.disable is not shown


def test_forced_bars_leave_stdout_lines_whole(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    with progress.bar(total=2, desc="outer", leave=True) as outer:
        with progress.lines_above_bars(True):
            print("first line")
            progress.write("second line")
            outer.update()
        progress.write("third line")
        outer.update()
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["first line", "second line", "third line"]
    assert "outer" in captured.err and "2/2" in captured.err


def test_recipe_with_forced_bars_then_report(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    """A whole tiny recipe with every bar on: stdout says what it says without bars; the bars
    (recipe, importance, lm loss, distill) are on stderr; the report reads its outputs."""
    teacher = tmp_path / "teacher"
    _save(teacher, tiny_config(vocab_size=320), tiny_tokenizer_dir)
    text = tmp_path / "corpus.txt"
    text.write_text(tiny_text(4000, seed=5))
    path = _recipe(tmp_path / "r.yaml", tmp_path / "work", teacher, _steps(str(text)))
    monkeypatch.setenv(progress.ENV, "1")
    assert cli(["run", path]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert sum(line.startswith("== step ") and "done in" in line for line in out) == 6
    assert [line for line in out if line.startswith("step ")][-1].startswith("step 3/3 | loss")
    assert not any("\r" in line or "it/s" in line or "batch/s" in line for line in out)
    for label in ("recipe tiny [6/6 eval_distilled]", "importance", "lm loss", "distill"):
        assert label in captured.err, label
    summary = report.write_report(load_recipe(path))
    eval_distilled = json.loads((tmp_path / "work" / "eval_distilled.json").read_text())
    distilled = summary["models"][-1]
    assert distilled["loss"] == eval_distilled["loss"] and distilled["params"] == \
        count_parameters(io.load_config(str(tmp_path / "work" / "distill" / "final")))["total"]
    log = report.read_log(str(tmp_path / "work" / "distill" / "log.jsonl"))
    assert [r["tokens_seen"] for r in log["train"]] == [128, 256, 384]
    assert os.path.isfile(tmp_path / "work" / "distill_loss.png")


def test_importance_plot_has_keys_and_readable_layer_bars(tmp_path):
    import matplotlib.pyplot as plt

    from megatron_minitron.importance import random_scores
    from megatron_minitron.importance.plot import plot_scores, scores_figure
    from megatron_minitron.testing import tiny_config

    scores = random_scores(tiny_config(), seed=1)
    scores["layer_bi"][0] = 1.0  # the first layer dwarfs the rest, as in real models
    scores["layer_bi"][1:] = 0.01
    fig = scores_figure(scores)
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert {"head score", "layer"} <= labels  # colour bars say what the colour means
    (bi_axis,) = [ax for ax in fig.axes if ax.get_title() == "layer importance"]
    assert bi_axis.get_yscale() == "log"
    plt.close(fig)
    plot_scores(scores, str(tmp_path / "scores.png"))
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"
