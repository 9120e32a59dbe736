"""Hugging Face mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE), built from their
published ``config.json`` fields shrunk in width (hidden, MLP, heads, experts) and depth only,
with weights at a scale where routing is decisive: logits parity with transformers at TP=1,
TP=2 and EP=2, the router normalisation each family needs, a wrong expert order caught,
exact HF -> ours -> HF round trips from either expert layout, and one-line refusals."""

import json
import os

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.hf import export_hf, import_hf
from megatron_minitron.hf import mapping
from megatron_minitron.hf.convert import _load_hf_state
from megatron_minitron.hf.mapping import hf_config_from, hf_exportable
from megatron_minitron.model.forward import full_logits
from megatron_minitron.testing import spawn, tiny_moe_config
from test_hf import (
    _assert_one_line_error,
    _assert_same_state,
    _load_hf,
    _run_cli,
)

transformers = pytest.importorskip("transformers")

VOCAB = 256
SEQ = 40

# Published config.json fields; hidden_size, intermediate sizes, head counts, head_dim, the
# number of experts, num_hidden_layers and vocab_size are shrunk (real values in the
# comments), token ids moved into the small vocabulary, everything else is as published.
FAMILIES = {
    # mistralai/Mixtral-8x7B-v0.1: hidden 4096, ffn 14336, 32 heads of 128, 8 KV heads,
    # 32 layers, 8 experts, top 2
    "mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
        hidden_size=64, intermediate_size=224, num_attention_heads=8, num_key_value_heads=2,
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-05, rope_theta=1000000.0,
        router_aux_loss_coef=0.02, sliding_window=None, tie_word_embeddings=False,
        attention_dropout=0.0, output_router_logits=False, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen1.5-MoE-A2.7B: hidden 2048, ffn 5632, expert 1408, shared expert 5632,
    # 16 heads (MHA), 24 layers, 60 experts, top 4, no top-k renormalisation
    "qwen1.5-moe": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_act="silu",
        hidden_size=64, intermediate_size=176, moe_intermediate_size=44,
        shared_expert_intermediate_size=176, num_attention_heads=8, num_key_value_heads=8,
        num_hidden_layers=2, num_experts=12, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, max_position_embeddings=8192, max_window_layers=21,
        rms_norm_eps=1e-06, rope_theta=1000000.0, router_aux_loss_coef=0.001,
        sliding_window=32768, use_sliding_window=False, tie_word_embeddings=False,
        attention_dropout=0.0, output_router_logits=False, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen3-30B-A3B: hidden 2048, ffn 6144, expert 768, 32 heads of 128 (4096 = 2 x
    # hidden), 4 KV heads, 48 layers, 128 experts, top 8, renormalised
    "qwen3-moe": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_act="silu",
        hidden_size=64, intermediate_size=192, moe_intermediate_size=24,
        num_attention_heads=16, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
        num_experts=16, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, max_window_layers=48,
        rms_norm_eps=1e-06, rope_theta=1000000.0, rope_scaling=None, attention_bias=False,
        router_aux_loss_coef=0.001, sliding_window=None, use_sliding_window=False,
        tie_word_embeddings=False, attention_dropout=0.0, output_router_logits=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
}
# Variants of the published configs for the options those leave at one value: dense layers
# from decoder_sparse_step and mlp_only_layers, the other norm_topk_prob, tied embeddings.
FAMILIES["qwen2-moe-sparse-step"] = dict(
    FAMILIES["qwen1.5-moe"], num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=True)
FAMILIES["qwen3-moe-mlp-only"] = dict(
    FAMILIES["qwen3-moe"], num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False,
    tie_word_embeddings=True)
for _fields in FAMILIES.values():
    _fields["vocab_size"] = VOCAB

EXPECTED = {  # what our ModelConfig must hold for each
    "mixtral": dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=224,
                    moe_layer_freq=1, moe_router_pre_softmax=False, moe_aux_loss_coeff=0.02,
                    moe_shared_expert_intermediate_size=None, add_qkv_bias=False,
                    qk_layernorm=False, num_query_groups=2, kv_channels=8),
    "qwen1.5-moe": dict(num_moe_experts=12, moe_router_topk=4, moe_ffn_hidden_size=44,
                        ffn_hidden_size=176, moe_layer_freq=1, moe_router_pre_softmax=True,
                        moe_shared_expert_intermediate_size=176, moe_shared_expert_gate=True,
                        moe_aux_loss_coeff=0.001, add_qkv_bias=True, qk_layernorm=False),
    "qwen3-moe": dict(num_moe_experts=16, moe_router_topk=8, moe_ffn_hidden_size=24,
                      ffn_hidden_size=192, moe_layer_freq=1, moe_router_pre_softmax=False,
                      moe_shared_expert_intermediate_size=None, qk_layernorm=True,
                      add_qkv_bias=False, kv_channels=8, num_query_groups=2),
    "qwen2-moe-sparse-step": dict(moe_layer_freq=[0, 1, 0, 1], moe_router_pre_softmax=False),
    "qwen3-moe-mlp-only": dict(moe_layer_freq=[1, 0, 1], moe_router_pre_softmax=True,
                               tie_word_embeddings=True),
}


