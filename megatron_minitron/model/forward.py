"""Forward passes through a (possibly pipelined) mcore GPTModel, via mcore's schedules."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
from megatron_minitron import adapter, parallel
from megatron_minitron.compat.cpu import cuda_to_cpu, model_compute


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] positions 0..s-1."""
    batch, seq = tokens.shape
    return torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)


def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def pipeline_forward(
    model,
    micro_batches: List[Dict[str, torch.Tensor]],
    collect: Callable[[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]],
    with_labels: bool = False,
) -> Optional[List[Dict[str, torch.Tensor]]]:
    """Runs forward-only over ``micro_batches`` at the current layout (collective over PP).

    Each micro-batch holds ``tokens`` [b, s] (and ``labels`` [b, s] when ``with_labels``), and
    may hold ``positions`` [b, s] (RoPE positions) with ``attention_mask`` [b, 1, s, s] (True =
    masked) for rows that are not one causal sequence (see ``adapter.accepts_attention_mask``).
    ``collect(output, batch)`` runs on the last pipeline stage with the model output — logits
    [b, s, v/tp] or, with labels, the per-token loss [b, s] — and returns a dict of tensors.
    Returns the list of those dicts on the last stage and None on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    batches = iter(micro_batches)

    def forward_step(data_iterator, stage_model):
        batch = _to_device(next(data_iterator), device)
        tokens = batch["tokens"]
        positions = batch.get("positions")
        logits = contextlib.nullcontext([]) if with_labels else adapter.raw_logits(stage_model)
        with adapter.rotary_positions(stage_model, positions), model_compute(), \
                logits as captured:
            output = stage_model(
                tokens,
                position_ids_for(tokens) if positions is None else positions,
                attention_mask=batch.get("attention_mask"),
                labels=batch["labels"] if with_labels else None,
            )
        if captured:  # [s, b, v/tp], handed on as a [b, s, v/tp] view (no copy)
            output = captured[0]

        def loss_func(output_tensor):
            if captured:
                output_tensor = output_tensor.transpose(0, 1)
            return torch.zeros((), device=device), collect(output_tensor, batch)

        return output, loss_func

    first = micro_batches[0]["tokens"]
    model.eval()
    with torch.no_grad(), cuda_to_cpu():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=True,
        )
    return results if adapter.is_last_stage() else None


def gather_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, v/tp] → [b, s, v] on every TP rank."""
    group = adapter.get_tp_group()
    if parallel.group_size(group) == 1:
        return logits
    return torch.cat(parallel.all_gather(logits, group), dim=-1)


def broadcast_from_last_stage(obj):
    """Sends a picklable object from the last pipeline stage to every stage."""
    group = adapter.get_pp_group()
    size = parallel.group_size(group)
    if size == 1:
        return obj
    return parallel.broadcast_object(obj, src=parallel.global_rank(group, size - 1), group=group)


def full_logits(model, tokens: torch.Tensor, micro_batch_size: int = 1) -> torch.Tensor:
    """Full-vocab logits [n, s, v] for ``tokens`` [n, s], on every rank (any TP/PP layout)."""
    micro = [{"tokens": tokens[i:i + micro_batch_size]}
             for i in range(0, tokens.shape[0], micro_batch_size)]
    out = pipeline_forward(model, micro,
                           lambda logits, batch: {"logits": gather_vocab_parallel(logits).cpu()})
    logits = torch.cat([r["logits"] for r in out], dim=0) if out is not None else None
    return broadcast_from_last_stage(logits)
