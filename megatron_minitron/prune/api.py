"""``prune_checkpoint``: a checkpoint of ours → a pruned checkpoint of ours, streamed.

The source is read one layer slice at a time and the output written one slice at a time, so
memory stays at about two layers plus the scores whatever the model size; the output is a normal
checkpoint that loads at any TP/PP and exports to Hugging Face.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch

from megatron_minitron.checkpoint import io
from megatron_minitron.checkpoint.stream import (
    LAYER_PREFIX,
    CheckpointReader,
    TensorSpec,
    write_streaming_checkpoint,
)
from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.prune.apply import (
    prune_expert_tensor,
    prune_global_tensor,
    prune_layer_tensor,
)
from megatron_minitron.prune.plan import (
    DEFAULT_HEAD_ADD_BACK,
    PrunePlan,
    build_plan,
    head_add_back_mode,
    target_config,
)

logger = logging.getLogger("megatron_minitron")


def describe_counts(cfg: ModelConfig) -> str:
    counts = count_parameters(cfg)
    text = (f"{counts['total'] / 1e6:.3f}M parameters ({counts['non_embedding'] / 1e6:.3f}M "
            f"non-embedding): layers={cfg.num_layers} hidden={cfg.hidden_size} "
            f"ffn={cfg.ffn_hidden_size} heads={cfg.num_attention_heads} "
            f"groups={cfg.num_query_groups} head_dim={cfg.kv_channels}")
    if cfg.is_moe:
        text += (f" experts={cfg.num_moe_experts} (top-{cfg.moe_router_topk}) "
                 f"expert_ffn={cfg.moe_ffn_hidden_size}"
                 f" shared_ffn={cfg.moe_shared_expert_intermediate_size}"
                 f"; {counts['active'] / 1e6:.3f}M active")
    return text


def plan_pruning(source: ModelConfig, scores: Dict[str, Any], target: Dict[str, int],
                 depth_metric: Optional[str] = "ppl", drop_layers: Optional[Sequence[int]] = None,
                 head_add_back: Union[bool, str] = DEFAULT_HEAD_ADD_BACK, target_tp: int = 1,
                 target_pp: int = 1) -> PrunePlan:
    """Checks the request and chooses what to keep (no weights touched)."""
    head_add_back = head_add_back_mode(head_add_back)
    if drop_layers is not None:
        target = dict(target)
        expected = source.num_layers - len(drop_layers)
        if target.setdefault("num_layers", expected) != expected:
            raise UsageError(f"--drop-layers removes {len(drop_layers)} of {source.num_layers} "
                             f"layers but --target num_layers={target['num_layers']}; make them agree")
    pruned = target_config(source, target, target_tp, target_pp)
    return build_plan(scores, source, pruned, depth_metric, drop_layers, head_add_back)


def _layer_specs(reader: CheckpointReader, plan: PrunePlan):
    """One TensorSpec per output layer key (stacked over the kept layers, or one per layer for
    a mixed dense/MoE stack, as mcore saves the target); each chunk is one kept layer, or one
    kept routed expert of it, read and pruned on demand."""
    from megatron_minitron import adapter

    stacked = adapter.checkpoint_layers_stacked(plan.target)
    specs: Dict[str, TensorSpec] = {}
    for new_index, layer in enumerate(plan.layers):
        for suffix, key in sorted(reader.layer_tensors(layer.source_layer).items()):
            shape = _pruned_shape(reader, key, suffix, plan, layer)
            if stacked:
                out_key, lead = LAYER_PREFIX + suffix, (new_index,)
                if out_key not in specs:
                    specs[out_key] = TensorSpec(out_key, (len(plan.layers),) + shape,
                                                reader.dtypes[key], [])
            else:
                out_key, lead = f"{LAYER_PREFIX}{new_index}.{suffix}", ()
                specs[out_key] = TensorSpec(out_key, shape, reader.dtypes[key], [])
            specs[out_key].chunks.extend(_layer_chunks(reader, key, suffix, plan, layer, lead,
                                                       shape))
    return list(specs.values())


def _layer_chunks(reader, key, suffix, plan, layer, lead, shape):
    """(offsets, sizes, producer) of one kept layer's tensor; ``lead``: its index on the
    stacked layer axis (empty when stored per layer)."""
    from megatron_minitron import adapter

    ones = (1,) * len(lead)
    if not suffix.startswith(adapter.EXPERTS_CHECKPOINT_PREFIX):
        def produce():
            tensor = reader.read_layer(key, layer.source_layer)
            return prune_layer_tensor(suffix, tensor, plan, layer).reshape(ones + shape)

        return [(lead + (0,) * len(shape), ones + shape, produce)]
    name = suffix[len(adapter.EXPERTS_CHECKPOINT_PREFIX):]
    chunks = []
    for position, expert in enumerate(layer.experts):  # one expert in memory at a time
        def produce(position=position, expert=expert):
            tensor = reader.read_layer(key, layer.source_layer, rows=(expert, expert + 1))[0]
            pruned = prune_expert_tensor(name, tensor, plan, layer, position)
            return pruned.reshape(ones + (1,) + shape[1:])

        chunks.append((lead + (position,) + (0,) * (len(shape) - 1),
                       ones + (1,) + shape[1:], produce))
    return chunks


def _pruned_shape(reader, key, suffix, plan, layer):
    probe = torch.empty(reader.layer_shape(key), device="meta")
    return tuple(prune_layer_tensor(suffix, probe, plan, layer).shape)


def _global_specs(reader: CheckpointReader, plan: PrunePlan, chunk_bytes: int = 8 << 20):
    """Embedding-sized tensors are streamed in blocks of rows (only columns are pruned)."""
    specs = []
    for key in reader.global_keys():
        source_shape = tuple(reader.shapes[key])
        probe = torch.empty(source_shape, device="meta")
        shape = tuple(prune_global_tensor(key, probe, plan).shape)
        row_bytes = max(1, reader.dtypes[key].itemsize * int(torch.Size(source_shape[1:]).numel()))
        step = max(1, chunk_bytes // row_bytes) if len(shape) == 2 else shape[0]
        chunks = []
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)

            def produce(key=key, rows=(start, stop) if len(shape) == 2 else None):
                return prune_global_tensor(key, reader.read([key], rows=rows)[key], plan)

            chunks.append(((start,) + (0,) * (len(shape) - 1), (stop - start,) + shape[1:],
                           produce))
        specs.append(TensorSpec(key, shape, reader.dtypes[key], chunks))
    return specs


def prune_checkpoint(load: str, scores: Union[str, Dict[str, Any]], target: Dict[str, int],
                     output: str, depth_metric: Optional[str] = "ppl",
                     drop_layers: Optional[Sequence[int]] = None,
                     head_add_back: Union[bool, str] = DEFAULT_HEAD_ADD_BACK,
                     target_tp: int = 1, target_pp: int = 1, output_format: str = "minitron",
                     tokenizer: Optional[str] = None) -> PrunePlan:
    """Prunes checkpoint ``load`` to ``target`` using ``scores`` and writes ``output``.

    Args:
        load: source checkpoint (any layout it was saved at).
        scores: SCORES path or dict from ``minitron importance`` on this checkpoint.
        target: subset of num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
            num_query_groups and, for a mixture-of-experts model, num_moe_experts,
            moe_ffn_hidden_size, moe_shared_expert_intermediate_size; omitted keys are kept.
        output: new checkpoint directory (must be new, empty or ours).
        depth_metric: ppl, bi or block_bi — how layers are chosen when num_layers shrinks.
        drop_layers: explicit source layers to drop instead of a metric.
        head_add_back: where kept heads take their pruned partners' residual: ``none``,
            ``query`` (query rows of the fused QKV) or ``output`` (output-projection columns);
            ``True`` means ``output`` and ``False`` ``none``.
        target_tp, target_pp: the layout the output must divide into.
        output_format: ``minitron`` (ours) or ``megatron`` (a Megatron-LM checkpoint,
            :mod:`megatron_minitron.checkpoint.megatron_lm`).
        tokenizer: tokenizer folder saved with the output (default: ``load``'s own).

    Returns:
        The plan that was applied (kept indices per layer).
    """
    source = io.load_config(load)
    if isinstance(scores, str):
        from megatron_minitron.importance import load_scores

        scores = load_scores(scores, source)
    io.check_output_path(output)
    if output_format == "megatron" and source.is_moe:
        raise UsageError("--output-format megatron does not write mixture-of-experts models "
                         "yet; use --output-format minitron")
    plan = plan_pruning(source, scores, target, depth_metric, drop_layers, head_add_back,
                        target_tp, target_pp)
    reader = CheckpointReader(load)
    layer_specs = _layer_specs(reader, plan)
    meta = {"pruned_from": os.path.abspath(load), "kept_layers": plan.kept_layers,
            "depth_metric": None if drop_layers is not None else depth_metric,
            "head_add_back": plan.head_add_back,
            "scores_aggregation": scores.get("meta", {}).get("aggregation")}
    tokenizer = tokenizer or (load if io.tokenizer_dir(load) else None)
    write = write_streaming_checkpoint
    if output_format == "megatron":
        from megatron_minitron.checkpoint.megatron_lm import write_streaming as write
    write(layer_specs + _global_specs(reader, plan), plan.target, output, meta=meta,
          tokenizer_from=tokenizer)
    return plan
