"""Trimming weights to a :class:`PrunePlan`, one layer slice at a time.

Where hidden size appears: embedding columns, every norm (its own module's weight, or the
``layer_norm_weight``/``layer_norm_bias`` of the linear it is fused into), QKV and FC1 input
columns, attention projection and FC2 output rows (and their biases), the untied output layer's
columns. The per-head query/key norms (Qwen3's ``qk_layernorm``) span one head's channels, which
no target changes, so they are kept whole.

Head add-back: for each (kept i, pruned j) pair inside a query group (the paper's
head_i + (head_i − head_{2K−i+1}), see :mod:`megatron_minitron.prune.plan`), before any row or
column is dropped,

* ``query``: the kept head's rows of the fused QKV weight (and bias) become
  ``Q_i + (Q_i − Q_j)``, where ``Q_h`` are query head h's rows; K/V rows are untouched;
* ``output``: the kept head's output-projection columns become
  ``W_o[:, i] + (W_o[:, i] − W_o[:, j])``, applied to what each head writes into the residual
  stream.

Heads of whole pruned query groups are not added back (their K/V leave with them).

Mixture-of-experts layers: the router keeps the kept experts' rows (and bias entries); every
kept routed expert and the shared expert is an MLP trimmed like the dense one, to its own kept
neurons; hidden size also trims the router's and the shared expert gate's columns. In a
checkpoint the routed experts' tensors are stacked over the global expert index
(``mlp.experts.experts.linear_fc1.weight``: [experts, ...]); they can be pruned one expert at a
time (:func:`prune_expert_tensor`).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_minitron.errors import UsageError
from megatron_minitron.prune.plan import LayerPlan, PrunePlan


HEAD_NORM_PREFIXES = ("self_attention.q_layernorm.", "self_attention.k_layernorm.")
"""Layer parameters normalising each head over its kv_channels (shared by all heads)."""


def _index(values: List[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def query_rows(plan: PrunePlan, head: int) -> slice:
    """Rows of query head ``head`` (a source global index) in the fused QKV weight, whose rows
    go group by group, each group [its query heads…, k, v] (``adapter.attention_qkv``)."""
    d, per_group = plan.source.kv_channels, plan.source.heads_per_group
    group, local = divmod(head, per_group)
    start = group * (per_group + 2) * d + local * d
    return slice(start, start + d)


def qkv_rows(plan: PrunePlan, layer: LayerPlan) -> List[int]:
    """Rows of the fused QKV weight kept, in mcore's per-group [q heads…, k, v] layout."""
    d, per_group = plan.source.kv_channels, plan.source.heads_per_group
    block = (per_group + 2) * d
    kept = set(layer.heads)
    rows = []
    for group in layer.groups:
        start = group * block
        for local in range(per_group):
            if group * per_group + local in kept:
                rows.extend(range(start + local * d, start + (local + 1) * d))
        rows.extend(range(start + per_group * d, start + (per_group + 2) * d))  # k, v
    return rows


def head_columns(plan: PrunePlan, heads: List[int]) -> List[int]:
    d = plan.source.kv_channels
    return [c for head in heads for c in range(head * d, (head + 1) * d)]


def _add_back_query(tensor: torch.Tensor, plan: PrunePlan, layer: LayerPlan) -> torch.Tensor:
    """Fused QKV weight [groups*(heads_per_group+2)*d, h] or bias with pruned heads' query
    residual added into the kept heads' query rows."""
    if plan.head_add_back != "query" or not layer.add_back:
        return tensor
    tensor = tensor.clone()
    for kept, pruned in layer.add_back:
        rows_i, rows_j = query_rows(plan, kept), query_rows(plan, pruned)
        tensor[rows_i] = tensor[rows_i] + (tensor[rows_i] - tensor[rows_j])
    return tensor


def _add_back_output(weight: torch.Tensor, plan: PrunePlan, layer: LayerPlan) -> torch.Tensor:
    """[h, heads*d] output projection with pruned heads' residual added into kept heads."""
    if plan.head_add_back != "output" or not layer.add_back:
        return weight
    d = plan.source.kv_channels
    weight = weight.clone()
    for kept, pruned in layer.add_back:
        cols_i = slice(kept * d, (kept + 1) * d)
        cols_j = slice(pruned * d, (pruned + 1) * d)
        weight[:, cols_i] = weight[:, cols_i] + (weight[:, cols_i] - weight[:, cols_j])
    return weight


