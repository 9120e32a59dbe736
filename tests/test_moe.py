"""Mixture-of-experts models: config checks, exact parameter counts (total and active), and the
same logits at every layout (TP, PP, expert parallel over gloo with mcore's all-to-all token
dispatcher), checkpoints resharded across them."""

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.config import count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.model.forward import full_logits
from megatron_minitron.testing import spawn, tiny_config, tiny_moe_config

TOKENS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("overrides", [
    {},
    {"moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False,
     "moe_layer_freq": 1},  # Mixtral / Qwen3-MoE: every layer, no shared expert
    {"add_bias_linear": True, "activation": "gelu", "moe_layer_freq": 2,
     "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False},
    {"qk_layernorm": True, "tie_word_embeddings": True, "normalization": "LayerNorm"},
], ids=["qwen2_moe", "mixtral", "biases_every_2nd", "qk_norm_tied_layernorm"])
def test_parameter_counts_are_exact(overrides):
    cfg = tiny_moe_config(**overrides)
    with parallel.parallel_context(1, 1):
        model = adapter.build_gpt_model(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = 0  # routed expert parameters a token does not pass through
    for layer in adapter.decoder_layers(model):
        if adapter.is_moe_layer(layer):
            per_expert = sum(p.numel() for p in adapter.local_experts(layer)[0].parameters())
            experts += (cfg.num_moe_experts - cfg.moe_router_topk) * per_expert
    assert counts["active"] == counts["total"] - experts < counts["total"]
    dense = tiny_config()
    assert count_parameters(dense)["active"] == count_parameters(dense)["total"]


@pytest.mark.parametrize("overrides, message", [
    ({"moe_router_topk": 7}, "moe_router_topk=7"),
    ({"moe_layer_freq": [1, 0, 1]}, "moe_layer_freq=[1, 0, 1]"),
    ({"moe_layer_freq": [1, 0, 2, 1]}, "moe_layer_freq=[1, 0, 2, 1]"),
    ({"moe_shared_expert_intermediate_size": None}, "moe_shared_expert_gate=True"),
    ({"num_moe_experts": 0}, "num_moe_experts=0"),
    ({"add_bias_linear": True}, "add_bias_linear=True with a shared expert"),
])
def test_bad_configs_fail_in_one_line(overrides, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_moe_config(**overrides)


def test_layout_checks_name_the_flag():
    with pytest.raises(UsageError, match="--expert-model-parallel-size=4 does not divide "
                                         "num_moe_experts=6"):
        tiny_moe_config().check_layout(1, 1, 4)
    with pytest.raises(UsageError, match="needs a mixture-of-experts model"):
        tiny_config().check_layout(1, 1, 2)
    with pytest.raises(UsageError, match="does not divide moe_ffn_hidden_size=30"):
        tiny_moe_config(moe_ffn_hidden_size=30).check_layout(4, 1, 1)
    with pytest.raises(UsageError, match="--expert-model-parallel-size=2 does not divide the "
                                         "data parallel size 1"):
        parallel.check_layout(2, 1, 2, ep=2)


def _logits_at_layout(path, expected_path, tp, pp, ep):
    with parallel.parallel_context(tp, pp, ep=ep) as layout:
        assert (layout.tp, layout.pp, layout.ep) == (tp, pp, ep)
        model, cfg = io.load_checkpoint(path)
        experts = adapter.local_experts(adapter.decoder_layers(model)[0])
        assert len(experts) == cfg.num_moe_experts // ep
        torch.testing.assert_close(full_logits(model, TOKENS, 2), torch.load(expected_path),
                                   rtol=0, atol=1e-5)
        io.save_checkpoint(model, cfg, f"{path}_{tp}{pp}{ep}")


def test_every_layout_gives_the_same_logits(tmp_path):
    from megatron_minitron.testing.models import spread_weights

    cfg = tiny_moe_config()
    path, expected = str(tmp_path / "moe"), str(tmp_path / "logits.pt")
    with parallel.parallel_context(1, 1):
        model = adapter.build_gpt_model(cfg)
        spread_weights(model, cfg)
        io.save_checkpoint(model, cfg, path)
        logits = full_logits(model, TOKENS, 2)
        assert logits.std() > 0.5  # weights at a scale where a wrong expert moves the logits
        torch.save(logits, expected)
    spawn(_logits_at_layout, 2, path, expected, 2, 1, 1)
    spawn(_logits_at_layout, 2, path, expected, 1, 1, 2)
    spawn(_logits_at_layout, 4, path, expected, 2, 1, 2)
    spawn(_logits_at_layout, 4, path, expected, 1, 2, 2)
    with parallel.parallel_context(1, 1):  # saved with experts split over two ranks
        reloaded, _ = io.load_checkpoint(f"{path}_212")
        torch.testing.assert_close(full_logits(reloaded, TOKENS, 2), torch.load(expected),
                                   rtol=0, atol=1e-5)


def test_checkpoint_norm_names_match_either_way():
    """A MoE layer's pre-MLP norm: saved by the local spec under the fused name, asked for by
    the Transformer Engine spec under its module's (and the other way round)."""
    from types import SimpleNamespace

    fused, plain = ("decoder.layers.mlp.linear_fc1.layer_norm_weight",
                    "decoder.layers.pre_mlp_layernorm.weight")
    for asked, stored in ((plain, fused), (fused, plain)):
        request = {"norm": SimpleNamespace(key=asked), "other": SimpleNamespace(key="x.weight")}
        adapter.match_checkpoint_keys(request, [stored, "x.weight"])
        assert request["norm"].key == stored and request["other"].key == "x.weight"
