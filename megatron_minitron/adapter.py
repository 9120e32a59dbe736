"""The one place that knows Megatron-Core's module names and internals.

Everything else in the package talks about "layers", "attention output projection", "MLP fc1"
through the functions here, so a change in mcore is mended in this file alone or in its parts,
whose names this module re-exports: :mod:`megatron_minitron.adapter_moe` (mixture-of-experts
layers), :mod:`megatron_minitron.adapter_norms` (norms, whichever spec) and
:mod:`megatron_minitron.adapter_checkpoint` (state dict naming).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode, cuda_to_cpu
from megatron_minitron.config import ModelConfig

apply_cpu_patches()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.activations import squared_relu  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_minitron.adapter_moe import (  # noqa: E402,F401 - MoE access, re-exported
    EXPERTS_CHECKPOINT_PREFIX,
    MOE_AUX_LOSS,
    checkpoint_layers_stacked,
    clear_moe_aux_loss_record,
    expert_data_parallel_group,
    expert_parallel_group,
    expert_parallel_rank,
    expert_tensor_parallel_group,
    is_moe_layer,
    local_expert_key,
    local_expert_suffix,
    local_experts,
    moe_aux_loss_record,
    moe_aux_loss_scale,
    moe_router,
    moe_token_sources,
    routed_experts,
    shared_expert,
)
from megatron_minitron.adapter_checkpoint import (  # noqa: E402,F401 - re-exported
    extra_state_keys,
    legacy_checkpoint_key,
    match_checkpoint_keys,
    megatron_lm_sharded_state_dict,
    native_key,
    sharded_state_dict,
)
from megatron_minitron.adapter_norms import (  # noqa: E402,F401 - re-exported
    final_norm,
    FUSED_NORM_LINEAR,
    fused_norm_output,
    is_norm_parameter,
    layer_norms,
    module_role,
    MODULE_ROLES,
    NO_NORM,
    Norm,
    NORM_PARAMETER_SUFFIXES,
    register_module_role,
)
from megatron_minitron.model.specs import (  # noqa: E402,F401 - the specs, re-exported
    LayerSpecFn,
    building_models,
    ZeroCenteredLayerNorm,
    layer_spec,
    local_layer_spec,
    spec_override,
    use_layer_spec,
    with_submodules,
)

ACTIVATION_FUNCS = {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}
"""Our activation name -> mcore's ``activation_func`` (swiglu also sets ``gated_linear_unit``)."""


def te_available() -> bool:
    """True when Transformer Engine imports (GPU machines with the NGC image)."""
    if cpu_mode() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                       init_weights: bool = True, **overrides) -> TransformerConfig:
    """Maps our ModelConfig onto mcore's TransformerConfig at the current parallel layout.

    Weights are created on the GPU where there is one (on the host only on CPU machines), and
    randomly initialised only when ``init_weights`` (False when a checkpoint is loaded next).
    ``overrides``: further TransformerConfig fields, e.g. :func:`gpu_features`' first dict.
    """
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        layernorm_zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        gated_linear_unit=cfg.gated,
        activation_func=ACTIVATION_FUNCS[cfg.activation],
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=False,
        use_cpu_initialization=cpu_mode(),
        perform_initialization=init_weights,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
    )
    kwargs.update(moe_transformer_fields(cfg))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_transformer_fields(cfg: ModelConfig) -> Dict:
    """TransformerConfig fields of a mixture-of-experts model (none for a dense one).

    Experts are split over the expert parallel group; tokens reach them through mcore's
    all-to-all dispatcher when EP > 1 (it runs on gloo too) and its all-gather one otherwise.
    The router computes in fp32 whatever the weights' dtype, as Hugging Face's models do.
    """
    if not cfg.is_moe:
        return {}
    ep = parallel_state.get_expert_model_parallel_world_size()
    return dict(
        num_moe_experts=cfg.num_moe_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate,
        moe_layer_freq=cfg.moe_layer_freq,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff else "none",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall" if ep > 1 else "allgather",
        expert_model_parallel_size=ep,
        moe_grouped_gemm=False,
    )


