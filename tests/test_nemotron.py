"""Nemotron-4 architecture: squared-ReLU MLP, LayerNorm1P (zero-centred gamma, with bias) and
partial RoPE. Logits parity with transformers' NemotronForCausalLM at TP=1 and TP=2, exact
HF -> mcore -> HF round trips, importance and pruning on such a model, and config checks."""

import json
import os

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.hf import export_hf, import_hf
from megatron_minitron.hf.mapping import hf_config_from
from megatron_minitron.importance import ImportanceConfig, estimate_importance
from megatron_minitron.importance.depth import skip_layer
from megatron_minitron.model.forward import full_logits
from megatron_minitron.prune import prune_checkpoint
from megatron_minitron.testing import tiny_config
from test_hf import (
    _assert_one_line_error,
    _assert_same_state,
    _load_hf,
    _logits_at_tp,
    _mcore_logits_tp1,
    _tiny_tokenizer,
    _write_config,
    imported_variants,
)
from test_prune import TOKENS, _masked_logits

transformers = pytest.importorskip("transformers")

VOCAB = 128
VARIANTS = {  # 2 layers, hidden 64, 4 heads in 2 KV groups, head_dim 16
    "untied": dict(tie=False, bias=False, partial=0.5),
    "tied_bias_quarter_rope": dict(tie=True, bias=True, partial=0.25),
}
NEMOTRON_FIELDS = dict(normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                       activation="squared_relu", rotary_percent=0.5)


def _tiny_nemotron(folder, tie, bias, partial, seed=0):
    """Saves a random NemotronForCausalLM (every tensor random, norms near gamma = 1)."""
    torch.manual_seed(seed)
    config = transformers.NemotronConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_theta=5000.0, partial_rotary_factor=partial, norm_eps=1e-5,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    model = transformers.NemotronForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.2 if "norm" in name else 0.05)  # norm weights store gamma - 1
    model.save_pretrained(folder)
    _tiny_tokenizer(folder, 100)
    return model.eval()


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    """{variant: dict(hf, ckpt, model, tokens, logits)}, each variant imported once."""
    return imported_variants(tmp_path_factory.mktemp("nemotron"), VARIANTS, _tiny_nemotron,
                             VOCAB)


# ---------------------------------------------------------------- config


def test_config_fields_and_backward_compatibility():
    cfg = tiny_config(**NEMOTRON_FIELDS)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = tiny_config().to_dict()
    del old["layernorm_zero_centered_gamma"]  # a config written before the field existed
    loaded = ModelConfig.from_dict(old)
    assert not loaded.layernorm_zero_centered_gamma and loaded.activation == "swiglu"
    plain_mlp = count_parameters(tiny_config(activation="gelu", normalization="LayerNorm"))
    assert count_parameters(cfg) == plain_mlp  # same two MLP matrices and LayerNorm biases
    with pytest.raises(ValueError, match="needs normalization='LayerNorm'"):
        tiny_config(layernorm_zero_centered_gamma=True)
    with pytest.raises(ValueError, match="rotary_percent=1.5"):
        tiny_config(rotary_percent=1.5)


# ---------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_and_tp1_logits(nemotron, variant):
    case, spec = nemotron[variant], VARIANTS[variant]
    cfg = io.load_config(case["ckpt"])
    assert (cfg.activation, cfg.normalization, cfg.layernorm_zero_centered_gamma) == (
        "squared_relu", "LayerNorm", True)
    assert (cfg.rotary_percent, cfg.rotary_base, cfg.kv_channels) == (spec["partial"], 5000.0, 16)
    assert (cfg.tie_word_embeddings, cfg.add_bias_linear) == (spec["tie"], spec["bias"])
    logits = _mcore_logits_tp1(case["ckpt"], case["tokens"])
    max_abs = (logits - case["logits"]).abs().max().item()
    print(f"{variant}: TP=1 logits max-abs {max_abs:.2e}")
    assert max_abs <= 1e-4


