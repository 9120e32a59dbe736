"""Megatron-LM torch_dist checkpoints: read at any layout, written with --output-format megatron."""

import argparse
import dataclasses
import os

import pytest
import torch
from conftest import tiny_text

from megatron_minitron.cli import main as cli_main
from megatron_minitron.testing import spawn, tiny_config

CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
           num_query_groups=2, vocab_size=320, max_position_embeddings=64,
           tie_word_embeddings=False, rotary_base=500000.0)


def megatron_lm_args(**changes) -> argparse.Namespace:
    """The architecture part of the args Megatron-LM's pretrain_gpt.py saves for CFG."""
    args = argparse.Namespace(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=None,
        max_position_embeddings=64, seq_length=64, position_embedding_type="rope",
        rotary_base=500000, rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        normalization="RMSNorm", norm_epsilon=1e-5, apply_layernorm_1p=False, swiglu=True,
        squared_relu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=True, padded_vocab_size=320, num_experts=None,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent/tokenizer",
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1, ckpt_format="torch_dist",
        init_method_std=0.02)
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def _save_like_megatron_lm(save_dir, ours, args_changes):
    """TP=2: one model saved as megatron/training/checkpointing.py does, and in our format."""
    from megatron_minitron import adapter, parallel  # before mcore: the CPU patches
    from megatron_minitron.checkpoint.io import save_checkpoint
    from megatron.core import dist_checkpointing

    cfg = tiny_config(**CFG)
    with parallel.parallel_context(2, 1, seed=7):
        model = adapter.build_gpt_model(cfg)
        with torch.no_grad():  # norms away from 1, so a wrong norm mapping shows
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
        folder = os.path.join(save_dir, "iter_0000100")
        if parallel.is_rank0():
            os.makedirs(folder)
        parallel.barrier()
        sharded = model.sharded_state_dict()
        optimizer = {  # optimizer state is saved beside the weights and must be ignored
            key: dataclasses.replace(value, key="optimizer.state.exp_avg." + value.key,
                                     data=torch.full_like(value.data, 7.0))
            for key, value in sharded.items() if key.startswith("embedding.")}
        state = {"model": sharded, "optimizer": optimizer,
                 "args": megatron_lm_args(**args_changes), "iteration": 100,
                 "checkpoint_version": 3.0}
        dist_checkpointing.save(state, folder)
        if parallel.is_rank0():
            with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("100")
        save_checkpoint(model, cfg, ours)


def _logits(path, tokens):
    from megatron_minitron.checkpoint import io
    from megatron_minitron.model.forward import full_logits

    model, _ = io.load_checkpoint(path)
    model.eval()
    with torch.no_grad():
        return full_logits(model, tokens)


def _compare(save_dir, ours, tp, pp):
    from megatron_minitron import parallel

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with parallel.parallel_context(tp, pp):
        theirs, mine = _logits(save_dir, tokens), _logits(ours, tokens)
    assert torch.allclose(theirs, mine, atol=1e-5, rtol=0), (theirs - mine).abs().max()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    save_dir, ours = str(root / "save"), str(root / "ours")
    spawn(_save_like_megatron_lm, 2, save_dir, ours, {})
    return save_dir, ours


def test_config_comes_from_the_saved_args(saved):
    from megatron_minitron.checkpoint import io

    save_dir, ours = saved
    theirs = io.load_config(save_dir)
    assert theirs.replace(extra={}) == io.load_config(ours).replace(extra={})
    assert io.load_config(os.path.join(save_dir, "iter_0000100")) == theirs
    assert io.tokenizer_dir(save_dir) is None


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_saved_at_tp2_loads_at_other_layouts(saved, tp, pp):
    save_dir, ours = saved
    if tp * pp == 1:
        _compare(save_dir, ours, tp, pp)
    else:
        spawn(_compare, tp * pp, save_dir, ours, tp, pp)


