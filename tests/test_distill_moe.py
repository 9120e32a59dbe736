"""Distillation with mixture-of-experts students and teachers: expert parallel runs (EP=2, and
PP=2×EP=2) follow the single-rank run step by step, the student's router load-balancing loss is
logged beside the KD loss (and only when its coefficient is > 0), its gradient is mcore's
scaled exactly as Megatron-LM scales it, dense students learn from MoE teachers and MoE students
from dense teachers, and bad layouts fail in one line before any heavy work."""

import json
import os
import shutil

import pytest
import torch

from conftest import tiny_text
from megatron_minitron import parallel
from megatron_minitron.errors import UsageError
from megatron_minitron.testing import spawn, tiny_config, tiny_moe_config

STEPS = 3
COEFF = 0.1  # the student's moe_aux_loss_coeff: large enough to move the losses visibly
CLIP = 0.03  # below every step's gradient norm: clipping scales each step
MODELS = {  # name: (config, seed); the tiny tokenizer has 300 tokens
    "moe_teacher": (dict(moe=True, vocab_size=320, moe_aux_loss_coeff=0.01), 1),
    "moe_student": (dict(moe=True, vocab_size=320, hidden_size=32, ffn_hidden_size=48,
                         moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=24,
                         moe_aux_loss_coeff=COEFF), 2),
    "dense_teacher": (dict(vocab_size=320), 3),
    "dense_student": (dict(vocab_size=320, num_layers=2, hidden_size=32, ffn_hidden_size=64), 4),
}


def _config(name, **overrides):
    values, _ = MODELS[name]
    values = dict(values, **overrides)
    return (tiny_moe_config if values.pop("moe", False) else tiny_config)(**values)


