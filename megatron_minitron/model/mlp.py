"""The local spec's MLP with a SwiGLU whose backward writes one gradient buffer.

mcore's unfused gated MLP splits ``linear_fc1``'s output with ``torch.chunk`` and multiplies
``silu(gate)`` by ``up``; autograd then joins the two halves' gradients with a concatenation,
one more pass over the widest activation of the layer. :class:`SwiGLUMLP` is a drop-in subclass
for the local spec's ``mlp`` slot (same constructor, submodules, parameters and hooks: it still
calls ``linear_fc1`` and ``linear_fc2``) whose SwiGLU writes both halves' gradients straight into
one buffer. Anything other than an unfused, unclamped, unscaled SwiGLU takes mcore's path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.transformer.mlp import MLP  # noqa: E402


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of ``x = [gate, up]`` (last dimension), gradient in one buffer.

    Keeps ``x`` and ``silu(gate)`` for the backward (recomputing the activation there costs
    more than the memory saves on the CPU).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        activation = F.silu(gate)
        ctx.save_for_backward(x, activation)
        return activation * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, activation = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = torch.chunk(grad_x, 2, dim=-1)
        torch.mul(grad, activation, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``x = [gate, up]``: through :class:`SwiGLU` under autograd, else
    with one allocation (in place)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return SwiGLU.apply(x)
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate).mul_(up)


class SwiGLUMLP(MLP):
    """mcore's ``MLP``; an unfused SwiGLU through :class:`SwiGLU`."""

    def _plain_swiglu(self, per_token_scale) -> bool:
        config = self.config
        return (per_token_scale is None
                and config.gated_linear_unit and self.activation_func is F.silu
                and not getattr(config, "use_te_activation_func", False)
                and not config.bias_activation_fusion
                and getattr(config, "activation_func_clamp_value", None) is None
                and not getattr(config, "glu_linear_offset", 0.0))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        # mcore's TransformerLayer passes ``padding_mask`` (for MoE routing); a dense MLP, like
        # mcore's, ignores it and any other keyword
        if not self._plain_swiglu(per_token_scale):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))
