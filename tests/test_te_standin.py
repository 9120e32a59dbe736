"""The Transformer Engine spec's layout, on CPU: norms as ``IdentityOp`` and fused into
``linear_qkv``/``linear_fc1`` (``megatron_minitron.testing.te_standin``). On the same weights it
gives the local spec's logits, importance scores (channel scores from the norm's output, not the
raw residual stream), pruned weights, checkpoint keys and distillation losses, at TP=1 and TP=2.
Checkpoints written before the package followed mcore's key scheme still load."""

import contextlib
import json
import os

import pytest
import torch

from conftest import tiny_text
from megatron_minitron import parallel
from megatron_minitron.testing import spawn, tiny_config

VARIANTS = {
    "rmsnorm_swiglu": dict(),
    "layernorm1p_squared_relu": dict(normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                                     activation="squared_relu"),
}
BASE = dict(num_layers=2, vocab_size=320)  # the tiny tokenizer has 300 tokens
SCORE_KEYS = ("head", "query_group", "neuron", "channel", "layer_bi", "layer_ppl")
TARGET = {"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 2}


def _specs():
    from megatron_minitron.testing.te_standin import te_shaped_spec

    return {"local": None, "te": te_shaped_spec}


def _spec(spec):
    from megatron_minitron import adapter

    return contextlib.nullcontext() if spec is None else adapter.use_layer_spec(spec)


def _batches():
    samples = torch.randint(0, 320, (4, 17), generator=torch.Generator().manual_seed(3))
    return [{"tokens": samples[i:i + 2, :-1], "labels": samples[i:i + 2, 1:]} for i in (0, 2)]


def _logits(model):
    from megatron_minitron import adapter

    tokens = _batches()[0]["tokens"]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return adapter.stage_forward(model, tokens, positions)  # [s, b, v/tp]


def _make_source(path, overrides):
    """Local-spec model whose norm weights (and biases) are far from their initial values."""
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint.io import save_checkpoint

    parallel.initialize(1, 1, seed=5)
    cfg = tiny_config(**BASE, **overrides)
    model = adapter.build_gpt_model(cfg)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    save_checkpoint(model, cfg, path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_standin")
    paths = {}
    for name, overrides in VARIANTS.items():
        paths[name] = str(root / name)
        spawn(_make_source, 1, paths[name], overrides)
    return root, paths


def _save_old_scheme(model, cfg, path):
    """Saves as checkpoints of ours did before following mcore's scheme (local norm names)."""
    from megatron.core import dist_checkpointing
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint import io

    tmp = f"{path}.tmp"
    if parallel.is_rank0():
        os.makedirs(tmp)
    parallel.barrier()
    sharded = adapter.sharded_state_dict(model)
    for value in sharded.values():
        value.key = adapter.legacy_checkpoint_key(value.key)
    dist_checkpointing.save(sharded, tmp)
    parallel.barrier()
    if parallel.is_rank0():
        io.finalize_checkpoint_dir(tmp, path, cfg, None, None, {"tp": 1, "pp": 1})
    parallel.barrier()


def _compare_specs(source, root, tp):
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint import io
    from megatron_minitron.importance import ImportanceConfig, estimate_importance

    parallel.initialize(tp, 1)
    results = {}
    for name, spec in _specs().items():
        with _spec(spec):
            model, cfg = io.load_checkpoint(source)
            scores = estimate_importance(model, cfg, _batches(), ImportanceConfig())
            results[name] = model, _logits(model), scores
            io.save_checkpoint(model, cfg, os.path.join(root, f"saved_{name}_tp{tp}"))
    local, local_logits, local_scores = results["local"]
    te, te_logits, te_scores = results["te"]
    torch.testing.assert_close(te_logits, local_logits, rtol=0, atol=0)
    for key in SCORE_KEYS:
        torch.testing.assert_close(te_scores[key], local_scores[key], rtol=1e-6, atol=0)
    assert type(te.decoder.layers[0].input_layernorm).__name__ == "IdentityOp"
    assert all(norm.fused for norm in adapter.layer_norms(te.decoder.layers[0]))
    # the same checkpoint keys; each spec loads what the other saved
    saved = {name: os.path.join(root, f"saved_{name}_tp{tp}") for name in results}
    assert sorted(io.checkpoint_keys(saved["te"])) == sorted(io.checkpoint_keys(saved["local"]))
    assert sorted(io.checkpoint_keys(saved["te"])) == sorted(io.checkpoint_keys(source))
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in \
        io.checkpoint_keys(saved["local"])
    for loader, saver in (("local", "te"), ("te", "local")):
        with _spec(_specs()[loader]):
            model, _ = io.load_checkpoint(saved[saver])
        torch.testing.assert_close(_logits(model), local_logits, rtol=0, atol=0)
    # a checkpoint in the former key scheme loads under both specs
    old = os.path.join(root, f"old_scheme_tp{tp}")
    _save_old_scheme(local, cfg, old)
    keys = io.checkpoint_keys(old)
    assert "decoder.layers.input_layernorm.weight" in keys
    assert not any("layer_norm_weight" in key for key in keys)
    for spec in _specs().values():
        with _spec(spec):
            model, _ = io.load_checkpoint(old)
        torch.testing.assert_close(_logits(model), local_logits, rtol=0, atol=0)
    if tp == 1:  # Hugging Face export reads the fused norm weights too
        from megatron_minitron.hf.mapping import hf_state_from

        hf_local, hf_te = (hf_state_from(m, cfg, torch.float32) for m in (local, te))
        assert hf_local.keys() == hf_te.keys()
        assert all(torch.equal(hf_local[k], hf_te[k]) for k in hf_local)


@pytest.mark.parametrize("tp", (1, 2))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_logits_scores_and_checkpoints(sources, variant, tp, tmp_path):
    _, paths = sources
    spawn(_compare_specs, tp, paths[variant], str(tmp_path), tp)


def _prune_both(source, root):
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint import io
    from megatron_minitron.importance import ImportanceConfig, estimate_importance
    from megatron_minitron.prune import plan_pruning, prune_checkpoint, prune_state_dict

    parallel.initialize(1, 1)
    with _spec(_specs()["te"]):
        te, cfg = io.load_checkpoint(source)
        scores = estimate_importance(te, cfg, _batches(), ImportanceConfig(depth=False))
    pruned_path = os.path.join(root, "pruned")
    plan = prune_checkpoint(source, scores, TARGET, pruned_path)
    channels = torch.tensor(plan.channels)
    local, _ = io.load_checkpoint(source)
    old = os.path.join(root, "old_scheme")
    _save_old_scheme(local, cfg, old)
    prune_checkpoint(old, scores, TARGET, os.path.join(root, "pruned_old"))
    reference = None
    for path in (pruned_path, os.path.join(root, "pruned_old")):
        for spec in _specs().values():
            with _spec(spec):
                model, pruned_cfg = io.load_checkpoint(path)
            logits = _logits(model)
            reference = logits if reference is None else reference
            torch.testing.assert_close(logits, reference, rtol=0, atol=0)
            assert pruned_cfg.hidden_size == TARGET["hidden_size"]
    # the pruned stand-in's fused norms hold the kept channels of the source's
    for new_layer, old_layer in zip(adapter.decoder_layers(model), adapter.decoder_layers(te)):
        for new_norm, old_norm in zip(adapter.layer_norms(new_layer),
                                      adapter.layer_norms(old_layer)):
            assert new_norm.fused and new_norm.weight.shape == (TARGET["hidden_size"],)
            assert torch.equal(new_norm.weight, old_norm.weight[channels])
            if old_norm.bias is not None:
                assert torch.equal(new_norm.bias, old_norm.bias[channels])
    # in memory too: the stand-in's state dict prunes to the local one's, renamed
    renames = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
               "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}

    def local_name(key):
        for te_name, name in renames.items():
            key = key.replace(te_name, name)
        return key

    state = lambda m: {k: v for k, v in m.state_dict().items()  # noqa: E731
                       if torch.is_tensor(v) and not k.endswith("_extra_state")}
    for mode in ("none", "query", "output"):  # every head add-back mode (TARGET pairs heads)
        mode_plan = plan_pruning(cfg, scores, TARGET, head_add_back=mode)
        assert all(layer.add_back for layer in mode_plan.layers) == (mode != "none")
        pruned_te = {local_name(k): v
                     for k, v in prune_state_dict(state(te), mode_plan).items()}
        pruned_local = prune_state_dict(state(local), mode_plan)
        assert pruned_te.keys() == pruned_local.keys()
        assert all(torch.equal(pruned_te[k], pruned_local[k]) for k in pruned_local)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_width_pruning_is_spec_independent(sources, variant, tmp_path):
    _, paths = sources
    spawn(_prune_both, 1, paths[variant], str(tmp_path))


def _distill_both(teacher, student, text, root):
    from megatron_minitron.distill.config import TrainConfig
    from megatron_minitron.distill.trainer import Trainer

    logs = {}
    for name, spec in _specs().items():
        output = os.path.join(root, name)
        config = TrainConfig(teacher=teacher, student=student, output=output, text_file=[text],
                             seq_length=16, train_tokens=2 * 2 * 16, global_batch_size=2,
                             micro_batch_size=1, lr=2e-3, lr_warmup_steps=1, intermediate="2:1")
        with _spec(spec):
            Trainer(config).run()
        with open(os.path.join(output, "log.jsonl")) as handle:
            logs[name] = [r for r in map(json.loads, handle) if r["split"] == "train"]
    assert len(logs["local"]) == 2
    for ours, expected in zip(logs["te"], logs["local"]):
        for key in ("loss", "kd", "is", "grad_norm"):
            assert ours[key] == pytest.approx(expected[key], rel=1e-6), (ours["step"], key)


def _make_student(path, tokenizer):
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint.io import save_checkpoint

    parallel.initialize(1, 1, seed=2)
    cfg = tiny_config(num_layers=1, hidden_size=32, ffn_hidden_size=64, vocab_size=320)
    save_checkpoint(adapter.build_gpt_model(cfg), cfg, path, tokenizer_from=tokenizer)


def test_distillation_step_is_spec_independent(sources, tiny_tokenizer_dir, tmp_path):
    """Teacher and student built with the stand-in give the local spec's losses and gradient
    norms over two steps (the second after an update of the fused norm weights)."""
    root, paths = sources
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(2000, seed=3))
    student = str(tmp_path / "student")
    spawn(_make_student, 1, student, tiny_tokenizer_dir)
    spawn(_distill_both, 1, paths["rmsnorm_swiglu"], student, str(text), str(tmp_path / "runs"))


def test_former_key_names_are_found_only_where_the_checkpoint_uses_them():
    from megatron_minitron import adapter  # first: its CPU patches precede mcore's import
    from megatron.core.dist_checkpointing import ShardedTensor

    assert adapter.legacy_checkpoint_key(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.input_layernorm.weight"
    assert adapter.legacy_checkpoint_key(  # optimizer state is keyed by the parameter's key
        "optimizer.exp_avg.decoder.layers.mlp.linear_fc1.layer_norm_bias") == \
        "optimizer.exp_avg.decoder.layers.pre_mlp_layernorm.bias"
    assert adapter.legacy_checkpoint_key("decoder.layers.mlp.linear_fc1.weight") == \
        "decoder.layers.mlp.linear_fc1.weight"
    keys = {"a": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            "b": "decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    request = {name: ShardedTensor.from_rank_offsets(key, torch.zeros(2))
               for name, key in keys.items()}
    adapter.match_checkpoint_keys(request, ["decoder.layers.input_layernorm.weight",
                                            "decoder.layers.mlp.linear_fc1.layer_norm_weight"])
    assert request["a"].key == "decoder.layers.input_layernorm.weight"
    assert request["b"].key == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
