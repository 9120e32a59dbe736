"""The local spec's linear layers with a plain path on one tensor-parallel rank.

mcore's ``ColumnParallelLinear`` and ``RowParallelLinear`` run every matrix multiply through a
Python ``autograd.Function`` (with a Python backward) and wrap it in two more (the copy to and
the reduction from the tensor-parallel region), all identities when the tensor-parallel group
has one rank. On the CPU, where each layer's work is small, that Python costs a few percent of a
forward and more of a backward. :class:`ColumnLinear` and :class:`RowLinear` are drop-in
subclasses for the local spec's slots (same constructor, parameters, checkpoint keys and
sharding): on one tensor-parallel rank, without sequence parallelism, gradient-accumulation
fusion, deferred embedding gradients or activation offloading, they compute the same
``matmul(input, weight.t())`` (plus bias) with torch's own autograd; anything else takes
mcore's path unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_minitron.compat.cpu import apply_cpu_patches

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.tensor_parallel.layers import (  # noqa: E402
    ColumnParallelLinear,
    RowParallelLinear,
)


def _plain(layer) -> bool:
    """Whether mcore's forward of ``layer`` reduces to ``matmul(input, weight.t())``."""
    config = layer.config
    return (layer.tp_group.size() == 1
            and not layer.sequence_parallel
            and not layer.gradient_accumulation_fusion
            and not getattr(config, "defer_embedding_wgrad_compute", False)
            and getattr(config, "_cpu_offloading_context", None) is None
            and getattr(layer, "gtp_remat_size", 1) == 1)


def _plain_forward(layer, input_: torch.Tensor):
    """``(output, bias)`` as mcore's forward returns them, on the plain path."""
    output = torch.matmul(input_, layer.weight.t())
    if layer.skip_bias_add:
        return output, layer.bias
    if layer.bias is not None:
        output = output + layer.bias
    return output, None


class ColumnLinear(ColumnParallelLinear):
    """mcore's ``ColumnParallelLinear``; plain matmul on one tensor-parallel rank."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if weight is not None or self.weight is None or not _plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        return _plain_forward(self, input_)


class RowLinear(RowParallelLinear):
    """mcore's ``RowParallelLinear``; plain matmul on one tensor-parallel rank."""

    def forward(self, input_: torch.Tensor):
        if not _plain(self):
            return super().forward(input_)
        return _plain_forward(self, input_)
