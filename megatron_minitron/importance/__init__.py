"""Activation-based importance (forward passes only): heads, query groups, neurons, channels,
layers (perplexity and Block Importance), and for mixture-of-experts models experts, their
neurons and the shared expert's neurons, exact under tensor, pipeline, data and expert
parallelism."""

from megatron_minitron.importance.aggregation import Aggregation  # noqa: F401
from megatron_minitron.importance.estimate import (  # noqa: F401
    ImportanceConfig,
    estimate_importance,
    importance_with_forward_loop,
    random_scores,
    load_scores,
    save_scores,
)
from megatron_minitron.importance.moe import MOE_SCORE_KEYS, moe_score_shapes  # noqa: F401