def _make_family(folder, fields, seed):
    """Saves a random model of ``fields`` with the config.json written as published. Router
    weights are large (routing logits with a spread of several units), so a token's top k is
    decided by a wide margin and a wrong router or expert mapping moves the logits."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(fields, handle)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):  # the router [E, h]
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(fields, handle)
    return model.eval()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: dict(hf, ckpt, model, tokens, logits, root)}, each imported once."""
    from test_hf_families import import_families

    return import_families(tmp_path_factory.mktemp("moe_families"), FAMILIES, _make_family,
                           VOCAB, SEQ)


def _logits_with(ckpt, tokens, edit=None, **changes):
    """TP=1 logits of checkpoint ``ckpt``, its config changed by ``changes`` and its model by
    ``edit(model)``."""
    with parallel.parallel_context(1, 1):
        model, cfg = io.load_checkpoint(ckpt)
        if changes:
            changed = adapter.build_gpt_model(cfg.replace(**changes), use_te=False,
                                              init_weights=False)
            changed.load_state_dict(model.state_dict())
            model = changed
        if edit is not None:
            edit(model)
        return full_logits(model, tokens)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_and_tp1_logits(families, family):
    case = families[family]
    cfg = io.load_config(case["ckpt"])
    for key, value in EXPECTED[family].items():
        assert getattr(cfg, key) == value, key
    assert cfg.extra["hf_architecture"] == FAMILIES[family]["architectures"][0]
    assert case["logits"].std() > 0.3  # logits at a scale where a wrong mapping shows
    max_abs = (_logits_with(case["ckpt"], case["tokens"]) - case["logits"]).abs().max().item()
    print(f"{family}: TP=1 logits max-abs {max_abs:.2e}")
    assert max_abs <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_router_normalisation_matters(families, family):
    """The other ``moe_router_pre_softmax`` moves the logits far beyond the parity tolerance,
    so the parity above pins Mixtral and norm_topk_prob=True to the softmax over the top k
    and norm_topk_prob=False to mcore's pre-softmax routing."""
    case = families[family]
    flipped = not EXPECTED[family].get("moe_router_pre_softmax", False)
    logits = _logits_with(case["ckpt"], case["tokens"], moe_router_pre_softmax=flipped)
    shift = (logits - case["logits"]).abs().max().item()
    print(f"{family}: logits shift with moe_router_pre_softmax={flipped}: {shift:.2e}")
    assert shift > 1e-2


def _swap_experts(model):
    """Swaps the weights of experts 0 and 1 in the first MoE layer (the router unchanged)."""
    layer = next(layer for layer in adapter.decoder_layers(model) if adapter.is_moe_layer(layer))
    first, second = adapter.local_experts(layer)[:2]
    with torch.no_grad():
        for name in ("linear_fc1", "linear_fc2"):
            a, b = getattr(first, name).weight, getattr(second, name).weight
            saved = a.clone()
            a.copy_(b)
            b.copy_(saved)


def _swap_gate_up(model):
    """Swaps the gate and up halves of every routed expert's fc1 in the first MoE layer."""
    layer = next(layer for layer in adapter.decoder_layers(model) if adapter.is_moe_layer(layer))
    with torch.no_grad():
        for expert in adapter.local_experts(layer):
            gate, up = torch.chunk(expert.linear_fc1.weight.clone(), 2, dim=0)
            expert.linear_fc1.weight.copy_(torch.cat([up, gate]))