def prune_layer_tensor(suffix: str, tensor: torch.Tensor, plan: PrunePlan,
                       layer: LayerPlan) -> torch.Tensor:
    """Prunes one layer's tensor named ``suffix`` (e.g. ``mlp.linear_fc1.weight``)."""
    from megatron_minitron import adapter  # imports mcore: kept out of ``import prune``

    channels = _index(plan.channels)
    if suffix.startswith(HEAD_NORM_PREFIXES):
        return tensor
    if adapter.is_norm_parameter(suffix):  # standalone or fused into linear_qkv/linear_fc1
        return tensor.index_select(0, channels)
    if suffix == "self_attention.linear_qkv.weight":
        weight = _add_back_query(tensor, plan, layer)
        return weight.index_select(0, _index(qkv_rows(plan, layer))).index_select(1, channels)
    if suffix == "self_attention.linear_qkv.bias":
        return _add_back_query(tensor, plan, layer).index_select(0, _index(qkv_rows(plan, layer)))
    if suffix == "self_attention.linear_proj.weight":
        weight = _add_back_output(tensor, plan, layer)
        return weight.index_select(0, channels).index_select(
            1, _index(head_columns(plan, layer.heads)))
    if suffix == "self_attention.linear_proj.bias":
        return tensor.index_select(0, channels)
    if suffix.startswith("mlp.linear_fc"):
        return _prune_mlp(suffix[len("mlp."):], tensor, plan, plan.source.ffn_hidden_size,
                          layer.neurons)
    if suffix.startswith("mlp.shared_experts.linear_fc"):
        return _prune_mlp(suffix[len("mlp.shared_experts."):], tensor, plan,
                          plan.source.moe_shared_expert_intermediate_size, layer.shared_neurons)
    if suffix == "mlp.shared_experts.gate_weight":  # [1, h]
        return tensor.index_select(1, channels)
    if suffix == "mlp.router.weight":  # [experts, h]
        return tensor.index_select(0, _index(layer.experts)).index_select(1, channels)
    if suffix in ("mlp.router.bias", "mlp.router.expert_bias"):  # [experts]
        return tensor.index_select(0, _index(layer.experts))
    if suffix.startswith(adapter.EXPERTS_CHECKPOINT_PREFIX):  # [experts, ...]
        name = suffix[len(adapter.EXPERTS_CHECKPOINT_PREFIX):]
        return torch.stack([prune_expert_tensor(name, tensor[expert], plan, layer, position)
                            for position, expert in enumerate(layer.experts)])
    raise UsageError(f"cannot prune layer parameter {suffix!r}: the architecture has a part "
                     "this pruner does not know")


def _prune_mlp(name: str, tensor: torch.Tensor, plan: PrunePlan, width: int,
               neurons: List[int]) -> torch.Tensor:
    """One MLP's ``name`` (``linear_fc1.weight``/``.bias``, ``linear_fc2.weight``/``.bias``)
    trimmed to ``neurons`` of its ``width`` and to the kept channels."""
    channels = _index(plan.channels)
    if name in ("linear_fc1.weight", "linear_fc1.bias"):
        rows = list(neurons)
        if plan.source.gated:  # global layout [gate; up]
            rows += [width + n for n in neurons]
        out = tensor.index_select(0, _index(rows))
        return out.index_select(1, channels) if out.dim() == 2 else out
    if name == "linear_fc2.weight":
        return tensor.index_select(0, channels).index_select(1, _index(neurons))
    if name == "linear_fc2.bias":
        return tensor.index_select(0, channels)
    raise UsageError(f"cannot prune MLP parameter {name!r}: the architecture has a part this "
                     "pruner does not know")


def prune_expert_tensor(name: str, tensor: torch.Tensor, plan: PrunePlan, layer: LayerPlan,
                        position: int) -> torch.Tensor:
    """One kept routed expert's tensor ``name`` (e.g. ``linear_fc1.weight``, without the expert
    axis), trimmed to the neurons kept for it; ``position``: its index in ``layer.experts``."""
    return _prune_mlp(name, tensor, plan, plan.source.moe_ffn_hidden_size,
                      layer.expert_neurons[position])


def prune_global_tensor(key: str, tensor: torch.Tensor, plan: PrunePlan) -> torch.Tensor:
    """Prunes a tensor outside the layers (embedding, final norm, output layer)."""
    channels = _index(plan.channels)
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return tensor.index_select(1, channels)
    if key.startswith("decoder.final_layernorm."):
        return tensor.index_select(0, channels)
    raise UsageError(f"cannot prune parameter {key!r}: the architecture has a part this pruner "
                     "does not know")


def prune_state_dict(state: Dict[str, torch.Tensor], plan: PrunePlan) -> Dict[str, torch.Tensor]:
    """Prunes an in-memory TP=1 (EP=1) state dict (``decoder.layers.{i}.<suffix>`` naming;
    routed experts under ``mlp.experts.local_experts.{e}.``, renumbered as they are kept)."""
    from megatron_minitron import adapter

    out = {}
    prefix = "decoder.layers."
    for new_index, layer in enumerate(plan.layers):
        marker = f"{prefix}{layer.source_layer}."
        for key, tensor in state.items():
            if not key.startswith(marker):
                continue
            suffix = key[len(marker):]
            expert = adapter.local_expert_key(suffix)
            if expert is None:
                out[f"{prefix}{new_index}.{suffix}"] = prune_layer_tensor(suffix, tensor, plan,
                                                                          layer)
            elif expert[0] in layer.experts:
                position = layer.experts.index(expert[0])
                name = adapter.local_expert_suffix(position, expert[1])
                out[f"{prefix}{new_index}.{name}"] = prune_expert_tensor(expert[1], tensor, plan,
                                                                         layer, position)
    for key, tensor in state.items():
        if not key.startswith(prefix):
            out[key] = prune_global_tensor(key, tensor, plan)
    return out
