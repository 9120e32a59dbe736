"""A CPU stand-in for Megatron-Core's Transformer Engine layer spec, for tests.

Transformer Engine needs CUDA, so its spec never runs in CI. This spec has the same shape as
``get_gpt_layer_with_transformer_engine_spec()``: the layer's ``input_layernorm`` and
``pre_mlp_layernorm`` are mcore's ``IdentityOp`` and ``linear_qkv``/``linear_fc1`` apply the norm
themselves, with the attributes of TE's ``LayerNormColumnParallelLinear`` (``layer_norm_weight``,
``layer_norm_bias`` for LayerNorm, ``normalization``, ``eps``, ``zero_centered_gamma``) and its
checkpoint keys (``...linear_qkv.layer_norm_weight``, replicated over TP). Everything else stays
the local spec's. Use it as::

    with adapter.use_layer_spec(te_shaped_spec):
        model = adapter.build_gpt_model(cfg)
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from megatron_minitron import adapter
from megatron_minitron.config import ModelConfig

from megatron.core.tensor_parallel.layers import ColumnParallelLinear  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """mcore's ColumnParallelLinear with its input norm inside, as Transformer Engine fuses it.

    ``forward(x)`` returns ``(linear(norm(x)), bias)``; the norm follows the config's
    normalization, epsilon and zero-centred gamma (weight stored as gamma - 1).
    """

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.layer_norm_weight = torch.nn.Parameter(init(input_size, dtype=config.params_dtype))
        if self.normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(
                torch.zeros(input_size, dtype=config.params_dtype))
        else:
            self.register_parameter("layer_norm_bias", None)

    def forward(self, x, *args, **kwargs):
        gamma = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        if self.normalization == "RMSNorm":
            normed = F.rms_norm(x, (x.shape[-1],), gamma, self.eps)
        else:
            normed = F.layer_norm(x, (x.shape[-1],), gamma, self.layer_norm_bias, self.eps)
        return super().forward(normed, *args, **kwargs)


adapter.register_module_role(LayerNormColumnParallelLinear, adapter.FUSED_NORM_LINEAR)


def te_shaped_spec(cfg: ModelConfig, config):
    """The layer spec (a :data:`adapter.LayerSpecFn`): TE's module layout on local modules.

    For a zero-centred LayerNorm it is the block's submodules, whose final norm is the same
    zero-centred norm the local spec uses (TE's own final norm, ``TENorm``, is one too).
    """
    local = adapter.local_layer_spec(cfg)
    spec = adapter.with_submodules(
        local,
        input_layernorm=IdentityOp,
        pre_mlp_layernorm=IdentityOp,
        self_attention=adapter.with_submodules(local.submodules.self_attention,
                                        linear_qkv=LayerNormColumnParallelLinear),
        mlp=adapter.with_submodules(local.submodules.mlp, linear_fc1=LayerNormColumnParallelLinear),
        sharded_state_dict_keys_map={},  # TE's own parameter names are the checkpoint's
    )
    if not cfg.layernorm_zero_centered_gamma:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=adapter.ZeroCenteredLayerNorm)
