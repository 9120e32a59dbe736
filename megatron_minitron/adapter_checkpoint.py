"""Megatron-Core's state dict naming: the sharded state dict a checkpoint holds, the former names
of norm parameters and their mapping both ways, and the keys of the linears' extra state.

Part of :mod:`megatron_minitron.adapter`, which re-exports every name here; callers use
``adapter.<name>``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

from megatron_minitron.compat.cpu import apply_cpu_patches
from megatron_minitron.config import ModelConfig

apply_cpu_patches()  # before mcore's first import (mcore 0.19 imports triton without it)

from megatron.core.models.gpt import GPTModel  # noqa: E402

# Checkpoints name the norms as Transformer Engine does (``...linear_qkv.layer_norm_weight``):
# mcore's local spec maps its ``input_layernorm.``/``pre_mlp_layernorm.`` onto those names
# (``sharded_state_dict_keys_map``), so Megatron-LM checkpoints read the same under both specs.
# Checkpoints of ours written before used the local module names; they still load.
_LEGACY_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def legacy_checkpoint_key(key: str) -> str:
    """``key`` as checkpoints of ours named it before they followed mcore's scheme."""
    for te_name, local_name in _LEGACY_NORM_NAMES.items():
        at = key.rfind(te_name)
        if at >= 0 and (at == 0 or key[at - 1] == "."):
            return key[:at] + local_name + key[at + len(te_name):]
    return key


def match_checkpoint_keys(sharded: Dict, checkpoint_keys: Iterable[str]) -> Dict:
    """Renames, in place, the sharded tensors of a load request that the checkpoint holds only
    under their other norm names (see :func:`legacy_checkpoint_key`), either way: the local
    spec saves a MoE layer's pre-MLP norm under the fused name
    (``mlp.linear_fc1.layer_norm_weight``), the Transformer Engine spec under its own module's
    (``pre_mlp_layernorm.weight``). Returns ``sharded``."""
    present = set(checkpoint_keys)
    for value in sharded.values():
        key = getattr(value, "key", None)
        if key is not None and key not in present:
            for other in (legacy_checkpoint_key(key), native_key(key)):
                if other in present:
                    value.key = other
                    break
    return sharded


def sharded_state_dict(model: GPTModel) -> Dict:
    """mcore's sharded state dict of ``model`` (weights only, no extra state).

    Keys follow mcore's scheme whichever spec built the model (Transformer Engine names for
    the norms), so a checkpoint saved under one spec loads under the other.
    """
    return {key: value for key, value in model.sharded_state_dict().items()
            if not key.endswith("_extra_state")}


def native_key(key: str) -> str:
    """mcore's name of a stored key that may use the former names (the inverse of
    :func:`legacy_checkpoint_key`)."""
    for te_name, local_name in _LEGACY_NORM_NAMES.items():
        at = key.rfind(local_name)
        if at >= 0 and (at == 0 or key[at - 1] == "."):
            return key[:at] + te_name + key[at + len(local_name):]
    return key


def megatron_lm_sharded_state_dict(model: GPTModel) -> Dict:
    """The model part of a Megatron-LM checkpoint: ``model.sharded_state_dict()`` as its
    ``generate_state_dict`` saves it (weights and the linears' empty extra state)."""
    return model.sharded_state_dict()


def extra_state_keys(cfg: ModelConfig) -> List[str]:
    """Unique keys (``key/shard_offset_shape``) of the extra-state objects the local spec's
    GPTModel for ``cfg`` saves: one per layer for each of its four linears."""
    linears = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
               "mlp.linear_fc2")
    return [f"decoder.layers.{name}._extra_state/shard_{layer}_{cfg.num_layers}"
            for name in linears for layer in range(cfg.num_layers)]
