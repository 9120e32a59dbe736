"""Evaluation: LM loss / perplexity (and, later, zero-shot tasks)."""

from megatron_minitron.evaluation.lm import lm_loss  # noqa: F401
