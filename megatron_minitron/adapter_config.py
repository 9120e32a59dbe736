"""How our :class:`~megatron_minitron.config.ModelConfig` becomes mcore's TransformerConfig: the
model's fields at the current parallel layout, a mixture-of-experts model's fields, and the
fields of a run's GPU features (fusions, attention backend, recomputation, DDP overlap).

Part of :mod:`megatron_minitron.adapter`, which re-exports every name here; callers use
``adapter.<name>``.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode
from megatron_minitron.config import ModelConfig

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core import parallel_state  # noqa: E402
from megatron.core.activations import squared_relu  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


ACTIVATION_FUNCS = {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}
"""Our activation name -> mcore's ``activation_func`` (swiglu also sets ``gated_linear_unit``)."""


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
