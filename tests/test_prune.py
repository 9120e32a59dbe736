"""Pruning: a pruned model is exactly a sub-network of its source; streamed output loads at any
layout; bad requests fail before any work."""

import os

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.config import count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.importance import random_scores
from megatron_minitron.importance.depth import skip_layer
from megatron_minitron.model.forward import full_logits
from megatron_minitron.prune import plan_pruning, prune_checkpoint
from megatron_minitron.prune.apply import head_columns
from megatron_minitron.testing import spawn, tiny_config

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def _config():
    return tiny_config(num_attention_heads=8, num_query_groups=4, hidden_size=64)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny source checkpoint, its model (in this process) and random scores."""
    root = tmp_path_factory.mktemp("prune")
    parallel.initialize(1, 1)
    cfg = _config()
    model = adapter.build_gpt_model(cfg)
    ckpt = str(root / "source")
    io.save_checkpoint(model, cfg, ckpt)
    yield root, ckpt, model, cfg, random_scores(cfg, seed=7)
    parallel.teardown()


def _masked_logits(model, cfg, plan):
    """Source logits with every pruned head and neuron zeroed at its output."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        for layer_module, layer_plan in zip(adapter.decoder_layers(model), plan.layers):
            proj = adapter.attention_output_projection(layer_module).weight  # [h, heads*d]
            pruned_heads = [h for h in range(cfg.num_attention_heads) if h not in layer_plan.heads]
            proj[:, head_columns(plan, pruned_heads)] = 0
            fc2 = adapter.mlp_fc2(layer_module).weight  # [h, ffn]
            pruned = [n for n in range(cfg.ffn_hidden_size) if n not in layer_plan.neurons]
            fc2[:, pruned] = 0
    logits = full_logits(model, TOKENS)
    model.load_state_dict(saved, strict=False)
    return logits


@pytest.mark.parametrize("target", [
    {"num_attention_heads": 4, "num_query_groups": 2},   # whole query groups
    {"num_attention_heads": 4, "num_query_groups": 4},   # heads inside every group
    {"ffn_hidden_size": 48},
    {"num_attention_heads": 2, "num_query_groups": 1, "ffn_hidden_size": 100},
])
def test_pruned_model_equals_masked_source(source, target):
    root, ckpt, model, cfg, scores = source
    out = str(root / ("w_" + "_".join(f"{k}{v}" for k, v in target.items())))
    plan = prune_checkpoint(ckpt, scores, target, out, head_add_back=False)
    pruned, pruned_cfg = io.load_checkpoint(out)
    assert sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned_cfg)["total"]
    expected = _masked_logits(model, cfg, plan)
    torch.testing.assert_close(full_logits(pruned, TOKENS), expected, rtol=0, atol=1e-4)
    for layer_plan in plan.layers:  # kept indices stay in source order
        assert layer_plan.heads == sorted(layer_plan.heads)
        assert layer_plan.neurons == sorted(layer_plan.neurons)


@pytest.mark.parametrize("how", [{"drop_layers": [1, 2]}, {"depth_metric": "ppl"},
                                 {"depth_metric": "bi"}, {"depth_metric": "block_bi"}])
def test_dropped_layers_equal_skipped_layers(source, how):
    root, ckpt, model, cfg, scores = source
    out = str(root / f"depth_{'_'.join(map(str, how.values()))}")
    target = {} if "drop_layers" in how else {"num_layers": 2}
    plan = prune_checkpoint(ckpt, scores, target, out, **how)
    assert len(plan.kept_layers) == 2
    if how.get("depth_metric") == "block_bi":  # a contiguous block is removed
        removed = sorted(set(range(4)) - set(plan.kept_layers))
        assert removed[1] - removed[0] == 1
    pruned, _ = io.load_checkpoint(out)
    skips = [skip_layer(model, i) for i in range(4) if i not in plan.kept_layers]
    for skip in skips:
        skip.__enter__()
    try:
        expected = full_logits(model, TOKENS)
    finally:
        for skip in skips:
            skip.__exit__(None, None, None)
    torch.testing.assert_close(full_logits(pruned, TOKENS), expected, rtol=0, atol=1e-4)


def test_head_add_back_changes_only_paired_kept_heads(source):
    root, ckpt, model, cfg, scores = source
    target = {"num_attention_heads": 4, "num_query_groups": 4}
    plan = prune_checkpoint(ckpt, scores, target, str(root / "addback"), head_add_back=True)
    pruned, _ = io.load_checkpoint(str(root / "addback"))
    d = cfg.kv_channels
    for layer_module, pruned_module, layer_plan in zip(adapter.decoder_layers(model),
                                                       adapter.decoder_layers(pruned), plan.layers):
        source_w = adapter.attention_output_projection(layer_module).weight
        pruned_w = adapter.attention_output_projection(pruned_module).weight
        pairs = dict(layer_plan.add_back)
        assert len(pairs) == 4  # one pruned head per group of 2, paired with the kept one
        for position, head in enumerate(layer_plan.heads):
            got = pruned_w[:, position * d:(position + 1) * d]
            mine = source_w[:, head * d:(head + 1) * d]
            partner = source_w[:, pairs[head] * d:(pairs[head] + 1) * d]
            torch.testing.assert_close(got, mine + (mine - partner))


