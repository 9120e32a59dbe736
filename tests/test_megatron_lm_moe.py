"""Megatron-LM mixture-of-experts checkpoints: the saved args map onto our MoE config and back,
weights saved at TP=1 x EP=1, TP=1 x EP=2 and TP=2 x EP=2 (Transformer Engine's key layout) or
by legacy grouped-GEMM experts load with the same logits at TP=1 and TP=2 x EP=2, our
--output-format megatron loads in mcore under either spec, and what we do not build is refused
before any weight is read."""

import argparse
import os

import pytest
import torch

from megatron_minitron.cli import main as cli_main
from megatron_minitron.errors import UsageError
from megatron_minitron.testing import spawn, tiny_moe_config

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
ITERATION = "iter_0000050"


def moe_args(**changes) -> argparse.Namespace:
    """The args Megatron-LM's pretrain_gpt.py saves for ``tiny_moe_config(moe_aux_loss_coeff=
    1e-3)`` trained with grouped-GEMM experts at EP=2."""
    args = argparse.Namespace(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16,
        max_position_embeddings=128, seq_length=128, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        normalization="RMSNorm", norm_epsilon=1e-5, apply_layernorm_1p=False, swiglu=True,
        squared_relu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=True, padded_vocab_size=256,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent/tokenizer",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, ckpt_format="torch_dist",
        init_method_std=0.02, num_experts=6, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
        moe_shared_expert_overlap=False, moe_layer_freq=[1, 0, 1, 1],
        moe_router_pre_softmax=False, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-3, moe_z_loss_coeff=1e-3, moe_input_jitter_eps=None,
        moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False, moe_router_bias_update_rate=1e-3,
        moe_router_num_groups=None, moe_router_group_topk=None, moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True,
        moe_use_legacy_grouped_gemm=False, moe_permute_fusion=True,
        moe_expert_capacity_factor=None, moe_pad_expert_input_to_capacity=False,
        moe_token_drop_policy="probs", moe_layer_recompute=False,
        expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def _config(**changes):
    return tiny_moe_config(**dict({"moe_aux_loss_coeff": 1e-3}, **changes))


def te_keyed_spec(cfg, config):
    """Our local MoE layers under the checkpoint keys of Megatron-LM's Transformer Engine spec:
    the input norm fused into linear_qkv; the pre-MLP norm fused into linear_fc1 in dense
    layers and a separate ``pre_mlp_layernorm`` (TENorm) in MoE layers."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_minitron import adapter

    specs = []
    for moe in cfg.moe_layers():
        keys = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        if not moe:
            keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        specs.append(adapter.with_submodules(adapter.local_layer_spec(cfg, moe),
                                             sharded_state_dict_keys_map=keys))
    return TransformerBlockSubmodules(
        layer_specs=specs, layer_norm=adapter.local_layer_spec(cfg).submodules.input_layernorm)


def _save_megatron_lm(folder_root, model, args):
    """Saves ``model`` as megatron/training/checkpointing.py does (collective)."""
    from megatron.core import dist_checkpointing

    from megatron_minitron import parallel

    folder = os.path.join(folder_root, ITERATION)
    if parallel.is_rank0():
        os.makedirs(folder)
    parallel.barrier()
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": 50,
             "checkpoint_version": 3.0}
    dist_checkpointing.save(state, folder)
    if parallel.is_rank0():
        with open(os.path.join(folder_root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("50")
    parallel.barrier()


def _save_like_megatron_lm(ours, save_dir, tp, ep):
    """Our checkpoint's weights saved at TP=``tp``, EP=``ep`` under Megatron-LM's TE key
    layout."""
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io

    with parallel.parallel_context(tp, 1, ep=ep):
        model, cfg = io.load_checkpoint(ours)
        with adapter.use_layer_spec(te_keyed_spec):
            theirs = adapter.build_gpt_model(cfg, init_weights=False)
        theirs.load_state_dict(model.state_dict())
        _save_megatron_lm(save_dir, theirs, moe_args(tensor_model_parallel_size=tp,
                                                     expert_model_parallel_size=ep))


def _logits(path):
    from megatron_minitron.checkpoint import io
    from megatron_minitron.model.forward import full_logits

    model, _ = io.load_checkpoint(path)
    model.eval()
    with torch.no_grad():
        return full_logits(model, TOKENS, 2)


def _compare(paths, expected, tp, ep, pp=1):
    from megatron_minitron import parallel

    with parallel.parallel_context(tp, pp, ep=ep) as layout:
        assert (layout.tp, layout.pp, layout.ep) == (tp, pp, ep)
        for path in paths:
            torch.testing.assert_close(_logits(path), torch.load(expected), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(our checkpoint, its logits file, {(tp, ep): Megatron-LM save directory})."""
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io
    from megatron_minitron.model.forward import full_logits
    from megatron_minitron.testing.models import spread_weights

    root = tmp_path_factory.mktemp("megatron_lm_moe")
    ours, expected = str(root / "ours"), str(root / "logits.pt")
    cfg = _config()
    with parallel.parallel_context(1, 1, seed=11):
        model = adapter.build_gpt_model(cfg)
        spread_weights(model, cfg)  # a wrong expert or router row moves the logits
        io.save_checkpoint(model, cfg, ours)
        model.eval()
        with torch.no_grad():
            logits = full_logits(model, TOKENS, 2)
        assert logits.std() > 0.5
        torch.save(logits, expected)
    saves = {(tp, ep): str(root / f"megatron_lm_tp{tp}ep{ep}")
             for tp, ep in ((1, 1), (1, 2), (2, 2))}
    for (tp, ep), save_dir in saves.items():
        spawn(_save_like_megatron_lm, tp * ep, ours, save_dir, tp, ep)
    return ours, expected, saves


def test_config_comes_from_the_saved_moe_args(saved):
    from megatron_minitron.checkpoint import io, megatron_lm

    ours, _, saves = saved
    for save_dir in saves.values():
        cfg = io.load_config(save_dir)
        assert cfg.replace(extra={}) == io.load_config(ours).replace(extra={})
        keys = megatron_lm.stored_shapes(os.path.join(save_dir, ITERATION))
        # Megatron-LM's layout: one tensor for all experts, the MoE layers' own pre-MLP norm
        assert keys["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"] == (6, 64, 64)
        assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys
        assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys


def test_saved_at_every_layout_loads_at_tp1(saved):
    _, expected, saves = saved
    _compare(list(saves.values()), expected, 1, 1)


def test_saved_at_every_layout_loads_at_tp2_ep2(saved):
    _, expected, saves = saved
    spawn(_compare, 4, list(saves.values()), expected, 2, 2)


def test_saved_with_experts_split_loads_at_pp2_ep2(saved):
    _, expected, saves = saved
    spawn(_compare, 4, [saves[2, 2]], expected, 1, 2, 2)


def _save_ours_as_megatron(ours, out):
    from megatron_minitron import parallel
    from megatron_minitron.checkpoint import io, megatron_lm

    with parallel.parallel_context(2, 1, ep=2):  # experts split over EP and TP
        model, cfg = io.load_checkpoint(ours)
        megatron_lm.save_checkpoint(model, cfg, out)


def test_output_format_megatron_round_trips(saved, tmp_path):
    from megatron_minitron.checkpoint import io, megatron_lm

    ours, expected, _ = saved
    out = str(tmp_path / "megatron")
    spawn(_save_ours_as_megatron, 4, ours, out)
    folder = megatron_lm.resolve(out)
    args = megatron_lm.read_common(folder)["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size,
            args.moe_shared_expert_intermediate_size, args.moe_shared_expert_gate,
            args.moe_layer_freq, args.moe_grouped_gemm) == (6, 2, 32, 48, True, [1, 0, 1, 1],
                                                            False)
    assert megatron_lm.config_from_args(args, 256, out).replace(extra={}) == _config()
    keys = megatron_lm.stored_shapes(folder)  # each MoE layer's pre-MLP norm under both names
    assert {"decoder.layers.0.pre_mlp_layernorm.weight",
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"} <= set(keys)
    assert "decoder.layers.1.pre_mlp_layernorm.weight" not in keys  # dense: fused under TE too
    os.remove(os.path.join(folder, "minitron_config.json"))  # read as Megatron-LM's own
    assert io.load_config(out).replace(extra={}) == _config()
    _compare([out], expected, 1, 1)
    for spec in (te_keyed_spec, None):  # Megatron-LM's TE spec or its local one loads it
        torch.testing.assert_close(_mcore_load_logits(folder, spec), torch.load(expected),
                                   rtol=0, atol=1e-5)


def _mcore_load_logits(folder, spec):
    """Logits of a model loaded by mcore alone, as Megatron-LM's --finetune loads (unexpected
    keys ignored), built with ``spec`` (None: mcore's local spec)."""
    import contextlib

    from megatron.core import dist_checkpointing

    from megatron_minitron import adapter, parallel
    from megatron_minitron.model.forward import full_logits

    with parallel.parallel_context(1, 1):
        with adapter.use_layer_spec(spec) if spec else contextlib.nullcontext():
            model = adapter.build_gpt_model(_config())
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, folder,
                                         strict="assume_ok_unexpected")
        model.load_state_dict(loaded["model"], strict=True)
        model.eval()
        with torch.no_grad():
            return full_logits(model, TOKENS, 2)


@pytest.mark.parametrize("changes", [
    {},
    {"moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False,
     "moe_layer_freq": 1, "moe_router_pre_softmax": True, "moe_aux_loss_coeff": 0.0},
    {"moe_layer_freq": 2, "moe_shared_expert_gate": False, "moe_router_topk": 1},
    None,
], ids=["qwen2_moe", "mixtral_pre_softmax", "every_2nd_top1", "dense"])
def test_args_round_trip(changes):
    from megatron_minitron.checkpoint import megatron_lm
    from megatron_minitron.testing import tiny_config

    cfg = tiny_config() if changes is None else _config(**changes)
    again = megatron_lm.config_from_args(megatron_lm.megatron_args(cfg), 256, "OUT")
    assert again == cfg.replace(extra={"source_format": "megatron_lm"})


@pytest.mark.parametrize("freq,expected", [
    ("([1]*3+[0]*1)*2", [1, 1, 1, 0, 1, 1, 1, 0]),
    ("[1,0]*4", [1, 0] * 4),
    ("2", 2),
    (4, 4),
    ([0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]),
])
def test_moe_layer_freq_forms(freq, expected):
    from megatron_minitron.checkpoint import megatron_lm

    cfg = megatron_lm.config_from_args(moe_args(num_layers=8, moe_layer_freq=freq), 256, "S")
    assert cfg.moe_layer_freq == expected
    assert cfg.moe_layers() == [bool(v) for v in expected] if isinstance(expected, list) else \
        [i % expected == 0 for i in range(8)]


@pytest.mark.parametrize("text", ['__import__("os")', "[1]*65536*65536", "[1.5]", "[[1]]",
                                  "[1]+2", "True", "[1]*-1"])
def test_moe_layer_freq_patterns_are_read_not_run(text):
    from megatron_minitron.checkpoint import megatron_lm

    with pytest.raises(UsageError, match="moe_layer_freq=.*; fix the saved args"):
        megatron_lm.parse_moe_layer_freq(text, "S")


@pytest.mark.parametrize("types,coeffs,coeff,recorded", [
    ("seq_aux_loss", 1e-2, 1e-2, "seq_aux_loss"),
    ("global_aux_loss", 1e-2, 1e-2, "global_aux_loss"),
    ("none", 1e-2, 0.0, None),
    (["aux_loss"], [1e-2], 1e-2, None),
    (["seq_aux_loss", "aux_loss"], [1e-4, 0.0], 1e-4, "seq_aux_loss"),
])
def test_load_balancing_losses_map(types, coeffs, coeff, recorded):
    """The forward is the same; the coefficient is kept and the loss type recorded."""
    from megatron_minitron.checkpoint import megatron_lm

    cfg = megatron_lm.config_from_args(
        moe_args(moe_router_load_balancing_type=types, moe_aux_loss_coeff=coeffs), 256, "S")
    assert cfg.moe_aux_loss_coeff == coeff
    assert cfg.extra.get("moe_router_load_balancing_type") == recorded


REFUSED = [
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function='sigmoid'"),
    ({"moe_router_topk_scaling_factor": 2.5}, "moe_router_topk_scaling_factor=2.5"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias=True"),
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "moe_router_num_groups=2"),
    ({"moe_expert_capacity_factor": 1.25}, "moe_expert_capacity_factor=1.25"),
    ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type='sinkhorn'"),
    ({"moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"],
      "moe_aux_loss_coeff": [1e-3, 1e-3]}, "combine load-balancing losses"),
    ({"moe_latent_size": 16}, "moe_latent_size=16"),
    ({"moe_mlp_glu_interleave_size": 32}, "moe_mlp_glu_interleave_size=32"),
    ({"moe_apply_probs_on_input": True}, "moe_apply_probs_on_input=True"),
    ({"moe_layer_freq": "[1]*3+[0]*x"}, "moe_layer_freq='[1]*3+[0]*x'"),
    ({"moe_layer_freq": [1, 0]}, "moe_layer_freq=[1, 0]"),
    ({"moe_router_topk": 8}, "moe_router_topk=8"),
    ({"multi_latent_attention": True}, "multi_latent_attention=True"),
]