def _make_models(root, tokenizer):
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint.io import save_checkpoint

    for name, (_, seed) in MODELS.items():
        parallel.initialize(1, 1, seed=seed)
        cfg = _config(name)
        model = adapter.build_gpt_model(cfg)
        save_checkpoint(model, cfg, os.path.join(root, name), tokenizer_from=tokenizer)
        if name == "moe_student":  # the same weights without a load-balancing loss
            save_checkpoint(model, _config(name, moe_aux_loss_coeff=0.0),
                            os.path.join(root, "moe_student_no_aux"), tokenizer_from=tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("moe_models")
    text = root / "text.txt"
    text.write_text(tiny_text(3000, seed=11))
    spawn(_make_models, 1, str(root), tiny_tokenizer_dir)
    return str(root), str(text)


def train_config(models, output, teacher="moe_teacher", student="moe_student", **overrides):
    from megatron_minitron.distill.config import TrainConfig

    root, text = models
    values = dict(teacher=os.path.join(root, teacher), student=os.path.join(root, student),
                  output=output, text_file=[text], seq_length=16, train_tokens=STEPS * 4 * 16,
                  global_batch_size=4, micro_batch_size=1, lr=5e-3, lr_warmup_steps=1,
                  clip_grad=CLIP)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(output, split="train"):
    with open(os.path.join(output, "log.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["split"] == split]


def _run(models, output, **overrides):
    from megatron_minitron.distill.trainer import Trainer

    Trainer(train_config(models, output, **overrides)).run()


RUNS = {  # name: (world size, trainer overrides)
    "reference": (1, {}),
    "dense_from_moe": (1, dict(student="dense_student")),
    "moe_from_dense": (1, dict(teacher="dense_teacher", student="moe_student_no_aux")),
    "ep2": (2, dict(ep=2, save_interval=2, keep_optimizer_state=True)),
    "dense_from_moe_tp2": (2, dict(student="dense_student", tp=2)),
    "moe_from_dense_dp2": (2, dict(teacher="dense_teacher", student="moe_student_no_aux")),
    "pp2ep2": (4, dict(pp=2, ep=2)),
    "dp4ep2": (4, dict(ep=2)),  # expert data parallel size 2: expert gradients are reduced
}


def _runs(models, root, names):
    for name in names:
        _run(models, os.path.join(root, name), **RUNS[name][1])


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe_runs"))
    for world in (1, 2, 4):
        spawn(_runs, world, models, root, [n for n, (w, _) in RUNS.items() if w == world])
    return {name: os.path.join(root, name) for name in RUNS}


def _assert_same_steps(logs, reference, rtol=1e-4):
    assert [r["step"] for r in logs] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for ours, expected in zip(logs, reference):
        for key in ("loss", "kd", "moe_aux_loss", "grad_norm"):
            if key in expected:
                assert ours[key] == pytest.approx(expected[key], rel=rtol), (ours["step"], key)


@pytest.mark.parametrize("layout", ["ep2", "pp2ep2", "dp4ep2"])
def test_expert_parallel_runs_follow_the_single_rank_run(runs, layout):
    """Same global batch: losses, load-balancing loss and gradient norm (so the clipping and
    the optimizer saw every expert's gradient once) agree with the one-rank run at each step."""
    reference = read_log(runs["reference"])
    assert reference[-1]["kd"] < reference[0]["kd"]
    assert all(r["moe_aux_loss"] > 0 for r in reference)
    assert all(r["grad_norm"] > CLIP for r in reference)  # clipping is at work
    _assert_same_steps(read_log(runs[layout]), reference)


def _resume(models, output):
    _run(models, output, resume="auto")


def test_expert_parallel_checkpoint_resumes_at_one_rank(runs, models, tmp_path):
    """Saved at EP=2 (experts and their Adam state split over two ranks, distributed optimizer)
    after step 2, resumed on one rank: step 3 follows the uninterrupted run."""
    output = str(tmp_path / "resumed")
    shutil.copytree(runs["ep2"], output)
    for drop in (f"checkpoints/iter_{STEPS:07d}", "final", "checkpoints/latest"):
        path = os.path.join(output, drop)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    spawn(_resume, 1, models, output)
    logs = read_log(output)
    _assert_same_steps(logs, read_log(runs["ep2"]))
    _assert_same_steps(logs, read_log(runs["reference"]))


def test_load_balancing_loss_is_logged_only_with_a_coefficient(runs):
    for record in read_log(runs["reference"]):
        # coeff × (mean of an aux loss that is >= 1 per layer) × 3 MoE layers, roughly
        assert COEFF * 3 * 0.9 < record["moe_aux_loss"] < COEFF * 3 * 2, record
    for name in ("moe_from_dense", "moe_from_dense_dp2", "dense_from_moe", "dense_from_moe_tp2"):
        assert all("moe_aux_loss" not in r for r in read_log(runs[name])), name


@pytest.mark.parametrize("name, layout", [("dense_from_moe", "tp2"), ("moe_from_dense", "dp2")])
def test_dense_and_moe_models_distill_from_each_other(runs, name, layout):
    """A dense student learns from a MoE teacher (whose routers add nothing: no load-balancing
    loss is logged) and a MoE student from a dense teacher, at one rank and at TP=2 / DP=2."""
    reference = read_log(runs[name])
    assert reference[-1]["kd"] < reference[0]["kd"]
    _assert_same_steps(read_log(runs[f"{name}_{layout}"]), reference)


# ------------------------------------------------------------ the load-balancing loss's gradient


def _router_grads(models, output, student):
    """The student's router gradients after one step's schedule (mcore's finalize included),
    the step's micro-batches, and the MoE loss scale the schedule set."""
    from megatron_minitron import adapter
    from megatron_minitron.distill.trainer import Trainer

    trainer = Trainer(train_config(models, output, student=student))
    trainer.setup()
    run = trainer.run_state
    batches = run.next_batches()
    run.ddp_model.zero_grad_buffer()
    trainer.run_schedule(batches, forward_only=False)
    grads = {layer.layer_number: adapter.moe_router(layer).weight.main_grad.clone()
             for layer in adapter.decoder_layers(run.student) if adapter.is_moe_layer(layer)}
    # the MoE teacher is frozen and its routers carry no load-balancing loss
    assert all(not p.requires_grad for p in run.teacher.parameters())
    assert run.teacher.config.moe_aux_loss_coeff == 0
    scale = adapter.moe_aux_loss_scale().clone()
    assert torch.equal(scale.reshape(-1), run.optimizer.get_loss_scale().reshape(-1).cpu())
    return grads, batches


def _aux_gradient(models, root, result):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_minitron import adapter
    from megatron_minitron.checkpoint import io
    from megatron_minitron.model.forward import position_ids_for

    with_aux, batches = _router_grads(models, os.path.join(root, "with"), "moe_student")
    without, again = _router_grads(models, os.path.join(root, "without"), "moe_student_no_aux")
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
    # reference: mcore's routers outside the trainer, loss-free forwards whose backward carries
    # only the load-balancing loss, each micro-batch's weighted 1/M (Megatron-LM's target)
    model, _ = io.load_checkpoint(os.path.join(models[0], "moe_student"))
    model.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(batches)))
    for batch in batches:
        tokens = batch["tokens"]
        (model(tokens, position_ids_for(tokens), None).sum() * 0).backward()
    reference = {layer.layer_number: adapter.moe_router(layer).weight.grad
                 for layer in adapter.decoder_layers(model) if adapter.is_moe_layer(layer)}
    torch.save({"with": with_aux, "without": without, "reference": reference}, result)


def test_load_balancing_loss_gradient_is_megatron_lms(models, tmp_path):
    """The router gradients of a student with coefficient c minus those of the same student
    without the loss equal c·∂(mean over micro-batches of Σ_layers aux)/∂W, as mcore's routers
    compute it outside the trainer: the loss is in the gradient, with the right scale."""
    result = str(tmp_path / "grads.pt")
    spawn(_aux_gradient, 1, models, str(tmp_path), result)
    grads = torch.load(result)
    assert sorted(grads["reference"]) == sorted(grads["with"]) == [1, 3, 4]
    for number, reference in grads["reference"].items():
        difference = grads["with"][number] - grads["without"][number]
        assert reference.abs().max() > 0
        torch.testing.assert_close(difference, reference, rtol=1e-4,
                                   atol=1e-5 * reference.abs().max().item())


# ------------------------------------------------------------ layout checks


@pytest.mark.parametrize("world, overrides, message", [
    (4, dict(ep=4), "the student: --expert-model-parallel-size=4 does not divide "
                    "num_moe_experts=6"),
    (2, dict(ep=2, tp=2), "--expert-model-parallel-size=2 does not divide the data parallel "
                          "size 1"),
    (2, dict(ep=2, student="dense_student"), "the student: --expert-model-parallel-size=2 "
                                             "needs a mixture-of-experts model"),
    (2, dict(ep=2, teacher="dense_teacher"), "the teacher: --expert-model-parallel-size=2 "
                                             "needs a mixture-of-experts model"),
    (2, dict(tp=2), "MoE layers at --tp 2 only with --sequence-parallel"),
])
def test_bad_layouts_fail_in_one_line(models, tmp_path, monkeypatch, world, overrides, message):
    from megatron_minitron.distill.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(UsageError, match=message) as error:
        Trainer(train_config(models, str(tmp_path / "run"), **overrides))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "run")


