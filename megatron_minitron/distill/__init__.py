"""Knowledge distillation and (re)training of pruned students.

* :func:`logits_loss`, :func:`intermediate_loss`, :class:`LogitLossSpec` (``losses``): KD and
  cross-entropy on vocab-parallel logits, exact at any TP size, chunked over the sequence.
"""

from megatron_minitron.distill.losses import (
    LogitLossResult,
    LogitLossSpec,
    intermediate_loss,
    logits_loss,
    reference_logits_loss,
)

__all__ = ["LogitLossResult", "LogitLossSpec", "intermediate_loss", "logits_loss",
           "reference_logits_loss"]
