"""Distillation training across layouts: TP×PP and PP×DP (distributed optimizer) runs follow the
single-rank run; a run resumed from a checkpoint repeats the uninterrupted losses bit for bit, and
a checkpoint saved at PP=2×DP=2 resumes at TP=1."""

import json
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_text
from megatron_minitron import parallel
from megatron_minitron.testing import spawn, tiny_config

STEPS = 4
TEACHER = dict(vocab_size=320)  # the tiny tokenizer has 300 tokens
STUDENT = dict(vocab_size=320, num_layers=2, hidden_size=32, ffn_hidden_size=64)
PAIRS = "emb,2:1,4:2"  # with PP=2: emb and 2:1 on stage 0, 4:2 on stage 1


def _make_models(root, tokenizer):
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint.io import save_checkpoint

    for name, overrides, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        parallel.initialize(1, 1, seed=seed)
        cfg = tiny_config(**overrides)
        save_checkpoint(adapter.build_gpt_model(cfg), cfg, os.path.join(root, name),
                        tokenizer_from=tokenizer)


@pytest.fixture(scope="session")
def distill_models(tmp_path_factory, tiny_tokenizer_dir):
    """(root, text file): tiny teacher (4 layers, hidden 64) and student (2 layers, hidden 32)
    checkpoints carrying the tiny tokenizer, and a text to train on."""
    root = tmp_path_factory.mktemp("distill_models")
    text = root / "text.txt"
    text.write_text(tiny_text(4000, seed=7))
    spawn(_make_models, 1, str(root), tiny_tokenizer_dir)
    return str(root), str(text)


