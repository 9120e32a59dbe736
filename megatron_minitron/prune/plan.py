"""What to keep: the target architecture and the per-layer indices chosen from importance scores.

Kept indices are always sorted in their original order, so a pruned model is exactly a
sub-network of its source (apart from hidden-size pruning, which changes what a norm averages).

GQA-aware head pruning: the ``num_query_groups`` groups with the highest ``query_group`` score are
kept; inside each kept group the ``num_attention_heads / num_query_groups`` heads with the highest
``head`` score are kept, so every group keeps the same number of query heads and its own K/V.

Mixture-of-experts layers: the ``num_moe_experts`` routed experts with the highest ``expert``
score are kept in every MoE layer (in their original order, with their router rows); inside
each kept expert the ``moe_ffn_hidden_size`` neurons with the highest ``expert_neuron`` score,
and the ``moe_shared_expert_intermediate_size`` shared-expert neurons with the highest
``shared_neuron`` score. ``ffn_hidden_size`` trims the dense layers of a mixed stack only. When
layers are dropped, the pruned config carries the kept layers' dense/MoE pattern as a
``moe_layer_freq`` list.

Head add-back (paper 2407.14679 §2.2): when heads inside a group are pruned, each kept head i
takes the residual of a pruned partner j of its group, ``head_i + (head_i − head_j)``. Where that
is applied is the mode (:data:`HEAD_ADD_BACK_MODES`): ``query`` on the kept head's query rows of
the fused QKV projection (the paper's form for grouped-query attention), ``output`` on its
columns of the attention output projection, ``none`` not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError

TARGET_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups")
"""The architecture fields every model's pruning may shrink."""
MOE_TARGET_KEYS = ("num_moe_experts", "moe_ffn_hidden_size",
                   "moe_shared_expert_intermediate_size")
"""The fields a mixture-of-experts model's pruning may shrink besides :data:`TARGET_KEYS`."""
ALL_TARGET_KEYS = TARGET_KEYS + MOE_TARGET_KEYS
MOE_SCORE_KEYS = {"num_moe_experts": "expert", "moe_ffn_hidden_size": "expert_neuron",
                  "moe_shared_expert_intermediate_size": "shared_neuron"}
"""The importance score each MoE target field is chosen by."""
DEPTH_METRICS = ("ppl", "bi", "block_bi")
HEAD_ADD_BACK_MODES = ("none", "query", "output")
DEFAULT_HEAD_ADD_BACK = "none"
"""The head add-back mode of ``minitron prune``/``search``, recipes and the Python API."""


def head_add_back_mode(value: Union[bool, str]) -> str:
    """A mode of :data:`HEAD_ADD_BACK_MODES`; ``True`` (the old switch) is ``output``, ``False``
    ``none``."""
    if value is True:
        return "output"
    if value is False:
        return "none"
    if isinstance(value, str) and value in HEAD_ADD_BACK_MODES:
        return value
    raise UsageError(f"--head-add-back {value!r} is unknown; use {', '.join(HEAD_ADD_BACK_MODES)} "
                     "(a bare --head-add-back means output, --no-head-add-back none)")


def target_keys(source: ModelConfig) -> Tuple[str, ...]:
    """The fields ``source``'s pruning can shrink: :data:`TARGET_KEYS`, and for a
    mixture-of-experts model the MoE fields it has (the shared expert's only with one)."""
    if not source.is_moe:
        return TARGET_KEYS
    return TARGET_KEYS + tuple(key for key in MOE_TARGET_KEYS
                               if getattr(source, key) is not None)


def _unknown_key(key: str) -> UsageError:
    return UsageError(f"--target key {key!r} is unknown; use {', '.join(ALL_TARGET_KEYS)}")


def parse_target(text: str) -> Dict[str, int]:
    """``"num_layers=16,hidden_size=384"`` → dict; unknown keys and bad values are errors."""
    target: Dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"--target item {item!r} is not KEY=VALUE (e.g. num_layers=16)")
        if key not in ALL_TARGET_KEYS:
            raise _unknown_key(key)
        try:
            target[key] = int(value)
        except ValueError:
            raise UsageError(f"--target {key}={value!r} is not an integer") from None
    return target


