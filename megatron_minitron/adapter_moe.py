"""Megatron-Core internals of mixture-of-experts layers, in one place: the router, the routed
and shared experts, checkpoint names of experts, the token dispatchers' token order, the
expert-parallel groups, and what the routers record of the load-balancing loss.

Part of :mod:`megatron_minitron.adapter`, which re-exports every name here; callers use
``adapter.<name>``.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_minitron.compat.cpu import apply_cpu_patches
from megatron_minitron.config import ModelConfig

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core import parallel_state  # noqa: E402


def is_moe_layer(layer) -> bool:
    """Whether ``layer``'s MLP is a mixture of experts (mcore's ``MoELayer``)."""
    return hasattr(layer.mlp, "router")


def moe_router(layer) -> torch.nn.Module:
    """The router of a mixture-of-experts layer (``weight`` [experts, h])."""
    return layer.mlp.router


def local_experts(layer) -> List[torch.nn.Module]:
    """This rank's routed experts of a mixture-of-experts layer, each an MLP with
    ``linear_fc1``/``linear_fc2`` (mcore's ``SequentialMLP``; grouped-GEMM experts hold their
    weights stacked and are not supported here)."""
    experts = layer.mlp.experts
    if not hasattr(experts, "local_experts"):
        raise NotImplementedError(f"{type(experts).__name__} experts (grouped GEMM) are not "
                                  "supported; build the model with moe_grouped_gemm=False")
    return list(experts.local_experts)


def shared_expert(layer) -> Optional[torch.nn.Module]:
    """The shared expert of a mixture-of-experts layer (an MLP, with ``gate_weight`` [1, h]
    when gated), or None."""
    return getattr(layer.mlp, "shared_experts", None)


EXPERTS_CHECKPOINT_PREFIX = "mlp.experts.experts."
"""Layer-relative checkpoint name of the routed experts' tensors, stacked over the global
expert index ([experts, ...]: ``mlp.experts.experts.linear_fc1.weight``), whatever the
expert parallel size they were saved at."""
_LOCAL_EXPERT_PREFIX = "mlp.experts.local_experts."


def checkpoint_layers_stacked(cfg: ModelConfig) -> bool:
    """Whether mcore saves ``cfg``'s layers stacked under ``decoder.layers.<name>`` ([L, ...])
    rather than one key per layer (``decoder.layers.<i>.<name>``); mcore stores the layers of a
    mixed dense/MoE pattern (``moe_layer_freq`` a list, or an int above 1) one by one."""
    if not cfg.is_moe:
        return True
    return isinstance(cfg.moe_layer_freq, int) and cfg.moe_layer_freq == 1


def local_expert_key(suffix: str):
    """``(expert, rest)`` for a layer state-dict suffix of one routed expert
    (``mlp.experts.local_experts.3.linear_fc1.weight`` → ``(3, "linear_fc1.weight")``), else
    None."""
    if not suffix.startswith(_LOCAL_EXPERT_PREFIX):
        return None
    index, _, rest = suffix[len(_LOCAL_EXPERT_PREFIX):].partition(".")
    return int(index), rest


def local_expert_suffix(expert: int, rest: str) -> str:
    """The inverse of :func:`local_expert_key`."""
    return f"{_LOCAL_EXPERT_PREFIX}{expert}.{rest}"


def routed_experts(layer) -> torch.nn.Module:
    """The module running this rank's routed experts of a mixture-of-experts layer (mcore's
    ``SequentialMLP``): ``forward(tokens [N, h], tokens_per_expert [local], probs [N])`` takes
    every local expert's tokens, expert after expert, and returns their outputs [N, h] (before
    any reduction over the expert tensor parallel group) with the router probabilities already
    applied (mcore scales each expert's ``linear_fc2`` input by them)."""
    local_experts(layer)  # refuses grouped-GEMM experts
    return layer.mlp.experts


def moe_token_sources(layer) -> List[int]:
    """The expert parallel rank each chunk of a local expert's dispatched tokens comes from, in
    the order mcore's token dispatcher lays the chunks out.

    Each chunk holds the tokens that one (expert tensor parallel rank, expert parallel rank)
    routed to the expert, in ascending token order. Without sequence parallelism the tensor
    parallel ranks hold the same tokens, so a token arrives once per expert tensor parallel
    rank: the all-to-all dispatcher (EP > 1) gathers its chunks tensor-parallel-rank-major,
    [(tp, ep) for tp for ep]; the all-gather dispatcher (EP = 1) one chunk per TP rank.
    """
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    dispatcher = layer.mlp.token_dispatcher
    tp, ep = dispatcher.tp_size, dispatcher.ep_size
    if isinstance(dispatcher, MoEAlltoAllTokenDispatcher) and not dispatcher.drop_and_pad:
        return [rank for _ in range(tp) for rank in range(ep)]
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher) and ep == 1:
        return [0] * tp
    raise NotImplementedError(f"{type(dispatcher).__name__} at EP={ep} (token order unknown); "
                              "use the all-to-all dispatcher for EP > 1 without capacity")


def expert_parallel_group():
    return parallel_state.get_expert_model_parallel_group()


def expert_parallel_rank() -> int:
    return parallel_state.get_expert_model_parallel_rank()


def expert_tensor_parallel_group():
    """The group an expert's neurons are split over (mcore's expert tensor parallel group;
    the tensor parallel group unless set apart)."""
    return parallel_state.get_expert_tensor_parallel_group()


def expert_data_parallel_group():
    """The data parallel ranks holding the same experts (they see different tokens)."""
    return parallel_state.get_expert_data_parallel_group()


MOE_AUX_LOSS = "load_balancing_loss"
"""The name mcore's routers record their load-balancing (``aux_loss``) loss under."""


def moe_aux_loss_record():
    """What mcore's routers recorded of the load-balancing loss since the last
    :func:`clear_moe_aux_loss_record`: ``(values, sum_group, average_over_dp)`` or None when no
    router of this rank recorded one. ``values`` [num_layers]: each layer's loss (without its
    coefficient) summed over the micro-batches; ``sum_group``: the group whose partial values
    add up (mcore's TP×CP group), or None; ``average_over_dp``: whether the data parallel ranks'
    values are to be averaged. mcore >= 0.17 keeps them in its MoE metrics tracker, earlier
    versions in a module dict."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(MOE_AUX_LOSS)
        if entry is None:
            return None
        return (entry["values"], entry.get("reduce_group"),
                not entry.get("reduce_group_has_dp", False))
    entry = get_moe_metrics_tracker().metrics.get(MOE_AUX_LOSS)
    if entry is None:
        return None
    return entry.values, entry.reduce_group, entry.needs_dp_avg


def clear_moe_aux_loss_record() -> None:
    """Drops what :func:`moe_aux_loss_record` reads (every metric mcore's routers recorded,
    with the process groups they name; the routers make new entries as they record)."""
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        return
    destroy_moe_metrics_tracker()


def moe_aux_loss_scale() -> Optional[torch.Tensor]:
    """The factor mcore's routers multiply the load-balancing loss's gradient by in backward
    (``MoEAuxLossAutoScaler``; set by the pipeline schedule at each micro-batch), or None
    before any was set."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    return MoEAuxLossAutoScaler.main_loss_backward_scale