@pytest.mark.parametrize("family", ["mixtral", "qwen1.5-moe", "qwen3-moe"])
@pytest.mark.parametrize("edit", [_swap_experts, _swap_gate_up], ids=["experts", "gate_up"])
def test_wrong_expert_mapping_is_caught(families, family, edit):
    case = families[family]
    shift = (_logits_with(case["ckpt"], case["tokens"], edit=edit)
             - case["logits"]).abs().max().item()
    print(f"{family}: logits shift with {edit.__name__}: {shift:.2e}")
    assert shift > 1e-2


def test_tp2_logits(families):
    from test_hf_families import check_tp2_logits

    check_tp2_logits(families)


def _logits_at_ep(jobs, ep):
    """Spawned on every rank: ``jobs`` is a list of (checkpoint, tokens file, logits file)."""
    parallel.initialize(1, 1, ep=ep)
    for ckpt, tokens_file, logits_file in jobs:
        model, cfg = io.load_checkpoint(ckpt)
        for layer in adapter.decoder_layers(model):
            if adapter.is_moe_layer(layer):
                assert len(adapter.local_experts(layer)) == cfg.num_moe_experts // ep
        logits = full_logits(model, torch.load(tokens_file), 2)
        if parallel.is_rank0():
            torch.save(logits, logits_file)


def test_ep2_logits(families):
    root = next(iter(families.values()))["root"]
    jobs = []
    for name, case in families.items():
        tokens_file = str(root / f"{name}.ep.tokens.pt")
        logits_file = str(root / f"{name}.ep2.pt")
        torch.save(case["tokens"], tokens_file)
        jobs.append((case["ckpt"], tokens_file, logits_file))
    spawn(_logits_at_ep, 2, jobs, 2)
    for (name, case), job in zip(families.items(), jobs):
        max_abs = (torch.load(job[2]) - case["logits"]).abs().max().item()
        print(f"{name}: EP=2 logits max-abs {max_abs:.2e}")
        assert max_abs <= 1e-4, name


# ---------------------------------------------------------------- round trips


def _file_keys(folder):
    from safetensors import safe_open

    keys = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as handle:
                keys |= set(handle.keys())
    return keys