def target_config(source: ModelConfig, target: Dict[str, int], tp: int = 1, pp: int = 1,
                  kept_layers: Optional[Sequence[int]] = None) -> ModelConfig:
    """The pruned ModelConfig; raises UsageError when the target cannot be built from source.

    ``kept_layers``: the source layers kept (known once they are chosen). A mixture-of-experts
    model whose depth shrinks carries their dense/MoE pattern as a ``moe_layer_freq`` list;
    without ``kept_layers`` that is the pattern of the first ``num_layers`` layers.
    """
    for key, value in target.items():
        if key not in ALL_TARGET_KEYS:
            raise _unknown_key(key)
        if key in MOE_TARGET_KEYS and not source.is_moe:
            raise UsageError(f"--target {key}={value}: the source is a dense model (no "
                             "mixture-of-experts layers); drop that key")
        if key in MOE_TARGET_KEYS and getattr(source, key) is None:
            raise UsageError(f"--target {key}={value}: the source has no shared expert; drop "
                             "that key")
        if value < 1:
            raise UsageError(f"--target {key}={value} must be >= 1")
        if value > getattr(source, key):
            raise UsageError(f"--target {key}={value} is larger than the source's "
                             f"{getattr(source, key)}; pruning only shrinks")
    experts = target.get("num_moe_experts")
    if experts is not None and experts < source.moe_router_topk:
        raise UsageError(f"--target num_moe_experts={experts} is fewer than moe_router_topk="
                         f"{source.moe_router_topk} (the experts each token is routed to); keep "
                         f"at least num_moe_experts={source.moe_router_topk}")
    heads = target.get("num_attention_heads", source.num_attention_heads)
    groups = target.get("num_query_groups", min(source.num_query_groups, heads))
    if heads % groups:
        raise UsageError(f"--target num_attention_heads={heads} is not divisible by "
                         f"num_query_groups={groups}; choose heads as a multiple of groups")
    if heads // groups > source.heads_per_group:
        raise UsageError(f"--target keeps {heads // groups} heads per query group but the source "
                         f"groups hold {source.heads_per_group}; keep more query groups")
    keys = target_keys(source)
    merged = {key: target.get(key, getattr(source, key)) for key in keys}
    merged["num_query_groups"] = groups
    if source.is_moe:
        kept = list(range(merged["num_layers"])) if kept_layers is None else list(kept_layers)
        if kept != list(range(source.num_layers)):
            pattern = source.moe_layers()
            merged["moe_layer_freq"] = [int(pattern[i]) for i in kept]
    extra = dict(source.extra, pruned_from={k: getattr(source, k) for k in keys})
    cfg = source.replace(kv_channels=source.kv_channels, extra=extra, **merged)
    try:
        cfg.check_layout(tp, pp)
    except ValueError as err:
        raise UsageError(f"target architecture at the output layout: {err}") from None
    return cfg


@dataclass
class LayerPlan:
    """Indices kept in one (source) layer."""

    source_layer: int
    groups: List[int]
    """Kept query groups (source indices)."""
    heads: List[int]
    """Kept query heads (source global head indices), group by group in original order."""
    neurons: List[int]
    """Kept MLP neurons."""
    add_back: List[Tuple[int, int]] = field(default_factory=list)
    """(kept head, pruned head) pairs for the residual add-back."""
    moe: bool = False
    """A mixture-of-experts layer (its MLP is the fields below, ``neurons`` is unused)."""
    experts: List[int] = field(default_factory=list)
    """Kept routed experts (source indices, original order)."""
    expert_neurons: List[List[int]] = field(default_factory=list)
    """Kept neurons of each kept expert (one list per entry of ``experts``)."""
    shared_neurons: List[int] = field(default_factory=list)
    """Kept neurons of the shared expert (empty without one)."""


@dataclass
class PrunePlan:
    source: ModelConfig
    target: ModelConfig
    layers: List[LayerPlan]
    channels: List[int]
    head_add_back: str
    """Where kept heads take their pruned partners' residual: none, query or output."""

    @property
    def kept_layers(self) -> List[int]:
        return [layer.source_layer for layer in self.layers]