def test_expert_parallel_flag(models, tmp_path, monkeypatch):
    """``--expert-model-parallel-size`` (default 1) reaches the run; ``minitron run``'s up-front
    validation checks it against the models too."""
    from megatron_minitron import cli
    from megatron_minitron.commands.common import existing_model
    from megatron_minitron.commands.distill import build_config, validate

    root, text = models
    arguments = ["distill", "--teacher", os.path.join(root, "moe_teacher"), "--student",
                 os.path.join(root, "moe_student"), "--text-file", text, "--seq-length", "16",
                 "--train-tokens", "64", "--global-batch-size", "4", "--output",
                 str(tmp_path / "run")]
    parser = cli.build_parser(only="distill")
    assert build_config(parser.parse_args(arguments)).ep == 1
    config = build_config(parser.parse_args(arguments + ["--expert-model-parallel-size", "2"]))
    assert config.ep == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    dense = arguments + ["--expert-model-parallel-size", "2", "--teacher",
                         os.path.join(root, "dense_teacher")]
    with pytest.raises(UsageError, match="the teacher: --expert-model-parallel-size=2 needs"):
        validate(parser.parse_args(dense), existing_model)
    assert validate(parser.parse_args(arguments + ["--expert-model-parallel-size", "2"]),
                    existing_model).ep == 2
