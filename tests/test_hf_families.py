"""Every supported Hugging Face family, built from its published ``config.json`` fields shrunk in
width and depth only (GQA ratio, head_dim ratio, RoPE theta and scaling, tying, biases, norm
epsilon kept), with weights at a realistic scale: logits parity with transformers at TP=1 and
TP=2, exact HF -> ours -> HF round trips, importance and a width + depth prune equal to the
masked source, export of pruned shapes, and one-line refusals of what we do not support."""

import contextlib
import json
import logging
import os

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.hf import export_hf, import_hf
from megatron_minitron.hf.mapping import hf_config_from, hf_exportable
from megatron_minitron.importance import ImportanceConfig, estimate_importance, save_scores
from megatron_minitron.importance.depth import skip_layer
from megatron_minitron.model.forward import full_logits
from megatron_minitron.prune import prune_checkpoint
from megatron_minitron.prune.apply import head_columns
from megatron_minitron.testing import save_tiny_checkpoint, tiny_config
from test_hf import (
    _assert_one_line_error,
    _assert_same_state,
    _load_hf,
    _logits_at_tp,
    _run_cli,
    _write_config,
)

transformers = pytest.importorskip("transformers")

VOCAB = 256
SEQ = 48
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)

# Published config.json fields of one model per family; hidden_size, intermediate_size, head
# counts, head_dim, num_hidden_layers and vocab_size are shrunk (real values in the comments),
# everything else is as published.
FAMILIES = {
    # meta-llama/Llama-2-7b-hf: hidden 4096, ffn 11008, 32 heads (MHA), 32 layers
    "llama2": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, max_position_embeddings=4096, rms_norm_eps=1e-05,
        rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
        initializer_range=0.02, pretraining_tp=1, bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-3.1-8B: hidden 4096, ffn 14336, 32 heads, 8 KV heads, head_dim 128
    "llama3.1": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        hidden_size=128, intermediate_size=448, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, max_position_embeddings=131072, rms_norm_eps=1e-05,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=8.0),
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        initializer_range=0.02, pretraining_tp=1, bos_token_id=1, eos_token_id=[2, 3, 4]),
    # meta-llama/Llama-3.2-1B: hidden 2048, ffn 8192, 32 heads, 8 KV heads, head_dim 64, tied
    "llama3.2": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        hidden_size=64, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
        head_dim=8, num_hidden_layers=2, max_position_embeddings=131072, rms_norm_eps=1e-05,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=32.0),
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        initializer_range=0.02, pretraining_tp=1, bos_token_id=1, eos_token_id=2),
    # lmsys/longchat-7b-16k (a Llama fine-tuned to 16k with linear RoPE scaling, legacy "type"
    # key): hidden 4096, ffn 11008, 32 heads (MHA)
    "llama-linear-rope": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, max_position_embeddings=16384, rms_norm_eps=1e-06,
        rope_scaling={"type": "linear", "factor": 8.0}, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    # mistralai/Mistral-Nemo-Base-2407: hidden 5120, 32 heads of 128 (4096 != hidden), 8 KV
    "mistral-nemo": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
        hidden_size=80, intermediate_size=224, num_attention_heads=8, num_key_value_heads=2,
        head_dim=8, num_hidden_layers=2, max_position_embeddings=1024000, rms_norm_eps=1e-05,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen2.5-0.5B: hidden 896, ffn 4864, 14 heads of 64, 2 KV heads, QKV bias, tied
    "qwen2.5": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
        hidden_size=112, intermediate_size=608, num_attention_heads=14, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=32768, rms_norm_eps=1e-06,
        rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
        max_window_layers=2, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen3-0.6B: hidden 1024, ffn 3072, 16 heads of 128 (2048 = 2 x hidden), 8 KV heads,
    # per-head q/k RMSNorm, tied
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
        hidden_size=64, intermediate_size=192, num_attention_heads=8, num_key_value_heads=4,
        head_dim=16, num_hidden_layers=2, max_position_embeddings=40960, rms_norm_eps=1e-06,
        rope_theta=1000000.0, rope_scaling=None, attention_bias=False, sliding_window=None,
        use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    # nvidia/Minitron-4B-Base: hidden 3072, ffn 9216, 24 heads of 128, 8 KV heads, half RoPE
    "nemotron": dict(
        architectures=["NemotronForCausalLM"], model_type="nemotron", hidden_act="relu2",
        hidden_size=96, intermediate_size=288, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, max_position_embeddings=4096, norm_eps=1e-05,
        rope_theta=10000, partial_rotary_factor=0.5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, initializer_range=0.0134,
        bos_token_id=1, eos_token_id=2),
}
for _fields in FAMILIES.values():
    _fields["vocab_size"] = VOCAB


