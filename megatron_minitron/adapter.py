"""The one place that knows Megatron-Core's module names and internals.

Everything else in the package talks about "layers", "attention output projection", "MLP fc1"
through the functions here, so a change in mcore is mended in this file alone or in its parts,
whose names this module re-exports: :mod:`megatron_minitron.adapter_moe` (mixture-of-experts
layers), :mod:`megatron_minitron.adapter_norms` (norms, whichever spec),
:mod:`megatron_minitron.adapter_checkpoint` (state dict naming) and
:mod:`megatron_minitron.adapter_config` (the TransformerConfig of a model and a run).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Dict, List, Optional

import torch

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode, cuda_to_cpu
from megatron_minitron.config import ModelConfig

apply_cpu_patches()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402

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
from megatron_minitron.adapter_config import (  # noqa: E402,F401 - re-exported
    ACTIVATION_FUNCS,
    gpu_features,
    moe_transformer_fields,
    transformer_config,
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

def te_available() -> bool:
    """True when Transformer Engine imports (GPU machines with the NGC image)."""
    if cpu_mode() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


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
