"""The one place that knows Megatron-Core's module names and internals.

Everything else in the package talks about "layers", "attention output projection", "MLP fc1"
through the functions here, so a change in mcore is mended in this file alone.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode, cuda_to_cpu
from megatron_minitron.config import ModelConfig

apply_cpu_patches()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


def te_available() -> bool:
    """True when Transformer Engine imports (GPU machines with the NGC image)."""
    if cpu_mode() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def layer_spec(cfg: ModelConfig, use_te: bool):
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=cfg.normalization)


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                       **overrides) -> TransformerConfig:
    """Maps our ModelConfig onto mcore's TransformerConfig at the current parallel layout."""
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.gated,
        activation_func=F.silu if cfg.gated else F.gelu,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
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
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                    use_te: bool | None = None) -> GPTModel:
    """Builds this rank's pipeline stage of an mcore GPTModel for ``cfg``."""
    cfg.check_layout(parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_pipeline_model_parallel_world_size())
    use_te = te_available() if use_te is None else use_te
    with cuda_to_cpu():  # tied embeddings under PP call .cuda() while syncing the output layer
        model = _gpt_model(cfg, params_dtype, use_te)
    if not cpu_mode():
        model.cuda(torch.cuda.current_device())
    return model


def _gpt_model(cfg: ModelConfig, params_dtype: torch.dtype, use_te: bool) -> GPTModel:
    return GPTModel(
        config=transformer_config(cfg, params_dtype),
        transformer_layer_spec=layer_spec(cfg, use_te),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percent,
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
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


def mlp_fc1(layer) -> torch.nn.Module:
    return layer.mlp.linear_fc1


def mlp_fc2(layer) -> torch.nn.Module:
    """Row-parallel linear whose input is the post-activation MLP hidden state."""
    return layer.mlp.linear_fc2


def layer_norms(layer) -> List[torch.nn.Module]:
    """The norms inside a layer (input and pre-MLP), whichever spec built it."""
    norms = []
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        module = getattr(layer, name, None)
        if module is not None and not isinstance(module, torch.nn.Identity):
            norms.append(module)
    return norms


def final_norm(model: GPTModel):
    """The decoder's final norm on the last pipeline stage, else None."""
    norm = getattr(model.decoder, "final_layernorm", None)
    return None if isinstance(norm, torch.nn.Identity) else norm


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


# ---------------------------------------------------------------- state dict naming

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear. Our
# checkpoints always use the local spec's names so they load with either spec.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_key(key: str) -> str:
    for te_name, local_name in _TE_TO_LOCAL.items():
        if key.endswith(te_name):
            return key[: -len(te_name)] + local_name
    return key


def sharded_state_dict(model: GPTModel) -> Dict:
    """mcore sharded state dict with spec-independent keys (weights only, no extra state)."""
    sharded = model.sharded_state_dict()
    out = {}
    for key, value in sharded.items():
        if key.endswith("_extra_state"):
            continue
        key = canonical_key(key)
        if hasattr(value, "key"):
            value.key = canonical_key(value.key)
        out[key] = value
    return out


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