@pytest.mark.parametrize("changes,named", [
    ({"num_experts": 8, "moe_router_score_function": "sigmoid"},
     "moe_router_score_function='sigmoid'"),
    ({"position_embedding_type": "learned_absolute"}, "position_embedding_type='learned_absolute'"),
    ({"rotary_interleaved": True}, "rotary_interleaved=True"),
    ({"multi_latent_attention": True}, "multi_latent_attention=True"),
    ({"normalization": "L2Norm"}, "normalization='L2Norm'"),
])
def test_unsupported_args_are_refused_in_one_line(saved, tmp_path, capsys, changes, named):
    from megatron_minitron.checkpoint import megatron_lm

    save_dir, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(save_dir, "iter_0000100"), bad / "iter_0000100")
    (bad / "latest_checkpointed_iteration.txt").write_text("100")
    real = megatron_lm.read_common
    common = dict(real(os.path.join(save_dir, "iter_0000100")),
                  args=megatron_lm_args(**changes))
    megatron_lm.read_common = lambda folder: common
    try:
        code = cli_main(["eval", "--load", str(bad), "--text-file", str(tmp_path / "t.txt"),
                         "--seq-length", "8"])
    finally:
        megatron_lm.read_common = real
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err


def test_rope_scaling_and_qk_norm_args_map_and_round_trip():
    from megatron_minitron.checkpoint import megatron_lm

    args = megatron_lm_args(use_rope_scaling=True, rope_scaling_factor=32.0, qk_layernorm=True)
    cfg = megatron_lm.config_from_args(args, 320, "SAVE")
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.qk_layernorm) == (True, 32.0, True)
    assert (cfg.rotary_base, cfg.num_query_groups, cfg.tie_word_embeddings) == (500000.0, 2, False)
    again = megatron_lm.config_from_args(megatron_lm.megatron_args(cfg), 320, "OUT")
    assert again == cfg


