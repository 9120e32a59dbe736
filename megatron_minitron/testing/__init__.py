"""Helpers for tests and benchmarks: spawned gloo ranks and tiny models."""

from megatron_minitron.testing.distributed import spawn  # noqa: F401
from megatron_minitron.testing.models import (  # noqa: F401
    save_tiny_checkpoint,
    tiny_config,
    tiny_moe_config,
)