def gpu_features(cfg: ModelConfig, *, gpu: bool, te: bool, apex: bool, flash_attn: bool,
                 params_dtype: torch.dtype, training: bool, sequence_parallel: bool = False,
                 recompute: str | None = None, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False, distributed_optimizer: bool = False):
    """``(TransformerConfig fields, DistributedDataParallelConfig fields)`` of a run's GPU
    features; a pure function of its arguments, so it is tested without CUDA.

    Each flag maps onto mcore's own field. mcore's fusions are switched on where their kernels
    exist (a GPU with Transformer Engine or NVIDIA apex): bias-dropout, masked softmax,
    bias-activation (SwiGLU, or GeLU with biases: the activations mcore fuses), RoPE (TE),
    persistent LayerNorm (apex) and, for training, gradient accumulation into the fp32 main
    grads. Under TE in bf16/fp16, attention runs on the flash-attention backend when
    ``flash_attn`` imports (TE chooses among its own otherwise). Whether a flag may be used at
    all is checked with the run's arguments (``TrainConfig.check_gpu_features``).
    """
    from megatron.core.transformer.enums import AttnBackend

    model: Dict = {}
    if gpu and (te or apex):
        model.update(
            bias_dropout_fusion=True,
            masked_softmax_fusion=True,
            bias_activation_fusion=cfg.activation == "swiglu" or (
                cfg.activation == "gelu" and cfg.add_bias_linear),
            apply_rope_fusion=te,
            persist_layer_norm=apex,
            gradient_accumulation_fusion=training,
        )
    if gpu and te and flash_attn and params_dtype in (torch.bfloat16, torch.float16):
        model["attention_backend"] = AttnBackend.flash
    if sequence_parallel:
        model["sequence_parallel"] = True
    if recompute == "selective":  # mcore's default module: the attention core
        model["recompute_granularity"] = "selective"
    elif recompute == "full":
        model.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    elif recompute is not None:
        raise ValueError(f"recompute={recompute!r}; use selective or full")
    ddp = dict(overlap_grad_reduce=overlap_grad_reduce,
               overlap_param_gather=overlap_param_gather and distributed_optimizer,
               use_distributed_optimizer=distributed_optimizer)
    return model, ddp


def build_gpt_model(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                    use_te: bool | None = None, spec: Optional[LayerSpecFn] = None,
                    init_weights: bool = True, **config_overrides) -> GPTModel:
    """Builds this rank's pipeline stage of an mcore GPTModel for ``cfg``.

    ``use_te``: Transformer Engine spec (default: when TE imports). ``spec``: builds the layer
    spec instead, ``spec(cfg, transformer_config)`` (default: the one set by
    :func:`use_layer_spec`, else the local or TE spec). ``init_weights=False`` skips the random
    initialisation (the weights hold whatever memory held): for models a checkpoint is loaded
    into. ``config_overrides``: TransformerConfig fields passed on to
    :func:`transformer_config`.
    """
    cfg.check_layout(parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_pipeline_model_parallel_world_size(),
                     parallel_state.get_expert_model_parallel_world_size())
    use_te = te_available() if use_te is None else use_te
    if spec is None:
        spec = spec_override()
    # tied embeddings under PP call .cuda() while syncing the output layer
    with cuda_to_cpu(), building_models():
        model = _gpt_model(cfg, params_dtype, use_te, spec, init_weights, config_overrides)
    if not init_weights:
        _mark_tensor_parallel_weights(model)
    if params_dtype != torch.float32:  # the local spec's torch norms are built in fp32; every
        model.to(dtype=params_dtype)  # weight in one dtype, as Megatron's Float16Module does
    if not cpu_mode():
        model.cuda(torch.cuda.current_device())
    return model


