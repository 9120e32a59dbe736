"""Checkpoint safety and layout checks: atomic writes, ownership, and one-line errors."""

import json
import os

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.cli import main as cli_main
from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.testing import tiny_config


@pytest.fixture
def single_rank():
    with parallel.parallel_context(1, 1) as layout:
        yield layout


def test_config_round_trip_and_exact_parameter_count(single_rank):
    for overrides in ({}, {"tie_word_embeddings": False}, {"activation": "gelu"},
                      {"normalization": "LayerNorm", "add_bias_linear": True},
                      {"add_qkv_bias": True, "kv_channels": 24},
                      {"activation": "squared_relu", "normalization": "LayerNorm",  # Nemotron-4
                       "layernorm_zero_centered_gamma": True, "rotary_percent": 0.5,
                       "tie_word_embeddings": False, "num_query_groups": 1}):
        cfg = tiny_config(**overrides)
        assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
        model = adapter.build_gpt_model(cfg)
        assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_save_then_load_is_identical(single_rank, tmp_path):
    cfg = tiny_config()
    model = adapter.build_gpt_model(cfg)
    io.save_checkpoint(model, cfg, str(tmp_path / "ckpt"), meta={"note": "x"})
    assert io.load_config(str(tmp_path / "ckpt")) == cfg
    loaded, _ = io.load_checkpoint(str(tmp_path / "ckpt"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
    assert not os.path.exists(str(tmp_path / "ckpt.tmp"))


def test_crash_mid_save_leaves_nothing_loadable_and_keeps_old(single_rank, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    cfg = tiny_config()
    model = adapter.build_gpt_model(cfg)
    path = str(tmp_path / "ckpt")
    fresh = str(tmp_path / "fresh")
    io.save_checkpoint(model, cfg, path)
    before = sorted(os.listdir(path))

    def crash(state_dict, directory, *args, **kwargs):
        open(os.path.join(directory, "partial.distcp"), "w").close()
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dist_checkpointing, "save", crash)
    for target in (path, fresh):
        with pytest.raises(KeyboardInterrupt):
            io.save_checkpoint(model, cfg.replace(num_layers=4), target)
    assert sorted(os.listdir(path)) == before  # the old checkpoint is untouched
    assert io.load_config(path) == cfg
    assert not io.is_checkpoint(fresh) and not io.is_checkpoint(fresh + ".tmp")
    with pytest.raises(io.CheckpointError, match="does not exist"):
        io.load_config(fresh)


def test_output_that_is_not_ours_is_refused(single_rank, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    cfg = tiny_config()
    model = adapter.build_gpt_model(cfg)
    with pytest.raises(io.CheckpointError, match="not a megatron_minitron checkpoint"):
        io.save_checkpoint(model, cfg, str(foreign))
    assert os.listdir(foreign) == ["data.txt"]


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "--tensor-model-parallel-size=3 does not divide num_attention_heads=4"),
    (4, 1, "--tensor-model-parallel-size=4 does not divide num_query_groups=2"),
    (1, 3, "--pipeline-model-parallel-size=3 does not divide num_layers=4"),
])
def test_layout_that_does_not_divide_the_model(tp, pp, message):
    with pytest.raises(ValueError, match=message):
        tiny_config().check_layout(tp, pp)


def test_layout_that_does_not_divide_the_world():
    with pytest.raises(ValueError, match="does not divide the world size 2"):
        parallel.check_layout(2, 2, 2)


@pytest.mark.parametrize("bad,message", [
    ({"num_attention_heads": 4, "num_query_groups": 3}, "not divisible by num_query_groups=3"),
    ({"normalization": "BatchNorm"}, "normalization='BatchNorm'"),
    ({"hidden_size": 0}, "hidden_size=0"),
])
def test_bad_model_config(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


def test_cli_reports_missing_checkpoint_in_one_line(tmp_path, capsys):
    code = cli_main(["eval", "--load", str(tmp_path / "missing"), "--text-file",
                     str(tmp_path / "t.txt"), "--seq-length", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err
