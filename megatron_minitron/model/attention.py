"""Core attention of the local layer spec through torch's ``scaled_dot_product_attention``.

mcore's local ``DotProductAttention`` materialises the scores with ``baddbmm``, repeats the key
and value heads for grouped-query attention, and runs a separate masked softmax. On the CPU that
costs a third of a forward pass (the Transformer Engine spec, used where TE imports, has fused
kernels of its own). :class:`SDPAttention` is a drop-in subclass used in the local spec's
``core_attention`` slot (mcore's extension point): same constructor, same parameters and
checkpoint keys, same masking rules (causal when no mask is given, else the given boolean mask
with True = masked), computed by torch's fused kernels. Configurations it does not cover
(attention dropout while training, sliding windows, softmax offsets, query-key layer scaling,
attention bias, packed sequences) take mcore's own path unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402


class SDPAttention(DotProductAttention):
    """mcore's ``DotProductAttention`` computed by ``scaled_dot_product_attention``."""

    def _fused(self, attention_bias, packed_seq_params) -> bool:
        config = self.config
        return (attention_bias is None and packed_seq_params is None
                and getattr(self, "softmax_offset", None) is None
                and getattr(self.scale_mask_softmax, "window_size", None) is None
                and not config.apply_query_key_layer_scaling
                and not (self.training and self.attention_dropout.p > 0))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if kwargs or not self._fused(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params, **kwargs)
        sq, batch, heads, dim = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:
            allowed = ~attention_mask.to(torch.bool)
            # A row with every key masked (padding in a packed row) would give NaN; mcore's
            # softmax gives it finite weights. Let such rows see every key: their outputs stay
            # finite and no other position attends to them.
            mask = allowed | ~allowed.any(dim=-1, keepdim=True)
        else:
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            causal = mask_type == AttnMaskType.causal and sq > 1
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads)
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * dim)