def _expected(fields):
    """What our ModelConfig must hold for a family's config.json."""
    heads = fields["num_attention_heads"]
    rope = fields.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    return dict(
        kv_channels=fields.get("head_dim") or fields["hidden_size"] // heads,
        num_query_groups=fields["num_key_value_heads"],
        tie_word_embeddings=fields["tie_word_embeddings"],
        add_qkv_bias=fields["model_type"] == "qwen2",
        qk_layernorm=fields["model_type"] == "qwen3",
        rope_scaling=rope_type == "llama3",
        rope_scaling_factor=rope["factor"] if rope_type == "llama3" else 8.0,
        seq_len_interpolation_factor=rope["factor"] if rope_type == "linear" else None,
        rotary_base=float(fields.get("rope_theta", 10000.0)),
        rotary_percent=fields.get("partial_rotary_factor", 1.0))


def _make_family(folder, fields, seed=0):
    """Saves a random model of ``fields`` with the config.json written exactly as published."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(fields, handle)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    zero_centred = fields["model_type"] == "nemotron"  # LayerNorm1P stores gamma - 1
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and not zero_centred:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2 if "norm" in name else 0.08)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(fields, handle)  # the published format (rope_scaling, not rope_parameters)
    return model.eval()


def import_families(root, families, make_family, vocab, seq):
    """{family: dict(hf, ckpt, model, tokens, logits, root)}: each of ``families`` (name →
    config.json fields) made by ``make_family(folder, fields, seed)`` and imported once."""
    out = {}
    for index, (name, fields) in enumerate(families.items()):
        hf_dir, ckpt = str(root / name / "hf"), str(root / name / "ckpt")
        model = make_family(hf_dir, fields, seed=index)
        import_hf(hf_dir, ckpt)
        tokens = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(tokens).logits  # [2, seq, vocab]
        out[name] = dict(hf=hf_dir, ckpt=ckpt, model=model, tokens=tokens, logits=logits,
                         root=root)
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: dict(hf, ckpt, model, tokens, logits, root)}, each imported once."""
    return import_families(tmp_path_factory.mktemp("families"), FAMILIES, _make_family,
                           VOCAB, SEQ)


def _logits_tp1(ckpt, tokens):
    with parallel.parallel_context(1, 1):
        model, _ = io.load_checkpoint(ckpt)
        return full_logits(model, tokens)


# ---------------------------------------------------------------- parity and round trips


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_and_tp1_logits(families, family):
    case = families[family]
    cfg = io.load_config(case["ckpt"])
    for key, value in _expected(FAMILIES[family]).items():
        assert getattr(cfg, key) == value, key
    max_abs = (_logits_tp1(case["ckpt"], case["tokens"]) - case["logits"]).abs().max().item()
    print(f"{family}: TP=1 logits max-abs {max_abs:.2e}")
    assert max_abs <= 1e-4


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "llama-linear-rope"])
def test_rope_scaling_matters(families, family):
    """Without its RoPE scaling the same model's logits move far beyond the parity
    tolerance, so the parity test above does test the scaling."""
    case = families[family]
    plain = transformers.AutoConfig.from_pretrained(case["hf"], local_files_only=True)
    plain.rope_parameters = {"rope_type": "default",
                             "rope_theta": FAMILIES[family].get("rope_theta", 10000.0)}
    unscaled = transformers.AutoModelForCausalLM.from_config(plain).eval()
    unscaled.load_state_dict(case["model"].state_dict())
    with torch.no_grad():
        shift = (unscaled(case["tokens"]).logits - case["logits"]).abs().max().item()
    print(f"{family}: logits shift without rope scaling {shift:.2e}")
    assert shift > 1e-2