def _load_at_layout(path, expected_path, tp, pp):
    parallel.initialize(tp, pp)
    model, _ = io.load_checkpoint(path)
    torch.testing.assert_close(full_logits(model, TOKENS), torch.load(expected_path),
                               rtol=0, atol=1e-5)


def test_hidden_pruning_output_loads_at_other_layouts(source):
    root, ckpt, model, cfg, scores = source
    out = str(root / "all_axes")
    target = {"hidden_size": 48, "num_layers": 2, "ffn_hidden_size": 64,
              "num_attention_heads": 4, "num_query_groups": 2}
    prune_checkpoint(ckpt, scores, target, out, target_tp=2, target_pp=2)
    pruned, pruned_cfg = io.load_checkpoint(out)
    assert pruned_cfg.hidden_size == 48 and pruned_cfg.kv_channels == cfg.kv_channels
    assert sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned_cfg)["total"]
    torch.save(full_logits(pruned, TOKENS), str(root / "all_axes.pt"))
    spawn(_load_at_layout, 4, out, str(root / "all_axes.pt"), 2, 2)


def _save_at_tp2(ckpt, out):
    parallel.initialize(2, 1)
    model, cfg = io.load_checkpoint(ckpt)
    io.save_checkpoint(model, cfg, out)


@pytest.mark.parametrize("head_add_back", ["none", "query", "output"])
@pytest.mark.parametrize("target", [
    {"ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2},  # whole groups
    {"ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 4},  # inside groups
], ids=["groups", "heads"])
def test_source_saved_at_tp2_prunes_the_same(source, target, head_add_back):
    root, ckpt, model, cfg, scores = source
    tp2 = str(root / "source_tp2")
    if not io.is_checkpoint(tp2):
        spawn(_save_at_tp2, 2, ckpt, tp2)
    name = f"{target['num_query_groups']}_{head_add_back}"
    plan = prune_checkpoint(ckpt, scores, target, str(root / f"from_tp1_{name}"),
                            head_add_back=head_add_back)
    if target["num_query_groups"] == 4 and head_add_back != "none":
        assert all(layer.add_back for layer in plan.layers)  # pairs to add back exist
    prune_checkpoint(tp2, scores, target, str(root / f"from_tp2_{name}"),
                     head_add_back=head_add_back)
    a, _ = io.load_checkpoint(str(root / f"from_tp1_{name}"))
    b, _ = io.load_checkpoint(str(root / f"from_tp2_{name}"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if torch.is_tensor(x):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("target,kwargs,message", [
    ({"ffn_hidden_size": 512}, {}, "larger than the source"),
    ({"num_attention_heads": 6, "num_query_groups": 4}, {}, "not divisible by num_query_groups"),
    ({"ffn_hidden_size": 63}, {"target_tp": 2}, "does not divide ffn_hidden_size=63"),
    ({"num_layers": 3}, {"target_pp": 2}, "does not divide num_layers=3"),
    ({}, {"drop_layers": [1, 7]}, r"out of range"),
    ({}, {"drop_layers": [1, 1]}, "has repeats"),
    ({"num_heads": 2}, {}, "key 'num_heads' is unknown"),
])
def test_bad_requests_fail_before_work(source, target, kwargs, message):
    root, ckpt, model, cfg, scores = source
    out = str(root / "never")
    with pytest.raises(UsageError, match=message):
        prune_checkpoint(ckpt, scores, target, out, **kwargs)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_scores_from_another_model_are_refused(source, tmp_path):
    root, ckpt, model, cfg, scores = source
    other = str(tmp_path / "other.pt")
    torch.save(random_scores(cfg.replace(ffn_hidden_size=96)), other)
    with pytest.raises(UsageError, match="different model.*ffn_hidden_size=96 vs 128"):
        prune_checkpoint(ckpt, other, {"ffn_hidden_size": 64}, str(tmp_path / "out"))


def test_plan_without_weights_is_cheap(source):
    root, ckpt, model, cfg, scores = source
    plan = plan_pruning(cfg, scores, {"num_query_groups": 2, "num_attention_heads": 4})
    assert all(len(layer.groups) == 2 and len(layer.heads) == 4 for layer in plan.layers)
    for layer in plan.layers:  # heads belong to kept groups, two per group
        assert sorted({h // 2 for h in layer.heads}) == layer.groups
