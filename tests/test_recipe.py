"""``minitron run RECIPE.yaml``: one-line validation errors before any stage runs, the dry run,
a real importance → prune → distill → eval chain on a tiny model (outputs, cost report, a re-run
that skips every step) and a two-rank run on one held process group.

    python -m pytest -q tests/test_recipe.py
"""

import json
import os

import pytest
import yaml

from conftest import tiny_text
from megatron_minitron.checkpoint import io
from megatron_minitron.cli import main as cli
from megatron_minitron.config import count_parameters
from megatron_minitron.prune.plan import target_config
from megatron_minitron.testing import save_tiny_checkpoint, spawn

SEQ = 32
TARGET = {"num_layers": 3, "ffn_hidden_size": 64, "num_attention_heads": 2, "num_query_groups": 1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("recipe")
    teacher = str(root / "teacher")
    save_tiny_checkpoint(teacher, tiny_tokenizer_dir, vocab_size=320)
    text = root / "corpus.txt"
    text.write_text(tiny_text(4000, seed=5))
    return root, teacher, str(text)


def _steps(text):
    return [
        {"stage": "importance", "load": "@teacher", "text_file": [text], "num_samples": 8,
         "depth_samples": 4, "plot": False},
        {"stage": "prune", "load": "@teacher", "scores": "@importance", "target": dict(TARGET),
         "depth_metric": "bi", "drop_layers": None},
        {"stage": "distill", "student": "@prune", "teacher": "@teacher", "text_file": [text],
         "train_tokens": 400, "global_batch_size": 4, "lr": 1.0e-3, "min_lr": 1.0e-4},
        {"stage": "eval", "load": "@distill", "text_file": [text], "num_samples": 4},
    ]


def _recipe(path, workdir, teacher, steps, **extra):
    data = {"name": "tiny", "workdir": str(workdir), "teacher": teacher,
            "common": {"seq_length": SEQ, "micro_batch_size": 2}, "steps": steps, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------- validation

def _bad_recipes(text):
    def with_step(index, **changes):
        steps = _steps(text)
        steps[index].update(changes)
        return steps

    later = _steps(text)
    later[0]["load"] = "@distill"
    twice = _steps(text) + [{"stage": "eval", "load": "@distill", "text_file": [text]}]
    return [
        ("missing", None, "does not exist"),
        ("list", "- stage: prune\n", "must be a mapping"),
        ("unknown stage", with_step(1, stage="shrink"), "unknown stage 'shrink'"),
        ("duplicate", twice, "step name 'eval' is used twice"),
        ("later ref", later, "@distill is a later step; move step distill before importance"),
        ("unknown ref", with_step(3, load="@nope"), "@nope names no step"),
        ("not a flag", with_step(1, hidden_size=48), "'hidden_size' is not a flag of minitron "
                                                     "prune"),
        ("output", with_step(1, output="x"), "'output' is set by the runner"),
        ("json", with_step(3, json="x.json"), "'json' is set by the runner"),
        ("bad int", with_step(2, train_tokens="4e5"), "--train-tokens: invalid int value"),
        ("bad choice", with_step(1, depth_metric="cos"), "--depth-metric: invalid choice"),
    ]


@pytest.mark.parametrize("case", range(11), ids=lambda i: _bad_recipes("t")[i][0])
def test_bad_recipe_is_one_line_before_any_stage(case, tmp_path, capsys):
    label, steps, message = _bad_recipes("corpus.txt")[case]
    path = tmp_path / "recipe.yaml"
    workdir = tmp_path / "work"
    if isinstance(steps, str):
        path.write_text(steps)
    elif steps is not None:
        _recipe(path, workdir, str(tmp_path / "teacher"), steps)
    assert cli(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron run: error: "), err
    assert message in err[0], err
    assert not workdir.exists()


STEP_CHECKS = [
    (2, {"train_tokens": -5}, "step distill (minitron distill): --train-tokens -5 must be >= 1"),
    (2, {"lr_warmup_steps": 50}, "--lr-warmup-steps 50 must be below the 4 training steps"),
    (1, {"target": {"hidden_size": 4096}}, "step prune (minitron prune): --target hidden_size=4096 is larger"),
    (3, {"seq_length": 4096}, "step eval (minitron eval): --seq-length 4096 is longer than the "
                              "model's max_position_embeddings"),
]


@pytest.mark.parametrize("index,change,message", STEP_CHECKS,
                         ids=["tokens", "warmup", "target", "positions"])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry_run"])
def test_every_step_is_checked_before_the_first(workspace, tmp_path, capsys, index, change,
                                                message, dry):
    """A bad value in a late step fails at once, with the command's own check (also on a
    model an earlier step will make), before anything runs or is written."""
    root, teacher, text = workspace
    steps = _steps(text)
    steps[index].update(change)
    workdir = tmp_path / "work"
    path = _recipe(tmp_path / "r.yaml", workdir, teacher, steps)
    assert cli(["run", path] + (["--dry-run"] if dry else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not workdir.exists()


# ----------------------------------------------------------------------------- dry run

def test_dry_run_prints_commands_and_planned_cost(workspace, tmp_path, capsys):
    root, teacher, text = workspace
    workdir = tmp_path / "work"
    path = _recipe(tmp_path / "r.yaml", workdir, teacher, _steps(text))
    assert cli(["run", path, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if line.startswith("minitron ")]
    assert commands[0] == (f"minitron importance --seq-length {SEQ} --micro-batch-size 2 --load "
                           f"{teacher} --text-file {text} --num-samples 8 --depth-samples 4 "
                           f"--no-plot --output {workdir}/importance.pt")
    assert f"--student {workdir}/prune --teacher {teacher}" in commands[2]
    assert commands[2].endswith(f"--resume auto --output {workdir}/distill")
    assert commands[3].endswith(f"--load {workdir}/distill/final --text-file {text} "
                                f"--num-samples 4 --json {workdir}/eval.json")
    assert [line for line in out if line.startswith("# step ")][0] == \
        "# step importance (importance): run"
    assert "| distill | distill |" in "\n".join(out) and not workdir.exists()
    workdir.mkdir()  # with its folder present, the planned cost is written
    assert cli(["run", path, "--dry-run", "--from", "prune"]) == 0
    assert "# step importance" not in capsys.readouterr().out
    cost = json.loads((workdir / "cost.json").read_text())
    assert cost["planned"] and sorted(os.listdir(workdir)) == ["cost.json", "cost.md"]
    rows = {row["name"]: row for row in cost["steps"]}
    teacher_n = count_parameters(io.load_config(teacher))["total"]
    student_n = count_parameters(target_config(io.load_config(teacher), TARGET))["total"]
    assert rows["distill"]["params"] == student_n and rows["distill"]["tokens"] == 4 * 4 * SEQ
    assert rows["distill"]["flops"] == (6 * student_n + 2 * teacher_n) * 4 * 4 * SEQ
    steps_table, models_table = [
        {line.split(" | ")[0].strip("| "): line.split(" | ") for line in block.splitlines()
         if line.startswith("| ")}
        for block in (workdir / "cost.md").read_text().split("\n\n")[1:3]]
    assert steps_table["prune"][3] == "–" and steps_table["distill"][3] == f"{teacher_n:,}"
    assert models_table["distill"][4:] == ["–", "– |"]  # no scratch_tokens: nothing to compare
    assert "– = does not apply" in (workdir / "cost.md").read_text()


# ----------------------------------------------------------------------------- real runs

def test_run_chain_then_rerun_skips_everything(workspace, tmp_path, capsys):
    root, teacher, text = workspace
    workdir = tmp_path / "work"
    path = _recipe(tmp_path / "r.yaml", workdir, teacher, _steps(text), scratch_tokens=10**6)
    assert cli(["run", path]) == 0
    first = capsys.readouterr().out
    assert first.count("done in") == 4 and "recipe tiny: 4 step(s) run in " in first
    outputs = [workdir / "importance.pt", workdir / "prune" / "minitron_config.json",
               workdir / "distill" / "final" / "minitron_config.json", workdir / "eval.json"]
    assert all(p.is_file() for p in outputs)
    cost = json.loads((workdir / "cost.json").read_text())
    assert not cost["planned"] and (workdir / "cost.md").is_file()
    rows = {row["name"]: row for row in cost["steps"]}
    teacher_n = count_parameters(io.load_config(teacher))["total"]
    student_n = count_parameters(io.load_config(str(workdir / "prune")))["total"]
    trained = io.read_checkpoint_info(str(workdir / "distill" / "final"))["meta"]["tokens"]
    assert trained == 4 * 4 * SEQ  # ceil(400 / 128) whole steps of 4 × 32 tokens
    importance_tokens = 8 * SEQ + (4 + 1) * 4 * SEQ  # scoring + a forward per layer and BI
    assert rows["importance"]["flops"] == 2 * teacher_n * importance_tokens
    assert rows["prune"]["params"] == student_n and rows["prune"]["flops"] == 0
    assert rows["distill"]["flops"] == (6 * student_n + 2 * teacher_n) * trained
    assert rows["eval"]["flops"] == 2 * student_n * 4 * SEQ
    total = sum(row["flops"] for row in rows.values())
    assert cost["total"]["flops"] == total
    (model,) = cost["models"]
    assert model["name"] == "distill" and model["flops"] == total - rows["eval"]["flops"]
    assert cost["total"]["ratio_models"] == pytest.approx(6 * student_n * 10**6 / total)
    pretrain = 6 * teacher_n * 10**6
    assert cost["total"]["ratio_family"] == pytest.approx(
        (pretrain + 6 * student_n * 10**6) / (pretrain + total))
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    assert cli(["run", path]) == 0
    second = capsys.readouterr().out
    assert second.count("skipped") == 4 and "done in" not in second
    rerun = {row["name"]: row for row in json.loads((workdir / "cost.json").read_text())["steps"]}
    assert [rerun[name].get("seconds") for name in rows] == \
        [row["seconds"] for row in rows.values()]  # the re-run keeps the first run's timings
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes


def _run_recipe(path):
    assert cli(["run", path]) == 0


def test_two_ranks_share_one_process_group(workspace, tmp_path):
    root, teacher, text = workspace
    workdir = tmp_path / "work"
    steps = [dict(_steps(text)[0], depth=False), _steps(text)[1],
             {"stage": "eval", "load": "@prune", "text_file": [text], "num_samples": 4}]
    path = _recipe(tmp_path / "r.yaml", workdir, teacher, steps)
    spawn(_run_recipe, 2, path)  # importance (DP=2) → prune on rank 0 → eval (DP=2)
    assert io.load_config(str(workdir / "prune")).num_layers == 3
    result = json.loads((workdir / "eval.json").read_text())
    assert result["layout"] == "TP=1 PP=1 DP=2" and result["samples"] == 4
    assert (workdir / "cost.json").is_file()
