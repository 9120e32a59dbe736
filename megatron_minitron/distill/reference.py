"""The distillation logit losses written plainly: autograd on full (all-gathered) logits in
float64, for tests and for the distillation benchmark's memory comparison. They define what
:func:`megatron_minitron.distill.losses.logits_loss` computes in chunks; see that module for the
loss definitions.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_minitron import parallel
from megatron_minitron.distill.losses import LogitLossResult, LogitLossSpec


def reference_logits_loss(student: torch.Tensor, teacher: Optional[torch.Tensor],
                          labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
                          spec: LogitLossSpec, tp_group=None) -> LogitLossResult:
    """The same sums written plainly with autograd on full (all-gathered) logits.

    For tests and for the benchmark's memory comparison; it holds several logits-sized tensors.
    """
    student = _gather_vocab(student, tp_group)
    teacher = None if teacher is None else _gather_vocab(teacher, tp_group).detach()
    mask = (torch.ones(labels.shape) if loss_mask is None else loss_mask).double()
    temp = spec.temperature
    zero = torch.zeros((), dtype=torch.float64)
    kd = zero
    if teacher is not None and spec.kd_weight > 0:
        kd = (_reference_kd(student.double(), teacher.double(), spec, temp) * mask).sum()
    log_probs = torch.log_softmax(student.double(), dim=-1)
    ce = -(log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum()
    use_kd = teacher is not None and spec.kd_weight > 0
    total = spec.kd_weight * kd + spec.ce_weight * ce if use_kd else ce
    return LogitLossResult(total, kd.detach(), ce.detach(), mask.sum())


def _reference_kd(s, t, spec, temp):
    if spec.kind in ("kl", "rkl"):
        log_p_s = torch.log_softmax(s / temp, -1)
        log_p_t = torch.log_softmax(t / temp, -1)
        if spec.kind == "kl":
            return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temp * temp
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1) * temp * temp
    if spec.kind == "mse":
        return ((s - t) ** 2).mean(-1)
    if spec.kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
    top_values, top_index = torch.topk(t, spec.topk, dim=-1)
    log_q_t = torch.log_softmax(top_values / temp, -1)
    log_q_s = torch.log_softmax(s.gather(-1, top_index) / temp, -1)
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1) * temp * temp


def _gather_vocab(logits: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather over the vocab dimension."""
    if parallel.group_size(group) == 1:
        return logits
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits, group=group)