def _top(scores: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest scores, in ascending index order (stable on ties)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def choose_layers(scores: Dict, source: ModelConfig, num_layers: int, metric: Optional[str],
                  drop: Optional[Sequence[int]]) -> List[int]:
    """Source layers to keep, in order."""
    total = source.num_layers
    if drop is not None:
        bad = [i for i in drop if not 0 <= i < total]
        if bad:
            raise UsageError(f"--drop-layers {bad} out of range 0..{total - 1}")
        if len(set(drop)) != len(drop):
            raise UsageError(f"--drop-layers {list(drop)} has repeats; list each layer once")
        if len(drop) >= total:
            raise UsageError(f"--drop-layers would remove all {total} layers")
        return [i for i in range(total) if i not in set(drop)]
    remove = total - num_layers
    if remove == 0:
        return list(range(total))
    if metric not in DEPTH_METRICS:
        raise UsageError(f"--depth-metric {metric!r} is unknown; use {', '.join(DEPTH_METRICS)}")
    if metric == "ppl":
        # a layer whose removal hurts perplexity least is least important
        return _top(scores["layer_ppl"], num_layers)
    if metric == "bi":
        return _top(scores["layer_bi"], num_layers)
    windows = scores["block_bi"][remove]  # [L − remove + 1]: remove the least important block
    start = int(torch.argmin(windows.double()))
    return [i for i in range(total) if not start <= i < start + remove]


def build_plan(scores: Dict, source: ModelConfig, target: ModelConfig,
               depth_metric: Optional[str] = "ppl", drop_layers: Optional[Sequence[int]] = None,
               head_add_back: Union[bool, str] = DEFAULT_HEAD_ADD_BACK) -> PrunePlan:
    """Chooses every kept index from ``scores`` (see ``importance``)."""
    head_add_back = head_add_back_mode(head_add_back)
    for key in ("layer_ppl", "layer_bi", "block_bi"):
        needed = (drop_layers is None and target.num_layers < source.num_layers
                  and key == {"ppl": "layer_ppl", "bi": "layer_bi",
                              "block_bi": "block_bi"}.get(depth_metric))
        if needed and key not in scores:
            raise UsageError(f"scores lack {key} (computed with --no-depth?); recompute them or "
                             "pass --drop-layers")
    kept_layers = choose_layers(scores, source, target.num_layers, depth_metric, drop_layers)
    if len(kept_layers) != target.num_layers:
        raise UsageError(f"--drop-layers leaves {len(kept_layers)} layers but the target has "
                         f"num_layers={target.num_layers}; make them agree")
    if source.is_moe and kept_layers != list(range(source.num_layers)):
        pattern = source.moe_layers()  # the kept layers' dense/MoE pattern
        target = target.replace(moe_layer_freq=[int(pattern[i]) for i in kept_layers])
    moe_layers = source.moe_layers()
    _check_moe_scores(scores, source, target)
    per_group_src, per_group = source.heads_per_group, target.heads_per_group
    layers = []
    for layer in kept_layers:
        groups = _top(scores["query_group"][layer], target.num_query_groups)
        heads, add_back = [], []
        for group in groups:
            members = list(range(group * per_group_src, (group + 1) * per_group_src))
            member_scores = scores["head"][layer][members]
            kept = [members[i] for i in _top(member_scores, per_group)]
            heads.extend(kept)
            if head_add_back != "none" and per_group < per_group_src:
                add_back.extend(_add_back_pairs(members, member_scores, per_group))
        if moe_layers[layer]:
            layers.append(_moe_layer_plan(scores, source, target,
                                          LayerPlan(layer, groups, heads, [], add_back, True)))
            continue
        neurons = _top(scores["neuron"][layer], target.ffn_hidden_size)
        layers.append(LayerPlan(layer, groups, heads, neurons, add_back))
    channels = _top(scores["channel"], target.hidden_size)
    return PrunePlan(source, target, layers, channels, head_add_back)


def _check_moe_scores(scores: Dict, source: ModelConfig, target: ModelConfig) -> None:
    """Scores for every MoE field that shrinks must be present (older scores files lack them)
    and shaped for this model."""
    if not source.is_moe:
        return
    layers, experts = source.num_layers, source.num_moe_experts
    shapes = {"expert": (layers, experts),
              "expert_neuron": (layers, experts, source.moe_ffn_hidden_size),
              "shared_neuron": (layers, source.moe_shared_expert_intermediate_size)}
    for key, score in MOE_SCORE_KEYS.items():
        if getattr(source, key) != getattr(target, key) and score not in scores:
            raise UsageError(f"scores lack {score!r}, needed to prune {key}; recompute them with "
                             "`minitron importance` on this mixture-of-experts checkpoint")
        if (score in scores and None not in shapes[score]
                and tuple(scores[score].shape) != shapes[score]):
            raise UsageError(f"scores {score!r} have shape {list(scores[score].shape)}, not "
                             f"{list(shapes[score])}: computed on a different model; recompute "
                             "them on this checkpoint")


def _keep(scores: Dict, key: str, index: Tuple[int, ...], keep: int, total: int) -> List[int]:
    """The ``keep`` of ``total`` indices with the highest ``scores[key][index]``, or all of
    them (no score needed) when nothing is pruned."""
    if keep == total:
        return list(range(total))
    values = scores[key]
    for i in index:
        values = values[i]
    return _top(values, keep)


def _moe_layer_plan(scores: Dict, source: ModelConfig, target: ModelConfig,
                    plan: LayerPlan) -> LayerPlan:
    """Fills in the kept experts, their neurons and the shared expert's neurons."""
    layer = plan.source_layer
    plan.experts = _keep(scores, "expert", (layer,), target.num_moe_experts,
                         source.num_moe_experts)
    plan.expert_neurons = [_keep(scores, "expert_neuron", (layer, expert),
                                 target.moe_ffn_hidden_size, source.moe_ffn_hidden_size)
                           for expert in plan.experts]
    if source.moe_shared_expert_intermediate_size is not None:
        plan.shared_neurons = _keep(scores, "shared_neuron", (layer,),
                                    target.moe_shared_expert_intermediate_size,
                                    source.moe_shared_expert_intermediate_size)
    return plan


def _add_back_pairs(members: List[int], member_scores: torch.Tensor,
                    keep: int) -> List[Tuple[int, int]]:
    """Pairs (kept head i, pruned head 2K−i+1) by importance rank inside one query group.

    With the group's heads ranked 1..n by score and the top K kept, kept head of rank i receives
    the pruned head of rank 2K − i + 1 (the least important kept head meets the most important
    pruned one), for every i where that rank exists.
    """
    ranked = [members[i] for i in torch.argsort(member_scores.double(), descending=True,
                                                stable=True).tolist()]
    pairs = []
    for rank in range(1, keep + 1):
        partner = 2 * keep - rank + 1
        if partner <= len(ranked):
            pairs.append((ranked[rank - 1], ranked[partner - 1]))
    return pairs
