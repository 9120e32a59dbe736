"""Mean token loss and perplexity over micro-batches, exact at any TP/PP/DP layout."""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_minitron import adapter
from megatron_minitron.model.forward import broadcast_from_last_stage, pipeline_forward


def lm_loss(model, micro_batches: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Token-weighted mean cross-entropy of ``model`` on this DP rank's ``micro_batches``.

    Each micro-batch holds ``tokens`` and ``labels`` [b, s] (optionally ``loss_mask`` [b, s]).
    Sums and counts are reduced over data parallel ranks, so the result equals one rank
    evaluating every sample. Returns ``{"loss", "ppl", "tokens"}`` on every rank.
    """

    def collect(token_loss, batch):  # token_loss: [b, s], already reduced over TP
        mask = batch.get("loss_mask")
        mask = torch.ones_like(token_loss) if mask is None else mask.to(token_loss.dtype)
        return {"sum": (token_loss.double() * mask.double()).sum(), "count": mask.double().sum()}

    outputs = pipeline_forward(model, micro_batches, collect, with_labels=True)
    totals = None
    if outputs is not None:
        totals = torch.stack([torch.stack([o["sum"], o["count"]]) for o in outputs]).sum(0)
        if dist.is_initialized():
            dist.all_reduce(totals, group=adapter.get_dp_group())
        totals = totals.tolist()
    total_loss, count = broadcast_from_last_stage(totals)
    mean = total_loss / max(count, 1.0)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(count)}