def test_bad_tracker_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("200")
    code = cli_main(["eval", "--load", str(tmp_path), "--tasks", "piqa"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "iter_0000200" in err, err


def test_eval_takes_the_tokenizer_from_the_flag(saved, tmp_path, tiny_tokenizer_dir, capsys):
    save_dir, _ = saved
    text = tmp_path / "held_out.txt"
    text.write_text(tiny_text(600, seed=9))
    base = ["eval", "--load", save_dir, "--text-file", str(text), "--seq-length", "16",
            "--num-samples", "4"]
    assert cli_main(base) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    out = tmp_path / "eval.json"
    assert cli_main(base + ["--tokenizer", tiny_tokenizer_dir, "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["tokens"] > 0 and result["loss"] > 0


def _fresh_mcore_model(args):
    """A GPTModel built from a checkpoint's own args, the way Megatron-LM's model provider
    does with the local spec (no minitron code involved)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, use_cpu_initialization=True,
        gradient_accumulation_fusion=False)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization=args.normalization), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent)


def _loss(model, tokens):
    from megatron_minitron.model.forward import full_logits

    model.eval()
    with torch.no_grad():
        logits = full_logits(model, tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def test_pruned_megatron_output_loads_into_a_fresh_mcore_model(saved, tmp_path,
                                                               tiny_tokenizer_dir):
    from megatron_minitron import parallel
    from megatron_minitron.checkpoint import io  # before mcore: the CPU patches
    from megatron.core import dist_checkpointing

    save_dir, ours = saved
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(800, seed=3))
    scores = str(tmp_path / "scores.pt")
    assert cli_main(["importance", "--load", save_dir, "--tokenizer", tiny_tokenizer_dir,
                     "--text-file", str(text), "--seq-length", "16", "--num-samples", "4",
                     "--no-plot", "--output", scores]) == 0
    target = "hidden_size=24,ffn_hidden_size=48,num_attention_heads=2,num_query_groups=1"
    out, reference = str(tmp_path / "pruned_megatron"), str(tmp_path / "pruned_ours")
    for load, output, fmt in ((save_dir, out, "megatron"), (ours, reference, "minitron")):
        assert cli_main(["prune", "--load", load, "--scores", scores, "--target", target,
                         "--tokenizer", tiny_tokenizer_dir, "--output", output,
                         "--output-format", fmt]) == 0
    assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read() == "release"
    folder = os.path.join(out, "release")
    tokens = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    with parallel.parallel_context(1, 1):
        common = dist_checkpointing.load_common_state_dict(folder)
        args = common["args"]
        assert (args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                args.num_query_groups, common["checkpoint_version"]) == (24, 48, 2, 1, 3.0)
        fresh = _fresh_mcore_model(args)
        loaded = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, folder,
                                         strict="raise_all")
        fresh.load_state_dict(loaded["model"], strict=True)
        expected, _ = io.load_checkpoint(reference)
        assert torch.allclose(_loss(fresh, tokens), _loss(expected, tokens), atol=1e-6)
        again, cfg = io.load_checkpoint(out)  # and every minitron command reads it
        assert cfg.replace(extra={}) == io.load_config(reference).replace(extra={})
        assert torch.allclose(_loss(again, tokens), _loss(expected, tokens), atol=1e-6)
    assert io.tokenizer_dir(out) == os.path.join(folder, "tokenizer")


def _save_both(model_dir, ours):
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io, megatron_lm

    cfg = tiny_config(**CFG)
    with parallel.parallel_context(2, 1, seed=3):
        model = adapter.build_gpt_model(cfg)
        megatron_lm.save_checkpoint(model, cfg, model_dir)
        io.save_checkpoint(model, cfg, ours)


def test_collective_megatron_save_round_trips(tmp_path):
    model_dir, ours = str(tmp_path / "megatron"), str(tmp_path / "ours")
    spawn(_save_both, 2, model_dir, ours)
    _compare(model_dir, ours, 1, 1)
    from megatron_minitron.checkpoint import io

    assert io.is_checkpoint(model_dir)
    spawn(_save_both, 2, model_dir, ours)  # overwriting our own output is allowed


def _train_to_megatron(save_dir, text, tokenizer, output):
    common = ["--seq-length", "16", "--train-tokens", str(2 * 4 * 16), "--global-batch-size",
              "4", "--lr", "3e-3"]
    assert cli_main(["train", "--ce-only", "--load", save_dir, "--text-file", text,
                     "--tokenizer", tokenizer, "--output", output, "--output-format", "megatron",
                     *common]) == 0


def test_training_from_megatron_lm_writes_megatron_lm(saved, tmp_path, tiny_tokenizer_dir):
    from megatron_minitron.checkpoint import io, megatron_lm

    save_dir, _ = saved
    text = tmp_path / "train.txt"
    text.write_text(tiny_text(1500, seed=5))
    output = str(tmp_path / "run")
    spawn(_train_to_megatron, 1, save_dir, str(text), tiny_tokenizer_dir, output)
    final = os.path.join(output, "final")
    folder = megatron_lm.resolve(final)
    assert folder == os.path.join(final, "release")
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in megatron_lm.stored_shapes(folder)
    assert io.load_config(final).replace(extra={}) == io.load_config(save_dir).replace(extra={})
    assert io.tokenizer_dir(final) == os.path.join(folder, "tokenizer")
    args = megatron_lm.read_common(folder)["args"]
    assert args.tokenizer_model == os.path.join(folder, "tokenizer") and args.swiglu


@pytest.mark.parametrize("variant", ["qwen2_qkv_bias"])
def test_import_hf_to_megatron_and_back(tmp_path, monkeypatch, variant):
    from test_hf import TINY, TINY_VOCAB, _assert_same_state, _load_hf, _mcore_logits_tp1, _tiny_hf

    from megatron_minitron.hf.convert import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "megatron")
    model = _tiny_hf(hf_dir, **TINY[variant])
    assert cli_main(["import-hf", "--hf-path", hf_dir, "--output", out,
                     "--output-format", "megatron"]) == 0
    tokens = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    assert (_mcore_logits_tp1(out, tokens) - expected).abs().max().item() <= 1e-4
    exported = str(tmp_path / "exported")
    export_hf(out, exported)
    _assert_same_state(model.state_dict(), _load_hf(exported).state_dict())


def test_a_recipe_starts_from_a_megatron_lm_teacher(saved, tmp_path, tiny_tokenizer_dir,
                                                    capsys):
    """The recipe's teacher may be a Megatron-LM save directory: its steps are checked and
    planned from the saved args."""
    import yaml

    from megatron_minitron.cli import main as cli

    save_dir, _ = saved
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "from_megatron", "workdir": str(tmp_path / "work"), "teacher": str(save_dir),
        "steps": [{"stage": "prune", "load": "@teacher", "random_init": True,
                   "target": {"ffn_hidden_size": 64}}]}))
    assert cli(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# step prune (prune): run" in out and "| prune | prune |" in out
