"""Megatron-Core's norms, whichever spec built the model: a norm module of its own, or one fused
into the linear that follows it (Transformer Engine's ``LayerNormColumnParallelLinear``), the
roles of module classes, and the names of norm parameters.

Part of :mod:`megatron_minitron.adapter`, which re-exports every name here; callers use
``adapter.<name>``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402

NO_NORM = "no_norm"
"""Role of a placeholder where a norm could sit (``nn.Identity``, mcore's ``IdentityOp``)."""
FUSED_NORM_LINEAR = "fused_norm_linear"
"""Role of a linear that applies its input norm itself (Transformer Engine's
``LayerNormColumnParallelLinear``: ``layer_norm_weight``, ``layer_norm_bias``,
``normalization``, ``eps``, ``zero_centered_gamma``)."""

MODULE_ROLES: Dict[type, str] = {torch.nn.Identity: NO_NORM, IdentityOp: NO_NORM}
"""mcore module class -> what it is to us; looked up along the class's MRO."""


def register_module_role(cls: type, role: str) -> None:
    """Tells the package what ``cls`` is (e.g. a fused norm+linear of another spec)."""
    MODULE_ROLES[cls] = role


def module_role(module) -> Optional[str]:
    """The registered role of ``module``'s class (or of a base class), else None."""
    if module is None:
        return NO_NORM
    for cls in type(module).__mro__:
        if cls in MODULE_ROLES:
            return MODULE_ROLES[cls]
    return None


def fused_norm_output(module, hidden: torch.Tensor) -> torch.Tensor:
    """The norm output a fused norm+linear computes from its input ``hidden`` [s, b, h].

    Normalises in fp32 with the module's own weight, bias, epsilon and zero-centred gamma, and
    returns the input's dtype, as Transformer Engine does.
    """
    weight = module.layer_norm_weight.float()
    if getattr(module, "zero_centered_gamma", False):
        weight = weight + 1
    shape, eps = (hidden.shape[-1],), getattr(module, "eps", 1e-5)
    if getattr(module, "normalization", "LayerNorm") == "RMSNorm":
        out = F.rms_norm(hidden.float(), shape, weight, eps)
    else:
        bias = getattr(module, "layer_norm_bias", None)
        out = F.layer_norm(hidden.float(), shape, weight, None if bias is None else bias.float(),
                           eps)
    return out.to(hidden.dtype)


@dataclasses.dataclass
class Norm:
    """One norm of the model: a module of its own, or fused into the linear that follows it."""

    module: torch.nn.Module
    fused: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.layer_norm_weight if self.fused else self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.module, "layer_norm_bias" if self.fused else "bias", None)

    def register_output_hook(self, hook):
        """Calls ``hook(module, args, norm_output)`` each time the norm runs; returns the
        removable handle. For a fused norm the output is recomputed from the linear's input."""
        if not self.fused:
            return self.module.register_forward_hook(hook)

        def pre_hook(module, args):
            hook(module, args, fused_norm_output(module, args[0]))
        return self.module.register_forward_pre_hook(pre_hook)


_NORM_SITES = (("input_layernorm", ("self_attention", "linear_qkv")),
               ("pre_mlp_layernorm", ("mlp", "linear_fc1")))
"""Each norm of a layer: its own module name, and the linear it is fused into otherwise."""


def layer_norms(layer) -> List[Norm]:
    """The norms inside a layer (input, pre-MLP), whichever spec built it."""
    norms = []
    for name, (parent, child) in _NORM_SITES:
        module = getattr(layer, name, None)
        if module_role(module) != NO_NORM:
            norms.append(Norm(module))
            continue
        linear = getattr(getattr(layer, parent), child)
        if module_role(linear) != FUSED_NORM_LINEAR and not hasattr(linear, "layer_norm_weight"):
            raise ValueError(f"layer {layer.layer_number}: {name} is {type(module).__name__} "
                             f"and {parent}.{child} ({type(linear).__name__}) applies no norm; "
                             "this layer spec is not supported")
        norms.append(Norm(linear, fused=True))
    return norms


def final_norm(model: GPTModel) -> Optional[Norm]:
    """The decoder's final norm on the last pipeline stage, else None."""
    norm = getattr(model.decoder, "final_layernorm", None)
    return None if module_role(norm) == NO_NORM else Norm(norm)


NORM_PARAMETER_SUFFIXES = ("layernorm.weight", "layernorm.bias", "layer_norm_weight",
                           "layer_norm_bias")
"""A layer parameter (or checkpoint key) with one of these endings is a norm's [h] weight or
bias, standalone (``input_layernorm.weight``) or fused (``linear_qkv.layer_norm_weight``)."""


def is_norm_parameter(name: str) -> bool:
    return name.endswith(NORM_PARAMETER_SUFFIXES)