def _mark_tensor_parallel_weights(model: GPTModel) -> None:
    """Tags each tensor-parallel weight with its partition (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``), as mcore's weight initialisation does and its
    ``perform_initialization=False`` path does not; gradient clipping and the optimizers read
    the tags (without them a TP-split weight counts on TP rank 0 only)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    partition_dims = ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0),
                      (RowParallelLinear, 1))
    # a gated fc1 holds [gate, up] interleaved per TP rank: mcore gives it stride 2
    gated_fc1 = ({id(mlp.linear_fc1) for layer in decoder_layers(model)
                  for mlp in layer_mlps(layer)} if model.config.gated_linear_unit else set())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or hasattr(weight, "tensor_model_parallel"):
            continue
        for kind, dim in partition_dims:
            if isinstance(module, kind):
                stride = 2 if id(module) in gated_fc1 else 1
                set_tensor_model_parallel_attributes(weight, True, dim, stride)


def _gpt_model(cfg: ModelConfig, params_dtype: torch.dtype, use_te: bool,
               spec: Optional[LayerSpecFn], init_weights: bool,
               config_overrides: Dict) -> GPTModel:
    config = transformer_config(cfg, params_dtype, init_weights, **config_overrides)
    return GPTModel(
        config=config,
        transformer_layer_spec=(spec or (lambda c, t: layer_spec(c, use_te, t)))(cfg, config),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percent,
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
    )


# ---------------------------------------------------------------- module access


def decoder_layers(model: GPTModel) -> List[torch.nn.Module]:
    """This stage's transformer layers, in order."""
    return list(model.decoder.layers)


def layer_global_index(layer: torch.nn.Module) -> int:
    """0-based index of a layer in the whole (unpipelined) model."""
    return layer.layer_number - 1


def layer_offset(model: GPTModel) -> int:
    layers = decoder_layers(model)
    return layer_global_index(layers[0]) if layers else 0


def attention_output_projection(layer) -> torch.nn.Module:
    """Row-parallel linear whose input is the concatenated per-head attention output."""
    return layer.self_attention.linear_proj


def attention_qk_norms(layer) -> List[torch.nn.Module]:
    """The per-head query and key norms ([q_layernorm, k_layernorm]), or [] without them."""
    attention = layer.self_attention
    norms = [getattr(attention, "q_layernorm", None), getattr(attention, "k_layernorm", None)]
    return [n for n in norms if n is not None and hasattr(n, "weight")]


def layer_mlps(layer) -> List[torch.nn.Module]:
    """Every MLP of ``layer`` with ``linear_fc1``/``linear_fc2``: the dense MLP, or this rank's
    routed experts followed by the shared expert."""
    if not is_moe_layer(layer):
        return [layer.mlp]
    shared = shared_expert(layer)
    return local_experts(layer) + ([shared] if shared is not None else [])


def mlp_fc1(layer) -> torch.nn.Module:
    """The dense MLP's column-parallel first linear."""
    return layer.mlp.linear_fc1


def mlp_fc2(layer) -> torch.nn.Module:
    """Row-parallel linear whose input is the post-activation MLP hidden state."""
    return layer.mlp.linear_fc2


def _register_te_roles() -> None:
    if te_available():
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

        register_module_role(TELayerNormColumnParallelLinear, FUSED_NORM_LINEAR)


_register_te_roles()


