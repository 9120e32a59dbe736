"""The distill / correct-teacher / train commands: SIGKILL at any step and re-running the same
command reproduces the uninterrupted run bit for bit; bad inputs fail in one line before any
heavy work; teacher correction and plain CE retraining run through the same trainer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_minitron import cli
from megatron_minitron.testing import spawn
from test_distill import distill_models  # noqa: F401 - shared fixture

STEPS = 10


def _command(models, output, *extra):
    root, text = models
    return ["distill", "--teacher", os.path.join(root, "teacher"), "--student",
            os.path.join(root, "student"), "--text-file", text, "--seq-length", "16",
            "--train-tokens", str(STEPS * 4 * 16), "--global-batch-size", "4",
            "--micro-batch-size", "2", "--lr", "2e-3", "--lr-warmup-steps", "2",
            "--ce-weight", "0.5", "--intermediate", "emb,2:1", "--save-interval", "4",
            "--eval-interval", "5", "--output", output, *extra]


def _launch(arguments):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_minitron", *arguments], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def _log(output):
    with open(os.path.join(output, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _wait_for_step(output, step, process, timeout=300):
    path = os.path.join(output, "log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path):
            with open(path) as handle:
                steps = [json.loads(line)["step"] for line in handle if line.endswith("\n")]
            if steps and max(steps) >= step:
                return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {path}")


def test_sigkill_and_rerun_reproduces_losses(distill_models, tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    command = _command(distill_models, killed, "--resume", "auto")
    uninterrupted = _launch(_command(distill_models, reference, "--resume", "auto",
                                     "--keep-optimizer-state"))
    victim = _launch(command)
    _wait_for_step(killed, 6, victim)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole job, mid-run after the step-4 checkpoint
    victim.wait()
    assert not os.path.isdir(os.path.join(killed, "final"))
    _finish(uninterrupted)
    output = _finish(_launch(command))
    assert "resuming at step" in output
    expected, resumed = _log(reference), _log(killed)
    for record in expected + resumed:
        record.pop("seconds", None)
    assert resumed == expected
    assert len([r for r in expected if r["split"] == "train"]) == STEPS
    assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == \
        ["iter_0000008", "iter_0000010", "latest"]  # --keep-optimizer-state
    # by default a finished run keeps only its model; re-running it trains nothing
    assert sorted(os.listdir(killed)) == ["final", "log.jsonl", "run.json"]
    final = os.path.join(killed, "final", "minitron_config.json")
    stamp, log = os.path.getmtime(final), _log(killed)
    output = _finish(_launch(command))
    assert "already trained to step 10" in output
    assert _log(killed) == log and os.path.getmtime(final) == stamp


# ----------------------------------------------------------------------------- bad input


def _error(capsys, arguments):
    code = cli.main(arguments)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def _copy_student(models, tmp_path, name, edit):
    root, _ = models
    target = str(tmp_path / name)
    shutil.copytree(os.path.join(root, "student"), target)
    edit(target)
    return target


def _set_vocab(path, size):
    config = os.path.join(path, "minitron_config.json")
    info = json.load(open(config))
    info["model"]["vocab_size"] = size
    json.dump(info, open(config, "w"))


def _swap_two_tokens(path):
    file = os.path.join(path, "tokenizer", "tokenizer.json")
    data = json.load(open(file))
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    json.dump(data, open(file, "w"))


def _replace(arguments, flag, value):
    arguments = list(arguments)
    arguments[arguments.index(flag) + 1] = value
    return arguments


def test_bad_inputs_fail_in_one_line(distill_models, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    base = _command(distill_models, out)
    student_vocab = _copy_student(distill_models, tmp_path, "vocab", lambda p: _set_vocab(p, 384))
    assert "vocab_size 320 differs from the student's 384" in _error(
        capsys, _replace(base, "--student", student_vocab))
    other_tokens = _copy_student(distill_models, tmp_path, "tok", _swap_two_tokens)
    assert "tokenizer" in _error(capsys, _replace(base, "--student", other_tokens))
    assert "does not divide the world size" in _error(capsys, base + ["--tp", "3"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert "the student: --tensor-model-parallel-size=8 does not divide" in _error(
        capsys, base + ["--tp", "8"])
    assert "not divisible by --micro-batch-size 2 × data parallel size 4" in _error(
        capsys, base + ["--pp", "2"])
    monkeypatch.delenv("WORLD_SIZE")
    assert "--global-batch-size 3 is not divisible" in _error(
        capsys, _replace(base, "--global-batch-size", "3"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "no data" in _error(capsys, _replace(base, "--text-file", str(empty)))
    missing = ["--data-prefix", str(tmp_path / "nothing")]
    assert "has no .idx/.bin" in _error(
        capsys, base[:base.index("--text-file")] + base[base.index("--text-file") + 2:] + missing)
    assert "--teacher is required" in _error(capsys, ["distill"] + base[3:])
    os.makedirs(out)
    json.dump({"identity": {"lr": 1.0}}, open(os.path.join(out, "run.json"), "w"))
    assert "already holds a run" in _error(capsys, base)
    assert "holds another run" in _error(capsys, base + ["--resume", "auto"])
    assert "not a run directory" in _error(
        capsys, _replace(base, "--output", str(tmp_path)) + ["--resume", "auto"])


def test_intermediate_pairs_must_share_a_stage(distill_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = _replace(_command(distill_models, str(tmp_path / "run")), "--intermediate", "3:1")
    message = _error(capsys, base + ["--pp", "2"])
    assert "teacher layer is on stage 1 and the student layer on stage 0" in message


def test_yaml_config_and_flag_precedence(tmp_path):
    from megatron_minitron.commands.distill import build_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.5\nseq-length: 32\ntemperature: 2.0\ntp: 2\n")
    parser = cli.build_parser(only="distill")
    args = parser.parse_args(["distill", "--config", str(yaml_file), "--teacher", "T",
                              "--student", "S", "--lr", "0.25"])
    config = build_config(args)
    assert (config.lr, config.seq_length, config.temperature, config.tp) == (0.25, 32, 2.0, 2)
    help_text = parser._subparsers._group_actions[0].choices["distill"].format_help()
    assert "Softmax temperature of the KL losses" in help_text


# ----------------------------------------------------------------------------- CE training


def _ce_runs(models, corrected, retrained, data_dir):
    """Teacher correction on text; CE retraining on an indexed dataset (mcore's GPTDataset)."""
    from conftest import tiny_text
    from megatron_minitron.data import build_indexed_dataset, load_tokenizer

    root, text = models
    common = ["--seq-length", "16", "--train-tokens", str(8 * 4 * 16), "--global-batch-size",
              "4", "--lr", "3e-3", "--eval-samples", "8"]
    assert cli.main(["correct-teacher", "--load", os.path.join(root, "teacher"), "--output",
                     corrected, "--text-file", text, *common]) == 0
    documents = os.path.join(data_dir, "docs.jsonl")
    with open(documents, "w") as handle:
        for seed in range(60):
            handle.write(json.dumps({"text": tiny_text(60, seed)}) + "\n")
    prefix = os.path.join(data_dir, "docs")
    build_indexed_dataset(documents, load_tokenizer(os.path.join(root, "student")), prefix)
    assert cli.main(["train", "--ce-only", "--load", os.path.join(root, "student"), "--output",
                     retrained, "--data-prefix", prefix, "--split", "90,10,0", *common]) == 0


def test_correct_teacher_and_ce_only_training(distill_models, tmp_path):
    corrected, retrained = str(tmp_path / "teacher2"), str(tmp_path / "student_ce")
    spawn(_ce_runs, 1, distill_models, corrected, retrained, str(tmp_path))
    for run_dir, role, hidden in ((corrected, "correct-teacher", 64), (retrained, "ce", 32)):
        train = [r for r in _log(run_dir) if r["split"] == "train"]
        valid = [r for r in _log(run_dir) if r["split"] == "valid"]
        assert len(train) == 8 and all(r["kd"] == 0 and r["loss"] == r["ce"] for r in train)
        assert valid[-1]["ce"] < train[0]["ce"] - 0.05  # it learned the text
        info = json.load(open(os.path.join(run_dir, "final", "minitron_config.json")))
        assert info["meta"]["trained_by"] == role and info["model"]["hidden_size"] == hidden


@pytest.mark.parametrize("warmup", [0, 3])
def test_first_step_learns(warmup):
    """The warm-up starts one step in: step 0 trains at lr/(W+1), step W reaches the peak."""
    import torch

    from megatron_minitron.distill.config import TrainConfig
    from megatron_minitron.distill.setup import lr_scheduler

    config = TrainConfig(seq_length=8, train_tokens=8 * 2 * 10, global_batch_size=2, lr=1e-3,
                         min_lr=1e-5, lr_warmup_steps=warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = lr_scheduler(optimizer, config)
    rates = []
    for _ in range(config.train_steps()):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate the next step trains at
        scheduler.step(increment=1)
    assert rates[0] == pytest.approx(1e-3 / (warmup + 1)) and rates[0] > 0
    assert rates[warmup] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup + 1]))
