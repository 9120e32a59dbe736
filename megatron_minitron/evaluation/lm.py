"""Mean token loss and perplexity over micro-batches, exact at any TP/PP/DP layout."""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from megatron_minitron import adapter, parallel, progress
from megatron_minitron.model.forward import broadcast_from_last_stage, pipeline_forward

RUN_LENGTH = 8  # micro-batches per pipeline call per stage when pipelined (the bar moves between)


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

    pp = parallel.group_size(adapter.get_pp_group())
    run = 1 if pp == 1 else RUN_LENGTH * pp
    outputs = [] if adapter.is_last_stage() else None
    with progress.bar(total=len(micro_batches), desc="lm loss", unit="batch") as bar:
        for start in range(0, len(micro_batches), run):
            part = pipeline_forward(model, micro_batches[start:start + run], collect,
                                    with_labels=True)
            if part is not None:
                outputs = outputs + part
            bar.update(len(micro_batches[start:start + run]))
    totals = None
    if outputs is not None:
        totals = torch.stack([torch.stack([o["sum"], o["count"]]) for o in outputs]).sum(0)
        parallel.all_reduce(totals, group=adapter.get_dp_group())
        totals = totals.tolist()
    total_loss, count = broadcast_from_last_stage(totals)
    mean = total_loss / max(count, 1.0)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(count)}