def layer_hidden_input(args, kwargs) -> torch.Tensor:
    """The [s, b, h] residual stream entering a TransformerLayer, from a forward hook's inputs."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def layer_hidden_output(output) -> torch.Tensor:
    """The [s, b, h] residual stream leaving a TransformerLayer (its forward returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_layer_output(output, hidden: torch.Tensor):
    """A TransformerLayer output with its hidden states replaced (used to skip a layer)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def linear_output(output) -> torch.Tensor:
    """mcore's Column/RowParallelLinear return ``(output, bias)``; this is the output."""
    return output[0] if isinstance(output, tuple) else output


def attention_qkv(layer) -> torch.nn.Module:
    """Column-parallel fused QKV linear; its rows go query group by query group, each group
    holding [its query heads, its key head, its value head] (heads_per_group + 2 heads)."""
    return layer.self_attention.linear_qkv


def word_embeddings(model: GPTModel) -> torch.nn.Module:
    """Vocab-parallel input embedding (first stage only)."""
    return model.embedding.word_embeddings


def output_layer(model: GPTModel) -> torch.nn.Module:
    """Column-parallel output projection (last stage); it holds no weight when tied."""
    return model.output_layer


def accepts_attention_mask(model: GPTModel) -> bool:
    """True when every layer's core attention applies the ``attention_mask`` it is given
    (mcore's local ``DotProductAttention``); Transformer Engine's causal kernels ignore it."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    layers = decoder_layers(model)
    return all(isinstance(getattr(layer.self_attention, "core_attention", None),
                          DotProductAttention) for layer in layers)


@contextlib.contextmanager
def rotary_positions(model: GPTModel, positions):
    """Inside ``with``, the model's RoPE uses ``positions`` [b, s] instead of 0..s-1.

    mcore's GPTModel computes rotary frequencies for positions 0..s-1 ([s, 1, 1, d]) and
    ignores ``position_ids``; a forward hook on its rotary module hands the attention layers
    the frequencies of each row's own positions instead ([s, b, 1, d], which mcore's RoPE
    broadcasts over heads).
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if positions is None or rotary is None:
        yield
        return

    def hook(module, args, output):
        if not torch.is_tensor(output):
            raise NotImplementedError(f"explicit positions with {type(module).__name__}")
        return output[:, 0, 0, :][positions.t()].unsqueeze(2)  # [s, b, 1, d]

    handle = rotary.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def get_tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def get_pp_group():
    return parallel_state.get_pipeline_model_parallel_group()


def get_dp_group():
    return parallel_state.get_data_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def is_first_stage() -> bool:
    return parallel_state.is_pipeline_first_stage()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


# ---------------------------------------------------------------- training access


@contextlib.contextmanager
def raw_logits(model: GPTModel):
    """Inside ``with raw_logits(model) as captured``, the last stage's forward appends the
    output layer's logits [s, b, v/tp] to ``captured`` and GPTModel returns an empty tensor.

    GPTModel itself returns ``logits.transpose(0, 1).contiguous()``, a second logits-sized
    tensor (and another one in backward); the hook hands the original on and gives GPTModel an
    empty slice to transpose instead. Nothing is captured on other stages.
    """
    captured: List[torch.Tensor] = []
    if not model.post_process:
        yield captured
        return

    def keep_logits(module, args, output):
        logits = linear_output(output)  # [s, b, v/tp]
        captured.append(logits)
        return (logits[..., :0],) + tuple(output[1:])

    handle = model.output_layer.register_forward_hook(keep_logits)
    try:
        yield captured
    finally:
        handle.remove()


def stage_forward(model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor,
                  input_tensor=None) -> torch.Tensor:
    """Runs this rank's stage; returns hidden states [s, b, h], or on the last stage the
    vocab-parallel logits [s, b, v/tp] as the output layer made them (see :func:`raw_logits`).
    ``input_tensor``: the previous stage's hidden states (ignored on the first stage).
    """
    if input_tensor is not None or not model.pre_process:
        model.set_input_tensor(input_tensor)
    with raw_logits(model) as captured:
        output = model(tokens, position_ids, None)
    return captured[0] if captured else output


def stage_layer_numbers(num_layers: int) -> List[int]:
    """1-based numbers of the layers this pipeline stage holds (mcore's even split)."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = num_layers // pp
    first = parallel_state.get_pipeline_model_parallel_rank() * per_stage
    return list(range(first + 1, first + per_stage + 1))


def layer_stage(layer_number: int, num_layers: int, pp: int) -> int:
    """Pipeline stage holding 1-based ``layer_number`` (0, the embedding, is on stage 0)."""
    return 0 if layer_number == 0 else (layer_number - 1) // (num_layers // pp)


def layer_by_number(model: GPTModel, layer_number: int) -> torch.nn.Module:
    """The TransformerLayer with 1-based global ``layer_number`` on this stage."""
    for layer in decoder_layers(model):
        if layer.layer_number == layer_number:
            return layer
    raise KeyError(f"layer {layer_number} is not on this pipeline stage")
