"""Layer specs of the models we build: mcore's local spec with torch's fused attention (and
zero-centred norms where the model needs them), or the Transformer Engine spec; and a way for
tests to swap in another spec (:func:`use_layer_spec`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches
from megatron_minitron.config import ModelConfig

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """LayerNorm whose weight is stored as gamma - 1 and applied as 1 + weight (LayerNorm1P).

    The local spec's norms cannot do this without apex (``WrappedTorchNorm`` refuses
    ``layernorm_zero_centered_gamma``), so the local spec gets this class for every norm. It
    keeps the stored weight the same as Transformer Engine's and Hugging Face Nemotron's, so
    checkpoints move between specs and round-trip to Hugging Face bit for bit.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused):
        super().__init__(hidden_size, eps=eps)
        with torch.no_grad():
            self.weight.zero_()  # gamma = 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(hidden, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def _submodules_of(builder):
    """The submodules of ``builder`` (a ModuleSpec, or mcore 0.19's
    ``partial(cls, submodules=...)``)."""
    if isinstance(builder, functools.partial):
        return builder.keywords["submodules"]
    return builder.submodules


def with_submodules(builder, **replacements):
    """``builder`` (a ModuleSpec, or mcore 0.19's ``partial(cls, submodules=...)``) with some
    of its submodules replaced."""
    submodules = dataclasses.replace(_submodules_of(builder), **replacements)
    if isinstance(builder, functools.partial):
        return functools.partial(builder.func, *builder.args,
                                 **{**builder.keywords, "submodules": submodules})
    return dataclasses.replace(builder, submodules=submodules)


def local_layer_spec(cfg: ModelConfig, moe: bool = False):
    """mcore's local layer spec with torch's fused attention in its ``core_attention`` slot
    (:class:`megatron_minitron.model.attention.SDPAttention`; same weights and masking);
    ``moe``: its mixture-of-experts layer (router and ``SequentialMLP`` experts)."""
    from megatron.core.transformer.mlp import MLP

    from megatron_minitron.model.attention import SDPAttention
    from megatron_minitron.model.mlp import SwiGLUMLP
    from megatron_minitron.model.norm import LocalNorm

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts if moe else None,
                                    normalization=cfg.normalization,
                                    qk_layernorm=cfg.qk_layernorm)
    attention = with_submodules(spec.submodules.self_attention, core_attention=SDPAttention,
                                **_plain_linears(spec.submodules.self_attention))
    norms = dict(input_layernorm=LocalNorm, pre_mlp_layernorm=LocalNorm)
    if moe:
        return with_submodules(spec, self_attention=attention, **norms)
    mlp = with_submodules(spec.submodules.mlp, **_plain_linears(spec.submodules.mlp))
    return with_submodules(spec, self_attention=attention,
                           mlp=_with_module(mlp, MLP, SwiGLUMLP), **norms)


def _with_module(builder, base: type, subclass: type):
    """``builder`` (a ModuleSpec of ``base``, or mcore 0.19's ``partial`` of one of ``base``'s
    classmethods) building ``subclass`` instead.

    mcore 0.16's TransformerLayer passes the tensor-parallel group only to the MLP classes it
    knows (and logs "Unknown MLP type" for others), so the ModuleSpec carries the group itself.
    """
    if isinstance(builder, functools.partial):
        method = builder.func
        if getattr(method, "__self__", None) is not base:
            raise TypeError(f"{builder} does not build {base.__name__}")
        return functools.partial(getattr(subclass, method.__name__), *builder.args,
                                 **builder.keywords)
    if builder.module is not base:
        raise TypeError(f"{builder} does not build {base.__name__}")
    from megatron.core import parallel_state

    params = dict(builder.params or {})
    if parallel_state.model_parallel_is_initialized():
        params.setdefault("tp_group", parallel_state.get_tensor_model_parallel_group())
    return dataclasses.replace(builder, module=subclass, params=params)


class _OwnMLPs(logging.Filter):
    """Drops mcore 0.16's "Unknown MLP type" warning (see :func:`_with_module`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


@contextlib.contextmanager
def building_models():
    """Around a model build from these specs: mcore 0.16 warns once per layer that it does not
    know :class:`megatron_minitron.model.mlp.SwiGLUMLP`, whose spec carries its group."""
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    quiet = _OwnMLPs()
    layer_logger.addFilter(quiet)
    try:
        yield
    finally:
        layer_logger.removeFilter(quiet)


def _plain_linears(builder) -> dict:
    """Replacements of mcore's Column/RowParallelLinear slots among ``builder``'s submodules
    by :mod:`megatron_minitron.model.linear`'s subclasses (plain matmuls on one TP rank)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_minitron.model.linear import ColumnLinear, RowLinear

    submodules = _submodules_of(builder)
    swap = {ColumnParallelLinear: ColumnLinear, RowParallelLinear: RowLinear}
    return {field.name: swap[getattr(submodules, field.name)]
            for field in dataclasses.fields(submodules)
            if getattr(submodules, field.name) in swap}


def _stage_moe_layers(cfg: ModelConfig, config: TransformerConfig) -> List[bool]:
    """Per layer built on this pipeline stage: whether it is a mixture-of-experts layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config)
    return cfg.moe_layers()[offset:offset + get_num_layers_to_build(config)]


def layer_spec(cfg: ModelConfig, use_te: bool, config: TransformerConfig):
    """The layer spec; for a mixture-of-experts model, or a zero-centred LayerNorm on the local
    spec (its final norm must be replaced too), the block's submodules, one spec per layer of
    this stage."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_decoder_block_spec,
            get_gpt_layer_with_transformer_engine_spec,
        )

        if cfg.is_moe:  # mcore's own per-layer dense/MoE specs (config.moe_layer_freq)
            return get_gpt_decoder_block_spec(config, use_transformer_engine=True,
                                              normalization=cfg.normalization)
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    if cfg.is_moe:
        specs = [local_layer_spec(cfg, moe) for moe in _stage_moe_layers(cfg, config)]
    else:
        specs = [local_layer_spec(cfg)] * get_num_layers_to_build(config)
    if not cfg.layernorm_zero_centered_gamma:  # the final norm is the layers' own norm class
        from megatron_minitron.model.norm import LocalNorm

        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LocalNorm)
    norms = dict(input_layernorm=ZeroCenteredLayerNorm, pre_mlp_layernorm=ZeroCenteredLayerNorm)
    specs = [dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **norms))
             for spec in specs]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=ZeroCenteredLayerNorm)


LayerSpecFn = Callable[[ModelConfig, TransformerConfig], Any]
"""``(cfg, transformer_config) -> layer spec`` (a ModuleSpec or TransformerBlockSubmodules)."""

_SPEC_OVERRIDE: List[LayerSpecFn] = []


@contextlib.contextmanager
def use_layer_spec(spec: LayerSpecFn):
    """Every :func:`build_gpt_model` inside ``with`` (checkpoint loads included) uses ``spec``.

    Lets tests run the whole pipeline on another layer spec (e.g. the CPU stand-in of the
    Transformer Engine spec in ``megatron_minitron.testing.te_standin``).
    """
    _SPEC_OVERRIDE.append(spec)
    try:
        yield
    finally:
        _SPEC_OVERRIDE.pop()


def spec_override() -> Optional[LayerSpecFn]:
    """The spec set by the innermost :func:`use_layer_spec`, or None."""
    return _SPEC_OVERRIDE[-1] if _SPEC_OVERRIDE else None