def check_tp2_logits(families):
    """Every family's imported checkpoint gives transformers' logits at TP=2 (≤ 1e-4)."""
    root = next(iter(families.values()))["root"]
    got = _logits_at_tp(root, {n: (c["ckpt"], c["tokens"]) for n, c in families.items()}, 2)
    for name, case in families.items():
        max_abs = (got[name] - case["logits"]).abs().max().item()
        print(f"{name}: TP=2 logits max-abs {max_abs:.2e}")
        assert max_abs <= 1e-4, name


def test_tp2_logits(families):
    check_tp2_logits(families)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_exact(families, family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case, fields = families[family], FAMILIES[family]
    out = str(tmp_path / "exported")
    export_hf(case["ckpt"], out)
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["architectures"] == fields["architectures"]
    reloaded = _load_hf(out)
    source = transformers.AutoConfig.from_pretrained(case["hf"], local_files_only=True)

    def rope(config):  # the legacy "type" key survives next to "rope_type" in the source
        return {k: v for k, v in config.rope_parameters.items() if k != "type"}

    assert rope(reloaded.config) == rope(source)
    head_dim = _expected(fields)["kv_channels"]  # Qwen2's config has no head_dim field
    assert getattr(reloaded.config, "head_dim", None) in (head_dim, None)
    assert getattr(source, "head_dim", None) in (head_dim, None)
    _assert_same_state(case["model"].state_dict(), reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(case["tokens"]).logits, case["logits"])


# ---------------------------------------------------------------- importance and pruning


def _width_depth_target(cfg):
    """Half the MLP, half the heads (inside each group when groups hold an even number, else
    whole groups) and one layer fewer."""
    per_group = cfg.heads_per_group
    groups = cfg.num_query_groups if per_group % 2 == 0 else cfg.num_query_groups // 2
    return {"num_layers": cfg.num_layers - 1, "ffn_hidden_size": cfg.ffn_hidden_size // 2,
            "num_attention_heads": cfg.num_attention_heads // 2, "num_query_groups": groups}


def _masked_logits(model, cfg, plan, tokens):
    """Source logits with pruned heads and neurons zeroed at their outputs and the dropped
    layers skipped."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    layers = adapter.decoder_layers(model)
    with torch.no_grad():
        for layer_plan in plan.layers:
            layer = layers[layer_plan.source_layer]
            pruned_heads = [h for h in range(cfg.num_attention_heads) if h not in layer_plan.heads]
            proj = adapter.attention_output_projection(layer).weight  # [h, heads*d]
            proj[:, head_columns(plan, pruned_heads)] = 0
            pruned = [n for n in range(cfg.ffn_hidden_size) if n not in layer_plan.neurons]
            adapter.mlp_fc2(layer).weight[:, pruned] = 0  # [h, ffn]
    try:
        with contextlib.ExitStack() as stack:
            for index in range(cfg.num_layers):
                if index not in plan.kept_layers:
                    stack.enter_context(skip_layer(model, index))
            return full_logits(model, tokens)
    finally:
        model.load_state_dict(saved, strict=False)


def _scores(model, cfg, tokens):
    batches = [{"tokens": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:]} for i in (0, 1)]
    scores = estimate_importance(model, cfg, batches, ImportanceConfig())
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    shapes = {"head": (cfg.num_layers, heads), "query_group": (cfg.num_layers, groups),
              "neuron": (cfg.num_layers, cfg.ffn_hidden_size), "channel": (cfg.hidden_size,),
              "layer_ppl": (cfg.num_layers,)}
    for key, shape in shapes.items():
        assert tuple(scores[key].shape) == shape, key
        assert torch.isfinite(scores[key]).all() and scores[key].abs().sum() > 0, key
    return scores


@pytest.mark.parametrize("family", list(FAMILIES))
def test_width_depth_prune_equals_masked_source(families, family, tmp_path, monkeypatch):
    """Importance on the imported model, then a width + depth prune: the pruned model equals
    the masked source, and its Hugging Face export gives the same logits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = families[family]
    out, exported = str(tmp_path / "pruned"), str(tmp_path / "pruned_hf")
    with parallel.parallel_context(1, 1):
        model, cfg = io.load_checkpoint(case["ckpt"])
        scores = _scores(model, cfg, case["tokens"])
        plan = prune_checkpoint(case["ckpt"], scores, _width_depth_target(cfg), out,
                                head_add_back=False)
        pruned, pruned_cfg = io.load_checkpoint(out)
        assert sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned_cfg)["total"]
        for key in ("kv_channels", "rope_scaling", "rope_scaling_factor",
                    "seq_len_interpolation_factor", "qk_layernorm",
                    "add_qkv_bias", "rotary_percent", "tie_word_embeddings"):
            assert getattr(pruned_cfg, key) == getattr(cfg, key), key
        logits = full_logits(pruned, case["tokens"])
        expected = _masked_logits(model, cfg, plan, case["tokens"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    export_hf(out, exported)
    with torch.no_grad():
        hf_logits = _load_hf(exported)(case["tokens"]).logits
    assert (hf_logits - logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family,hidden,architecture", [
    ("llama3.1", 100, "MistralForCausalLM"),  # LlamaConfig refuses 100 % 8 heads
    ("qwen2.5", 100, "Qwen2ForCausalLM"),
    ("qwen3", 52, "Qwen3ForCausalLM"),
    ("nemotron", 88, "NemotronForCausalLM"),
])
def test_export_of_hidden_pruned_shape(families, family, hidden, architecture, tmp_path,
                                       monkeypatch):
    """A hidden size that is no multiple of the heads exports to a class transformers loads;
    the per-head q/k norms are left whole by hidden-size pruning."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = families[family]
    out, exported = str(tmp_path / "pruned"), str(tmp_path / "pruned_hf")
    with parallel.parallel_context(1, 1):
        model, cfg = io.load_checkpoint(case["ckpt"])
        scores = _scores(model, cfg, case["tokens"])
        prune_checkpoint(case["ckpt"], scores, {"hidden_size": hidden}, out)
        pruned, pruned_cfg = io.load_checkpoint(out)
        assert pruned_cfg.hidden_size % pruned_cfg.num_attention_heads != 0
        assert hf_exportable(pruned_cfg) is None
        logits = full_logits(pruned, case["tokens"])
        for source_layer, pruned_layer in zip(adapter.decoder_layers(model),
                                              adapter.decoder_layers(pruned)):
            source_norms = adapter.attention_qk_norms(source_layer)
            pruned_norms = adapter.attention_qk_norms(pruned_layer)
            assert len(source_norms) == len(pruned_norms) == (2 if cfg.qk_layernorm else 0)
            for want, got in zip(source_norms, pruned_norms):
                assert torch.equal(got.weight, want.weight)
    export_hf(out, exported)
    assert json.load(open(os.path.join(exported, "config.json")))["architectures"] == [
        architecture]
    with torch.no_grad():
        hf_logits = _load_hf(exported)(case["tokens"]).logits
    assert (hf_logits - logits).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- export refusals and warnings


def test_hf_exportable():
    smol_pruned = tiny_config(hidden_size=448, num_attention_heads=6, num_query_groups=3,
                              kv_channels=64, ffn_hidden_size=1536)  # SmolLM2 at hidden 448
    assert hf_exportable(smol_pruned) is None
    assert hf_config_from(smol_pruned, torch.float32).architectures == ["MistralForCausalLM"]
    assert hf_config_from(tiny_config(), torch.float32).architectures == ["LlamaForCausalLM"]
    reason = hf_exportable(tiny_config(activation="gelu", normalization="LayerNorm"))
    assert "activation=gelu" in reason and "\n" not in reason
    reason = hf_exportable(tiny_config(qk_layernorm=True, add_qkv_bias=True))
    assert "qk_layernorm=True with add_qkv_bias=True" in reason


def test_config_backward_compatible():
    old = tiny_config().to_dict()
    for key in ("rope_scaling", "rope_scaling_factor", "seq_len_interpolation_factor",
                "qk_layernorm"):
        del old[key]  # a minitron_config.json written before these fields
    loaded = ModelConfig.from_dict(old)
    assert not loaded.rope_scaling and not loaded.qk_layernorm
    assert loaded.seq_len_interpolation_factor is None
    qwen3 = tiny_config(qk_layernorm=True, rope_scaling=True, rope_scaling_factor=32.0)
    assert ModelConfig.from_dict(json.loads(qwen3.to_json())) == qwen3
    assert (count_parameters(qwen3)["total"] - count_parameters(tiny_config())["total"]
            == 4 * 2 * 16)  # 4 layers x (q + k norm) x head_dim
    with pytest.raises(ValueError, match="rope_scaling_factor=0.5"):
        tiny_config(rope_scaling=True, rope_scaling_factor=0.5)
    with pytest.raises(ValueError, match="one RoPE scaling"):
        tiny_config(rope_scaling=True, seq_len_interpolation_factor=4.0)


def test_export_refused_before_writing(tmp_path, monkeypatch):
    """When the installed transformers refuses every class that could hold the shape, export
    fails in one line naming the sizes and writes nothing."""
    import importlib

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    save_tiny_checkpoint(ckpt, hidden_size=62, kv_channels=16)
    hf = importlib.import_module("transformers")  # the module export_hf will import

    def refuse(**kwargs):
        raise ValueError("Class validation error:\n    ValueError: The hidden size (62) is not a "
                         "multiple of the number of attention heads (4).")

    for name in ("LlamaConfig", "MistralConfig"):
        monkeypatch.setattr(hf, name, refuse)
    message = _assert_one_line_error(lambda: export_hf(ckpt, out), "hidden_size=62", out)
    assert "LlamaForCausalLM: ValueError: The hidden size (62)" in message
    assert "MistralForCausalLM" in message
    assert os.listdir(tmp_path) == ["ckpt"]


def test_prune_warns_when_target_cannot_be_exported(tmp_path, caplog):
    from megatron_minitron.importance import random_scores

    ckpt, scores = str(tmp_path / "ckpt"), str(tmp_path / "scores.pt")
    save_tiny_checkpoint(ckpt, activation="gelu", normalization="LayerNorm")
    save_scores(random_scores(io.load_config(ckpt)), scores)
    with caplog.at_level(logging.WARNING, logger="megatron_minitron"):
        assert _run_cli(["prune", "--load", ckpt, "--scores", scores, "--target",
                         "ffn_hidden_size=64", "--output", str(tmp_path / "pruned")]) == 0
    warnings = [r.getMessage() for r in caplog.records if "export-hf" in r.getMessage()]
    assert len(warnings) == 1 and "activation=gelu" in warnings[0], warnings
    assert "\n" not in warnings[0]


def test_search_names_candidates_that_cannot_be_exported(caplog):
    from megatron_minitron.search import enumerate_candidates
    from megatron_minitron.search.runner import warn_if_not_exportable

    for source, refused in ((tiny_config(activation="gelu", normalization="LayerNorm"), 2),
                            (tiny_config(), 0)):
        budget = count_parameters(source)["total"]
        candidates, _ = enumerate_candidates(source, {"ffn_hidden_size": [96, 128]}, budget, 0.5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron_minitron"):
            assert len(warn_if_not_exportable(candidates)) == refused
        lines = [r.getMessage() for r in caplog.records if "export-hf" in r.getMessage()]
        assert len(lines) == (1 if refused else 0)
        if refused:
            assert f"{refused} of 2 candidates" in lines[0] and "activation=gelu" in lines[0]


# ---------------------------------------------------------------- families still refused


@pytest.mark.parametrize("fields,value", [
    (dict(rope_theta=500000.0, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                  original_max_position_embeddings=32)),
     "rope_type='yarn'"),
    (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type='dynamic'"),
    (dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=8.0, high_freq_factor=2.0)),
     "high_freq_factor=2.0"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
          sliding_window=64, max_window_layers=0), "sliding_window=64"),
    (dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
          attention_bias=True), "attention_bias=True"),
    (dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
          n_routed_experts=8), "DeepseekV3ForCausalLM"),  # a MoE family not in test_hf_moe
    (dict(architectures=["GemmaForCausalLM"], model_type="gemma", head_dim=16),
     "GemmaForCausalLM"),
])
def test_refused_families_are_one_line(tmp_path, fields, value):
    src, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    _write_config(src, **fields)
    _assert_one_line_error(lambda: import_hf(src, out), value, out)
