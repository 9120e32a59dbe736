"""Activation-based importance (forward passes only): heads, query groups, neurons, channels,
layers (perplexity and Block Importance), exact under tensor, pipeline and data parallelism."""

from megatron_minitron.importance.aggregation import Aggregation  # noqa: F401
from megatron_minitron.importance.estimate import (  # noqa: F401
    ImportanceConfig,
    estimate_importance,
    importance_with_forward_loop,
    random_scores,
    load_scores,
    save_scores,
)