@pytest.mark.parametrize("changes,named", REFUSED, ids=[n for _, n in REFUSED])
def test_unsupported_moe_args_are_refused_before_any_weight_is_read(
        saved, tmp_path, capsys, monkeypatch, changes, named):
    from megatron_minitron.checkpoint import io, megatron_lm

    _, _, saves = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(saves[1, 2], ITERATION), bad / ITERATION)
    (bad / "latest_checkpointed_iteration.txt").write_text("50")
    common = dict(megatron_lm.read_common(os.path.join(saves[1, 2], ITERATION)),
                  args=moe_args(**changes))
    monkeypatch.setattr(megatron_lm, "read_common", lambda folder: common)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(io, "load_weights", no_weights)
    code = cli_main(["eval", "--load", str(bad), "--text-file", str(tmp_path / "t.txt"),
                     "--seq-length", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err
    assert "; " in err.split(named, 1)[1], err  # then names the fix


def test_expert_keys_outside_mcores_layout_are_refused(saved, monkeypatch):
    from megatron_minitron.checkpoint import io, megatron_lm

    _, _, saves = saved
    real = megatron_lm.stored_shapes
    for key in ("decoder.layers.0.mlp.experts.experts.3.linear_fc1.weight",  # singleton shards
                "decoder.layers.0.mlp.experts.weight1",
                "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"):
        monkeypatch.setattr(megatron_lm, "stored_shapes",
                            lambda folder, key=key: dict(real(folder), **{key: (1,)}))
        with pytest.raises(UsageError, match="re-save it with Megatron-LM") as err:
            io.load_config(saves[1, 1])
        assert key in str(err.value) and "\n" not in str(err.value)


def _legacy_grouped_gemm_save(ours, save_dir):
    """Our weights in mcore's legacy GroupedMLP experts (weight1 [h, experts * 2f], weight2
    [experts * f, h]), saved as Megatron-LM does with --moe-grouped-gemm
    --moe-use-legacy-grouped-gemm. Only its sharded_state_dict runs (no grouped_gemm kernels
    are needed)."""
    from megatron.core.transformer.moe import grouped_gemm_util

    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None

    def grouped_spec(cfg, config):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        specs = [get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts if moe else None,
                                          moe_grouped_gemm=moe, normalization=cfg.normalization)
                 for moe in cfg.moe_layers()]
        return TransformerBlockSubmodules(layer_specs=specs,
                                          layer_norm=specs[0].submodules.input_layernorm)

    with parallel.parallel_context(1, 1):
        model, cfg = io.load_checkpoint(ours)
        with adapter.use_layer_spec(grouped_spec):
            theirs = adapter.build_gpt_model(cfg, moe_grouped_gemm=True,
                                             moe_use_legacy_grouped_gemm=True)
        state = {k: v for k, v in model.state_dict().items() if ".local_experts." not in k}
        for index, layer in enumerate(adapter.decoder_layers(model)):
            if not adapter.is_moe_layer(layer):
                continue
            experts = adapter.local_experts(layer)
            prefix = f"decoder.layers.{index}.mlp.experts."
            # GroupedMLP reads weight1 as .view(experts, h, 2f): expert-major memory
            state[prefix + "weight1"] = torch.stack(
                [e.linear_fc1.weight.t() for e in experts]).reshape(cfg.hidden_size, -1)
            state[prefix + "weight2"] = torch.cat([e.linear_fc2.weight.t() for e in experts], 0)
        missing, unexpected = theirs.load_state_dict(state, strict=False)
        assert not unexpected and not [k for k in missing if "_extra_state" not in k], missing
        assert type(theirs.decoder.layers[0].mlp.experts).__name__ == "GroupedMLP"
        _save_megatron_lm(save_dir, theirs,
                          moe_args(expert_model_parallel_size=1, moe_use_legacy_grouped_gemm=True))


def test_legacy_grouped_gemm_experts_load(saved, tmp_path):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if "moe_use_legacy_grouped_gemm" not in TransformerConfig.__dataclass_fields__:
        pytest.skip("this mcore has no legacy GroupedMLP")
    ours, expected, _ = saved
    save_dir = str(tmp_path / "grouped")
    spawn(_legacy_grouped_gemm_save, 1, ours, save_dir)
    _compare([save_dir], expected, 1, 1)


def _save_all_moe(save_dir, saved_freq, args_freq, expected):
    """An all-MoE stack saved with one ``moe_layer_freq`` form (its key layout: int 1 stacks
    the layers, a list keys them one by one) under args holding the other form."""
    from megatron_minitron import adapter, parallel
    from megatron_minitron.model.forward import full_logits
    from megatron_minitron.testing.models import spread_weights

    cfg = _config(num_layers=2, moe_layer_freq=saved_freq)
    with parallel.parallel_context(1, 1, seed=5):
        model = adapter.build_gpt_model(cfg)
        spread_weights(model, cfg)
        model.eval()
        with torch.no_grad():
            torch.save(full_logits(model, TOKENS, 2), expected)
        _save_megatron_lm(save_dir, model, moe_args(num_layers=2, moe_layer_freq=args_freq))


@pytest.mark.parametrize("saved_freq,args_freq", [([1, 1], 1), (1, [1, 1])],
                         ids=["per_layer_keys", "stacked_keys"])
def test_all_moe_stacks_load_whichever_key_layout(tmp_path, saved_freq, args_freq):
    from megatron_minitron.checkpoint import io, megatron_lm

    save_dir, expected = str(tmp_path / "save"), str(tmp_path / "logits.pt")
    spawn(_save_all_moe, 1, save_dir, saved_freq, args_freq, expected)
    keys = megatron_lm.stored_shapes(os.path.join(save_dir, ITERATION))
    assert ("decoder.layers.0.mlp.router.weight" in keys) == isinstance(saved_freq, list)
    assert io.load_config(save_dir).moe_layer_freq == saved_freq
    _compare([save_dir], expected, 1, 1)


def test_streamed_megatron_output_of_moe_models_is_refused(tmp_path):
    from megatron_minitron.checkpoint import megatron_lm

    with pytest.raises(UsageError, match="--output-format minitron"):
        megatron_lm.write_streaming([], _config(), str(tmp_path / "out"))


@pytest.mark.parametrize("spec", [None, "te"], ids=["local_spec", "te_keys"])
def test_moe_pre_mlp_norms_are_written_under_both_names(spec):
    """Stacked (all-MoE) layers; the model built under either spec."""
    import contextlib

    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import megatron_lm

    cfg = _config(num_layers=2, moe_layer_freq=1)
    with parallel.parallel_context(1, 1):
        with adapter.use_layer_spec(te_keyed_spec) if spec else contextlib.nullcontext():
            model = adapter.build_gpt_model(cfg)
        sharded = megatron_lm.with_te_norm_keys(model.sharded_state_dict(), cfg)
    keys = {value.key: value for value in sharded.values() if hasattr(value, "key")}
    te, local = (keys["decoder.layers.pre_mlp_layernorm.weight"],
                 keys["decoder.layers.mlp.linear_fc1.layer_norm_weight"])
    assert te.data is local.data and te.global_shape == local.global_shape == (2, 64)