def test_tp2_logits(nemotron):
    root = next(iter(nemotron.values()))["root"]
    got = _logits_at_tp(root, {n: (c["ckpt"], c["tokens"]) for n, c in nemotron.items()}, 2)
    for name, case in nemotron.items():
        max_abs = (got[name] - case["logits"]).abs().max().item()
        print(f"{name}: TP=2 logits max-abs {max_abs:.2e}")
        assert max_abs <= 1e-4, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_exact(nemotron, variant, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = nemotron[variant]
    out = str(tmp_path / "exported")
    export_hf(case["ckpt"], out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["NemotronForCausalLM"]
    reloaded = _load_hf(out)
    assert reloaded.config.rope_parameters["partial_rotary_factor"] == VARIANTS[variant]["partial"]
    _assert_same_state(case["model"].state_dict(), reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(case["tokens"]).logits, case["logits"])


@pytest.mark.parametrize("fields,value", [
    (dict(hidden_act="gelu"), "gelu"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True"),
    (dict(partial_rotary_factor=0.1), "rotary_percent=0.1"),
])
def test_import_unsupported_nemotron_config(tmp_path, fields, value):
    src, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    base = dict(architectures=["NemotronForCausalLM"], model_type="nemotron", hidden_act="relu2",
                norm_eps=1e-5, head_dim=16, partial_rotary_factor=0.5)
    _write_config(src, **{**base, **fields})
    _assert_one_line_error(lambda: import_hf(src, out), value, out)


def test_export_refuses_squared_relu_without_layernorm1p():
    cfg = tiny_config(activation="squared_relu")
    with pytest.raises(UsageError, match="normalization=RMSNorm .* no Hugging Face equivalent"):
        hf_config_from(cfg, torch.float32)


# ---------------------------------------------------------------- importance and pruning


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 4-layer squared-ReLU / LayerNorm1P / half-RoPE checkpoint, its model and real scores."""
    root = tmp_path_factory.mktemp("nemotron_prune")
    parallel.initialize(1, 1)
    cfg = tiny_config(num_attention_heads=8, num_query_groups=4, kv_channels=16,
                      tie_word_embeddings=False, **NEMOTRON_FIELDS)
    torch.manual_seed(0)
    model = adapter.build_gpt_model(cfg)
    with torch.no_grad():  # the norms start at gamma = 1, beta = 0: make them matter
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.normal_(0.0, 0.3)
    ckpt = str(root / "source")
    io.save_checkpoint(model, cfg, ckpt)
    samples = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(2))
    batches = [{"tokens": samples[i:i + 2, :-1], "labels": samples[i:i + 2, 1:]} for i in (0, 2)]
    scores = estimate_importance(model, cfg, batches, ImportanceConfig())
    yield root, ckpt, model, cfg, scores
    parallel.teardown()


def test_importance_scores_every_axis(source):
    _, _, _, cfg, scores = source
    shapes = {"head": (4, 8), "query_group": (4, 4), "neuron": (4, 128), "channel": (64,),
              "layer_ppl": (4,), "layer_bi": (4,)}
    for key, shape in shapes.items():
        assert tuple(scores[key].shape) == shape, key
        assert torch.isfinite(scores[key]).all() and (scores[key] >= 0).all(), key
    assert (scores["neuron"] > 0).float().mean() > 0.5  # squared ReLU passes positive inputs


@pytest.mark.parametrize("target", [
    {"num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 48},
    {"num_attention_heads": 4, "num_query_groups": 4},
])
def test_pruned_equals_masked_source(source, target):
    root, ckpt, model, cfg, scores = source
    out = str(root / ("w_" + "_".join(f"{k}{v}" for k, v in target.items())))
    plan = prune_checkpoint(ckpt, scores, target, out, head_add_back=False)
    pruned, pruned_cfg = io.load_checkpoint(out)
    assert (pruned_cfg.rotary_percent, pruned_cfg.kv_channels) == (0.5, 16)
    assert pruned_cfg.layernorm_zero_centered_gamma and pruned_cfg.activation == "squared_relu"
    assert sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned_cfg)["total"]
    torch.testing.assert_close(full_logits(pruned, TOKENS), _masked_logits(model, cfg, plan),
                               rtol=0, atol=1e-4)


def test_hidden_and_depth_pruning(source):
    """Norm weights and biases keep the chosen channels of the kept layers; a depth-only prune
    equals the source with those layers skipped."""
    root, ckpt, model, cfg, scores = source
    plan = prune_checkpoint(ckpt, scores, {"hidden_size": 48, "num_layers": 3},
                            str(root / "hidden"))
    pruned, pruned_cfg = io.load_checkpoint(str(root / "hidden"))
    assert sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned_cfg)["total"]
    channels = torch.tensor(plan.channels)
    source_state, pruned_state = model.state_dict(), pruned.state_dict()
    for new, layer_plan in enumerate(plan.layers):
        for part in ("input_layernorm", "pre_mlp_layernorm"):
            for kind in ("weight", "bias"):
                got = pruned_state[f"decoder.layers.{new}.{part}.{kind}"]
                want = source_state[f"decoder.layers.{layer_plan.source_layer}.{part}.{kind}"]
                assert torch.equal(got, want[channels])
    for kind in ("weight", "bias"):
        key = f"decoder.final_layernorm.{kind}"
        assert torch.equal(pruned_state[key], source_state[key][channels])
    assert torch.isfinite(full_logits(pruned, TOKENS)).all()

    depth = prune_checkpoint(ckpt, scores, {"num_layers": 3}, str(root / "depth"))
    dropped = [i for i in range(cfg.num_layers) if i not in depth.kept_layers]
    with skip_layer(model, dropped[0]):
        expected = full_logits(model, TOKENS)
    shallow, _ = io.load_checkpoint(str(root / "depth"))
    torch.testing.assert_close(full_logits(shallow, TOKENS), expected, rtol=0, atol=1e-4)
