"""Pruning to a target architecture: heads (GQA-aware), query groups, MLP width, hidden size,
layers and, in mixture-of-experts models, routed experts, expert and shared-expert width;
streamed over checkpoints saved at any layout."""

from megatron_minitron.prune.api import describe_counts, plan_pruning, prune_checkpoint  # noqa: F401
from megatron_minitron.prune.apply import prune_state_dict  # noqa: F401
from megatron_minitron.prune.plan import (  # noqa: F401
    DEFAULT_HEAD_ADD_BACK,
    ALL_TARGET_KEYS,
    DEPTH_METRICS,
    HEAD_ADD_BACK_MODES,
    MOE_TARGET_KEYS,
    TARGET_KEYS,
    PrunePlan,
    build_plan,
    head_add_back_mode,
    parse_target,
    target_config,
    target_keys,
)
