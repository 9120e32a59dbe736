"""Iterative pruning: T rounds of (estimate importance, prune one step), ending at the target.

Round t prunes to the architecture a fraction t/T of the way from the source to the target
(rounded to shapes the target layout divides); importance is re-estimated on each intermediate
model, so later choices see the effect of earlier ones (paper 2407.14679 §2.2, "iterative").
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Callable, Dict, List, Optional, Union

from megatron_minitron import parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.prune.api import prune_checkpoint
from megatron_minitron.prune.plan import (
    DEFAULT_HEAD_ADD_BACK,
    head_add_back_mode,
    target_config,
)


def _step(source: int, target: int, fraction: float, multiple: int) -> int:
    value = source - (source - target) * fraction
    value = int(math.ceil(value / multiple) * multiple)
    return max(target, min(source, value))


def round_targets(source: ModelConfig, final: ModelConfig, rounds: int, tp: int = 1,
                  pp: int = 1) -> List[Dict[str, int]]:
    """The target of each round (the last one is ``final``), every one buildable at TP/PP."""
    if rounds < 1:
        raise UsageError(f"--iterations {rounds} must be >= 1")
    targets = []
    for t in range(1, rounds + 1):
        fraction = t / rounds
        groups = _step(source.num_query_groups, final.num_query_groups, fraction, tp)
        per_group = _step(source.heads_per_group, final.heads_per_group, fraction, 1)
        targets.append({
            "num_layers": _step(source.num_layers, final.num_layers, fraction, pp),
            "hidden_size": _step(source.hidden_size, final.hidden_size, fraction, 1),
            "ffn_hidden_size": _step(source.ffn_hidden_size, final.ffn_hidden_size, fraction, tp),
            "num_query_groups": groups,
            "num_attention_heads": groups * per_group,
        })
        if source.is_moe:  # every round keeps at least the final (>= top-k) experts
            targets[-1]["num_moe_experts"] = _step(source.num_moe_experts,
                                                   final.num_moe_experts, fraction, 1)
            targets[-1]["moe_ffn_hidden_size"] = _step(
                source.moe_ffn_hidden_size, final.moe_ffn_hidden_size, fraction, tp)
            if source.moe_shared_expert_intermediate_size is not None:
                targets[-1]["moe_shared_expert_intermediate_size"] = _step(
                    source.moe_shared_expert_intermediate_size,
                    final.moe_shared_expert_intermediate_size, fraction, tp)
    return targets


def iterative_prune(load: str, target: Dict[str, int], output: str, rounds: int,
                    estimate: Callable[[str], Dict], first_scores: Optional[Dict] = None,
                    depth_metric: str = "ppl",
                    head_add_back: Union[bool, str] = DEFAULT_HEAD_ADD_BACK,
                    target_tp: int = 1, target_pp: int = 1, output_format: str = "minitron",
                    tokenizer: Optional[str] = None) -> List[str]:
    """Prunes ``load`` to ``target`` in ``rounds`` steps (collective when ``estimate`` is).

    Args:
        estimate: ``estimate(checkpoint) -> scores`` (all ranks call it; may be collective).
        first_scores: scores of ``load`` for the first round (estimated if None).
        output_format: format of ``output`` (the rounds are always ours).
        head_add_back: ``none``, ``query`` or ``output`` (see ``prune_checkpoint``), every round.
        tokenizer: tokenizer folder to save with the rounds (default: ``load``'s own).

    Returns:
        The intermediate checkpoint paths (kept under ``output + ".rounds"``) and ``output``.
    """
    head_add_back = head_add_back_mode(head_add_back)
    source = io.load_config(load)
    final = target_config(source, target, target_tp, target_pp)
    steps = round_targets(source, final, rounds, target_tp, target_pp)
    work = output + ".rounds"
    paths, current, scores = [], load, first_scores
    for index, step in enumerate(steps, start=1):
        if scores is None:
            scores = estimate(current)
        path = output if index == len(steps) else os.path.join(work, f"round{index}")
        if parallel.is_rank0():
            os.makedirs(work, exist_ok=True)
            last = index == len(steps)
            prune_checkpoint(current, scores, step, path, depth_metric=depth_metric,
                             head_add_back=head_add_back, target_tp=target_tp,
                             target_pp=target_pp,
                             output_format=output_format if last else "minitron",
                             tokenizer=tokenizer)
        parallel.barrier()
        paths.append(path)
        current, scores = path, None
    if parallel.is_rank0() and os.path.isdir(work) and not os.listdir(work):
        shutil.rmtree(work)
    return paths
