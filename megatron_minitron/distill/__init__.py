"""Knowledge distillation and (re)training of pruned students.

* :class:`TrainConfig`, :class:`Trainer` (``config``, ``trainer``): a distillation, teacher
  correction or cross-entropy run at any TP×PP×DP (×EP for mixture-of-experts models, whose
  router load-balancing loss the student trains on and logs), with exact resume.
* :func:`logits_loss`, :func:`intermediate_loss`, :class:`LogitLossSpec` (``losses``): KD and
  cross-entropy on vocab-parallel logits, exact at any TP size, chunked over the sequence;
  :func:`reference_logits_loss` (``reference``): the same written plainly, for tests.
* :class:`DistillationModel`, :class:`LayerPair` (``model``): a student stage with its
  co-located frozen teacher stage.

Heavy modules (mcore) load on first use of the trainer or model.
"""

from megatron_minitron.distill.config import TrainConfig
from megatron_minitron.distill.losses import (
    LogitLossResult,
    LogitLossSpec,
    intermediate_loss,
    logits_loss,
)
from megatron_minitron.distill.reference import reference_logits_loss


def __getattr__(name):
    if name == "Trainer":
        from megatron_minitron.distill.trainer import Trainer

        return Trainer
    if name in ("DistillationModel", "LayerPair"):
        from megatron_minitron.distill import model

        return getattr(model, name)
    raise AttributeError(name)


__all__ = ["DistillationModel", "LayerPair", "LogitLossResult", "LogitLossSpec", "TrainConfig",
           "Trainer", "intermediate_loss", "logits_loss", "reference_logits_loss"]