def train_config(models, output, **overrides):
    from megatron_minitron.distill.config import TrainConfig

    root, text = models
    values = dict(teacher=os.path.join(root, "teacher"), student=os.path.join(root, "student"),
                  output=output, text_file=[text], seq_length=16, train_tokens=STEPS * 4 * 16,
                  global_batch_size=4, micro_batch_size=1, lr=2e-3, lr_warmup_steps=1,
                  intermediate=PAIRS, eval_interval=2, save_interval=2, keep_checkpoints=3,
                  keep_optimizer_state=True)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(output, split="train"):
    with open(os.path.join(output, "log.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return [r for r in records if r["split"] == split]


def _run(config):
    from megatron_minitron.distill.trainer import Trainer

    Trainer(config).run()


def _four_rank_runs(models, paths):
    """TP=2×PP=2 with top-k KL; then PP=2×DP=2 (distributed optimizer), whose last checkpoint
    is dropped so that it resumes from step 2 in the same job."""
    _run(train_config(models, paths["tp2pp2"], tp=2, pp=2, loss="topk_kl", topk=24))
    output, cross_copy, tp, pp = paths["pp2dp2"], paths["cross"], 1, 2
    _run(train_config(models, output, tp=tp, pp=pp))
    parallel.barrier()
    if parallel.is_rank0():
        shutil.copy(os.path.join(output, "log.jsonl"), os.path.join(output, "uninterrupted.jsonl"))
        shutil.copytree(output, cross_copy)
        for run_dir in (output, cross_copy):
            shutil.rmtree(os.path.join(run_dir, "checkpoints", f"iter_{STEPS:07d}"))
            shutil.rmtree(os.path.join(run_dir, "final"))
            os.remove(os.path.join(run_dir, "checkpoints", "latest"))
    parallel.barrier()
    _run(train_config(models, output, tp=tp, pp=pp, resume="auto"))


def _reference_and_cross_layout(models, reference, cross_copy):
    _run(train_config(models, reference))
    _run(train_config(models, cross_copy, resume="auto"))


@pytest.fixture(scope="module")
def runs(distill_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_runs")
    paths = {name: str(root / name) for name in ("pp2dp2", "cross", "reference", "tp2pp2")}
    spawn(_four_rank_runs, 4, distill_models, paths)
    spawn(_reference_and_cross_layout, 1, distill_models, paths["reference"], paths["cross"])
    return paths


def _assert_close_logs(logs, reference, rtol=2e-5):
    assert [r["step"] for r in logs] == [r["step"] for r in reference]
    for ours, expected in zip(logs, reference):
        for key in ("loss", "kd", "ce", "is"):
            assert ours[key] == pytest.approx(expected[key], rel=rtol), (ours["step"], key)
        if "grad_norm" in expected:
            assert ours["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)


def test_pipeline_and_data_parallel_match_single_rank(runs):
    reference = read_log(runs["reference"])
    assert len(reference) == STEPS and reference[-1]["loss"] < reference[0]["loss"]
    assert all(r["is"] > 0 and r["kd"] > 0 for r in reference)
    _assert_close_logs(read_log(runs["pp2dp2"]), reference)
    _assert_close_logs(read_log(runs["pp2dp2"], "valid"), read_log(runs["reference"], "valid"))


def test_resume_repeats_losses_bit_for_bit(runs):
    with open(os.path.join(runs["pp2dp2"], "uninterrupted.jsonl")) as handle:
        uninterrupted = [json.loads(line) for line in handle]
    resumed = [json.loads(line) for line in open(os.path.join(runs["pp2dp2"], "log.jsonl"))]
    keys = ("step", "split", "loss", "kd", "ce", "is", "grad_norm", "lr")
    assert [[r.get(k) for k in keys] for r in resumed] == \
        [[r.get(k) for k in keys] for r in uninterrupted]
    assert os.path.isdir(os.path.join(runs["pp2dp2"], "final"))


def test_checkpoint_resumes_at_another_layout(runs):
    """Saved at PP=2×DP=2 (distributed optimizer), resumed at TP=1: steps 3-4 follow the
    single-rank run, so weights, projections and Adam state all came back."""
    _assert_close_logs(read_log(runs["cross"])[2:], read_log(runs["reference"])[2:])


def test_tensor_and_pipeline_parallel_with_topk_kl(runs):
    logs = read_log(runs["tp2pp2"])
    assert len(logs) == STEPS and logs[-1]["kd"] < logs[0]["kd"]
    assert read_log(runs["tp2pp2"])[0]["ce"] == pytest.approx(read_log(runs["reference"])[0]["ce"],
                                                              rel=1e-5)


def test_checkpoints_and_final_model(runs):
    run_dir = runs["reference"]
    kept = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert kept == ["iter_0000002", "iter_0000004", "latest"]
    with open(os.path.join(run_dir, "final", "minitron_config.json")) as handle:
        info = json.load(handle)
    assert info["model"]["hidden_size"] == STUDENT["hidden_size"]
    assert info["meta"]["trained_by"] == "distill" and info["meta"]["step"] == STEPS
    assert os.path.isfile(os.path.join(run_dir, "final", "tokenizer", "tokenizer.json"))


# ------------------------------------------------------------ optimizer state at another layout


class _Allocations(TorchDispatchMode):
    """Bytes of each new tensor storage an operator makes inside the block (views and in-place
    results share their input's storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.sizes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor)
                       and t.untyped_storage().data_ptr() not in inputs]
        return out


def _measured_run(config, record):
    """Trains, recording on each rank the largest tensor allocated while saving a training
    checkpoint and the bytes of the rank's trained parameters (its whole shard)."""
    from megatron_minitron.distill.trainer import Trainer

    trainer = Trainer(config)
    allocations = _Allocations()
    save = trainer.save

    def measured_save(step):
        with allocations:
            save(step)

    trainer.save = measured_save
    trainer.run()
    params = [p for p in trainer.run_state.ddp_model.parameters() if p.requires_grad]
    with open(f"{record}.{parallel.rank()}.json", "w") as handle:
        json.dump({"largest": max(allocations.sizes),
                   "shard": sum(p.numel() * p.element_size() for p in params)}, handle)


def _reference_run(models, paths):
    _measured_run(train_config(models, paths["single"]), paths["single"] + ".alloc")


def _resume_on_two_ranks(models, paths):
    _measured_run(train_config(models, paths["dp2"], resume="auto"), paths["dp2"] + ".alloc")
    _run(train_config(models, paths["tp2"], tp=2, resume="auto"))


@pytest.fixture(scope="module")
def resumed(distill_models, tmp_path_factory):
    """A single-rank run; its step-2 checkpoint resumed at DP=2 (distributed optimizer) and at
    TP=2."""
    root = tmp_path_factory.mktemp("resumed")
    paths = {name: str(root / name) for name in ("single", "dp2", "tp2")}
    spawn(_reference_run, 1, distill_models, paths)
    for name in ("dp2", "tp2"):
        shutil.copytree(paths["single"], paths[name])
        for drop in ("checkpoints/iter_0000004", "final"):
            shutil.rmtree(os.path.join(paths[name], drop))
        os.remove(os.path.join(paths[name], "checkpoints", "latest"))
    spawn(_resume_on_two_ranks, 2, distill_models, paths)
    return paths


@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_resume_at_another_data_or_tensor_parallel_size(resumed, layout):
    """Saved at one rank, resumed at DP=2 (plain → distributed optimizer) or TP=2: steps 3-4
    follow the uninterrupted run, so the Adam state came back re-sharded."""
    reference = read_log(resumed["single"])
    logs = read_log(resumed[layout])
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    _assert_close_logs(logs[2:], reference[2:])


@pytest.mark.parametrize("run", ["single", "dp2"])
def test_saving_optimizer_state_allocates_no_shard_sized_tensor(resumed, run):
    """Saving writes the optimizer's own state tensors: no tensor as large as the rank's whole
    parameter shard is made (plain optimizer at DP=1, distributed optimizer at DP=2)."""
    ranks = 1 if run == "single" else 2
    for rank in range(ranks):
        with open(f"{resumed[run]}.alloc.{rank}.json") as handle:
            record = json.load(handle)
        assert 0 < record["largest"] < record["shard"], record


def test_earlier_optimizer_state_format_is_refused(resumed, tmp_path):
    from megatron_minitron.distill import state
    from megatron_minitron.errors import UsageError

    copy = str(tmp_path / "old")
    shutil.copytree(resumed["single"], copy)
    extra_file = os.path.join(state.iteration_dir(copy, STEPS), "extra_state.pt")
    extra = torch.load(extra_file, weights_only=False)
    del extra["optimizer_format"]
    torch.save(extra, extra_file)
    with open(os.path.join(copy, "run.json")) as handle:
        identity = json.load(handle)["identity"]
    assert state.check_output(resumed["single"], identity, "auto") == STEPS
    with pytest.raises(UsageError, match="model weights only.*--student"):
        state.check_output(copy, identity, "auto")


def test_flat_range_boxes_cover_the_range_in_order():
    """The distributed optimizer's flat slice of a parameter, as boxes of the parameter."""
    from megatron_minitron.optimizer_state import _boxes

    for shape, start, end in [((4, 3, 5), 7, 52), ((6, 8), 0, 48), ((6, 8), 13, 14), ((9,), 2, 7),
                              ((2, 3, 4), 5, 19)]:
        grid = torch.arange(torch.Size(shape).numel()).view(shape)
        covered = []
        for offset, box, flat in _boxes(shape, start, end):
            block = grid[tuple(slice(o, o + n) for o, n in zip(offset, box))]
            assert block.shape == box and block.reshape(-1)[0] == flat
            covered += block.reshape(-1).tolist()
        assert covered == list(range(start, end)), (shape, start, end)