MOE_CONFIG_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok",
                     "intermediate_size", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                     "mlp_only_layers", "router_aux_loss_coef", "qkv_bias", "tie_word_embeddings",
                     "rms_norm_eps", "num_key_value_heads")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_exact(families, family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case, fields = families[family], FAMILIES[family]
    out = str(tmp_path / "exported")
    export_hf(case["ckpt"], out)
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["architectures"] == fields["architectures"]
    assert _file_keys(out) == _file_keys(case["hf"])  # the per-expert names save_pretrained uses
    reloaded = _load_hf(out)
    source = transformers.AutoConfig.from_pretrained(case["hf"], local_files_only=True)
    for name in MOE_CONFIG_FIELDS:
        if hasattr(source, name):
            assert getattr(reloaded.config, name) == getattr(source, name), name
    assert reloaded.config.rope_parameters == source.rope_parameters
    head_dim = io.load_config(case["ckpt"]).kv_channels  # Mixtral's config may leave it unset
    assert getattr(source, "head_dim", None) in (head_dim, None)
    assert getattr(reloaded.config, "head_dim", None) in (head_dim, None)
    _assert_same_state(case["model"].state_dict(), reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(case["tokens"]).logits, case["logits"])


def test_cli_round_trip_in_bf16(families, tmp_path, monkeypatch):
    """``minitron import-hf`` then ``export-hf --dtype bfloat16``: the bf16 weights of the
    source, under the source's class."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = families["qwen2-moe-sparse-step"]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "exported")
    assert _run_cli(["import-hf", "--hf-path", case["hf"], "--output", ckpt]) == 0
    assert _run_cli(["export-hf", "--load", ckpt, "--output", out, "--dtype", "bfloat16"]) == 0
    reloaded = _load_hf(out)
    assert reloaded.config.architectures == ["Qwen2MoeForCausalLM"]
    want = {k: v.to(torch.bfloat16).float() for k, v in case["model"].state_dict().items()}
    _assert_same_state(want, reloaded.state_dict())


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe-sparse-step"])
def test_either_expert_layout_imports(families, family):
    """The per-expert tensors of the safetensors files (the Hub layout, and what older
    transformers hold in memory) and transformers 5's fused 3-D experts load the same model."""
    from safetensors.torch import load_file

    case = families[family]
    fused = _load_hf_state(case["hf"], None, "test")
    assert any(k.endswith("experts.gate_up_proj") for k in fused)  # transformers 5 in memory
    files = [f for f in os.listdir(case["hf"]) if f.endswith(".safetensors")]
    per_expert = {k: v for f in files for k, v in load_file(os.path.join(case["hf"], f)).items()}
    assert any(".experts.0." in k for k in per_expert)
    with parallel.parallel_context(1, 1):
        want, cfg = io.load_checkpoint(case["ckpt"])
        want = want.state_dict()
        for state in (fused, per_expert):
            model = adapter.build_gpt_model(cfg, use_te=False, init_weights=False)
            mapping.load_hf_state(model, cfg, dict(state), "test")
            got = model.state_dict()
            for key, tensor in want.items():
                if torch.is_tensor(tensor) and not key.endswith("_extra_state"):
                    assert torch.equal(got[key], tensor), key


# ---------------------------------------------------------------- export choices and refusals


def test_export_architecture_choice():
    """A shared expert means Qwen2-MoE, q/k norms Qwen3-MoE, neither Mixtral; what none of
    them holds is refused in one line naming the field."""
    qwen2 = tiny_moe_config(add_qkv_bias=True, moe_router_pre_softmax=True)
    config = hf_config_from(qwen2, torch.float32)
    assert config.architectures == ["Qwen2MoeForCausalLM"]
    assert (config.decoder_sparse_step, config.mlp_only_layers) == (1, [1])
    assert config.norm_topk_prob is False and config.shared_expert_intermediate_size == 48
    assert hf_config_from(tiny_moe_config(), torch.float32).qkv_bias is False  # transformers 5
    plain = dict(moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False)
    qwen3 = tiny_moe_config(qk_layernorm=True, moe_layer_freq=[0, 1, 0, 1], **plain)
    config = hf_config_from(qwen3, torch.float32)
    assert config.architectures == ["Qwen3MoeForCausalLM"]
    assert (config.decoder_sparse_step, config.mlp_only_layers) == (2, [])
    mixtral = tiny_moe_config(moe_layer_freq=1, **plain)
    config = hf_config_from(mixtral, torch.float32)
    assert config.architectures == ["MixtralForCausalLM"]
    assert config.intermediate_size == mixtral.moe_ffn_hidden_size
    for cfg, value in (
            (tiny_moe_config(moe_shared_expert_gate=False), "moe_shared_expert_gate=False"),
            (tiny_moe_config(**plain), "moe_layer_freq=[1, 0, 1, 1]"),
            (tiny_moe_config(moe_layer_freq=1, moe_router_pre_softmax=True, **plain),
             "moe_router_pre_softmax=True"),
            (tiny_moe_config(add_qkv_bias=True, moe_layer_freq=1, **plain),
             "add_qkv_bias=True without a shared expert"),
            (tiny_moe_config(qk_layernorm=True), "qk_layernorm=True with a shared expert"),
            (tiny_moe_config(activation="gelu", moe_layer_freq=1, **plain), "activation=gelu")):
        reason = hf_exportable(cfg)
        assert reason is not None and value in reason and "\n" not in reason, reason


def _write_moe_config(folder, family, **changes):
    fields = dict(FAMILIES[family], **changes)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(fields, handle)


@pytest.mark.parametrize("family,changes,value", [
    ("mixtral", dict(sliding_window=4096), "sliding_window=4096"),
    ("mixtral", dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size=64"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("mixtral", dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    ("qwen1.5-moe", dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),
     "sliding_window=64"),
    ("qwen1.5-moe", dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size=0"),
    ("qwen3-moe", dict(mlp_only_layers=[0, 1]), "leaves no mixture-of-experts layer"),
    ("qwen3-moe", dict(decoder_sparse_step=3), "leaves no mixture-of-experts layer"),
    ("qwen3-moe", dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    ("qwen3-moe", dict(attention_bias=True), "attention_bias=True"),
    ("qwen3-moe", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                         original_max_position_embeddings=32768)),
     "rope_type='yarn'"),
])
def test_refused_moe_configs_are_one_line(tmp_path, family, changes, value):
    src, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    _write_moe_config(src, family, **changes)
    _assert_one_line_error(lambda: import_hf(src, out), value, out)
