"""Megatron-LM's mixture-of-experts args: read onto :class:`ModelConfig`'s MoE fields (softmax
top-k routers, dropless, SequentialMLP experts, any ``moe_layer_freq`` incl. pattern strings),
written back, and what we do not build refused in one line before any weight is read. Used by
:mod:`megatron_minitron.checkpoint.megatron_lm`."""

from __future__ import annotations

import ast
import re
from typing import Any, Dict, List, Union

from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError


def arg(args, name: str, default=None):
    """Megatron-LM saved arg ``name`` (``default`` when absent or None)."""
    value = getattr(args, name, default)
    return default if value is None else value


# Mixture-of-experts args (read when num_experts is set) that change the forward or the stored
# weights in ways our models (softmax top-k router, SequentialMLP experts) do not build:
# name -> (the values we build, what it is, the fix).
_MOE_REFUSED = {
    "moe_router_score_function": (("softmax", None), "sigmoid router scores are not supported",
                                  "only softmax routers load"),
    "moe_router_topk_scaling_factor": ((None, 1, 1.0), "scaled top-k router weights are not "
                                       "supported", "only unscaled routers (None) load"),
    "moe_router_enable_expert_bias": ((None, False), "expert-bias (aux-loss-free) routing is "
                                      "not supported", "only routers without expert bias load"),
    "moe_router_num_groups": ((None, 0, 1), "group-limited routing is not supported",
                              "only ungrouped routers load"),
    "moe_router_group_topk": ((None, 0), "group-limited routing is not supported",
                              "only ungrouped routers load"),
    "moe_router_topk_limited_devices": ((None, 0), "device-limited routing is not supported",
                                        "only unlimited routers load"),
    "moe_router_force_load_balancing": ((None, False), "forced (random) routing is a "
                                        "benchmarking mode", "load a checkpoint trained without "
                                        "it"),
    "moe_router_force_biased": ((None, 0, 0.0), "random router biases are a benchmarking mode",
                                "load a checkpoint trained without them"),
    "moe_expert_capacity_factor": ((None,), "token dropping (an expert capacity) changes the "
                                   "forward", "only dropless models load"),
    "moe_expert_rank_capacity_factor": ((None,), "token dropping (a per-rank capacity) changes "
                                        "the forward", "only dropless models load"),
    "moe_pad_expert_input_to_capacity": ((None, False), "padding experts to a capacity needs "
                                         "token dropping", "only dropless models load"),
    "moe_apply_probs_on_input": ((None, False), "router weights applied to the expert input "
                                 "are not supported", "only weights applied to the expert "
                                 "output load"),
    "moe_latent_size": ((None, 0), "latent MoE projections are not supported",
                        "only experts on the hidden size load"),
    "moe_mlp_glu_interleave_size": ((None, 0), "block-interleaved expert GLU weights are not "
                                    "supported", "only [gate; up] expert weights load"),
    "moe_shared_expert_glu_interleave_size": ((None, 0), "block-interleaved shared-expert GLU "
                                              "weights are not supported", "only [gate; up] "
                                              "shared-expert weights load"),
}

_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
"""Load-balancing losses that leave the forward as it is (training losses only). We train with
mcore's ``aux_loss`` at the saved coefficient; ``sinkhorn`` changes the routing and is refused."""

# Stored expert keys that mcore's SequentialMLP does not request: per-expert keys (mcore's
# ``singleton_local_shards`` layout), unmapped grouped-GEMM tensors, raw module names.
_UNMAPPED_EXPERT_KEY = re.compile(
    r"\.experts\.(?:experts\.)?\d+\.|\.experts\.local_experts\.|\.experts\.weight[12]\b"
    r"|\.experts\.(?:experts\.)?linear_fc[12]\.(?:weight|bias)\d+$")



# ---------------------------------------------------------------- mixture of experts


_FREQ_MAX = 1 << 16  # longest pattern (and largest int) a moe_layer_freq string may spell


def _freq_value(node):
    """The int or list of ints an ``ast`` node of a moe_layer_freq pattern spells: ints, lists,
    tuples, ``+`` and ``*`` only (ValueError for anything else or anything oversized)."""
    if isinstance(node, ast.Expression):
        return _freq_value(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int and \
            0 <= node.value <= _FREQ_MAX:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_freq_value(item) for item in node.elts]
        if all(isinstance(item, int) for item in items):
            return items
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _freq_value(node.left), _freq_value(node.right)
        if isinstance(node.op, ast.Add) and type(left) is type(right):
            result = left + right
        elif isinstance(node.op, ast.Mult) and not (isinstance(left, list) and
                                                     isinstance(right, list)):
            length = [len(v) for v in (left, right) if isinstance(v, list)]
            if length and length[0] * min(v for v in (left, right) if isinstance(v, int)) \
                    > _FREQ_MAX:
                raise ValueError("pattern too long")
            result = left * right
        else:
            raise ValueError("unsupported operands")
        if isinstance(result, int) and result > _FREQ_MAX or \
                isinstance(result, list) and len(result) > _FREQ_MAX:
            raise ValueError("pattern too long")
        return result
    raise ValueError(f"unsupported {type(node).__name__}")


def parse_moe_layer_freq(value, where: str = "") -> Union[int, List[int]]:
    """Megatron-LM's ``moe_layer_freq``: an int k (layers 0, k, 2k, ... are MoE), a 0/1 list
    per layer, or the pattern string its CLI takes (``"([1]*3+[0]*1)*2"``, ``"[1,0,1]"``,
    ``"2"``); pattern strings are read as int/list arithmetic (``+``, ``*``) only."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if isinstance(value, str):
        try:
            return _freq_value(ast.parse(value.strip(), mode="eval"))
        except (SyntaxError, ValueError, TypeError, RecursionError):
            pass
    raise UsageError(f"{where}: Megatron-LM arg moe_layer_freq={value!r} is not an int, a 0/1 "
                     "list or a pattern like '([1]*3+[0]*1)*2'; fix the saved args")


def _load_balancing(args, where: str) -> tuple:
    """``(moe_aux_loss_coeff, loss type)`` from Megatron-LM's load-balancing args (a type and a
    coefficient, or lists of both)."""
    types = arg(args, "moe_router_load_balancing_type", "aux_loss")
    coeffs = arg(args, "moe_aux_loss_coeff", 0.0)
    types = list(types) if isinstance(types, (list, tuple)) else [types]
    coeffs = list(coeffs) if isinstance(coeffs, (list, tuple)) else [coeffs] * len(types)
    active = []
    for kind, coeff in zip(types, coeffs):
        if kind == "sinkhorn":
            raise UsageError(f"{where}: Megatron-LM arg moe_router_load_balancing_type="
                             f"{kind!r} is not supported (Sinkhorn routing changes the "
                             "forward); only aux_loss, seq_aux_loss, global_aux_loss or none "
                             "load")
        if kind not in _LOAD_BALANCING:
            raise UsageError(f"{where}: Megatron-LM arg moe_router_load_balancing_type="
                             f"{kind!r} is not supported; only aux_loss, seq_aux_loss, "
                             "global_aux_loss or none load")
        if kind != "none" and float(coeff or 0.0) != 0.0:
            active.append((float(coeff), kind))
    if len(active) > 1:
        raise UsageError(f"{where}: Megatron-LM args moe_router_load_balancing_type={types!r} "
                         "combine load-balancing losses, which is not supported; keep one")
    return active[0] if active else (0.0, "none")


def moe_fields(args, where: str) -> Dict[str, Any]:
    """ModelConfig fields of a Megatron-LM mixture-of-experts model (none for a dense one);
    one-line UsageError for what we do not build."""
    experts = getattr(args, "num_experts", None)
    if experts in (None, 0):
        return {}
    for name, (built, reason, fix) in _MOE_REFUSED.items():
        value = getattr(args, name, None)
        if value not in built:
            raise UsageError(f"{where}: Megatron-LM arg {name}={value!r} is not supported "
                             f"({reason}); {fix}")
    coeff, kind = _load_balancing(args, where)
    fields = dict(
        num_moe_experts=int(experts),
        moe_router_topk=int(arg(args, "moe_router_topk", 2)),
        moe_ffn_hidden_size=arg(args, "moe_ffn_hidden_size", None),
        moe_shared_expert_intermediate_size=arg(args, "moe_shared_expert_intermediate_size",
                                                 None),
        moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
        moe_layer_freq=parse_moe_layer_freq(arg(args, "moe_layer_freq", 1), where),
        moe_router_pre_softmax=bool(getattr(args, "moe_router_pre_softmax", False)),
        moe_aux_loss_coeff=coeff,
    )
    if kind not in ("aux_loss", "none"):  # provenance: we train with mcore's aux_loss
        fields["extra"] = {"moe_router_load_balancing_type": kind}
    return fields


def check_expert_keys(keys, path: str) -> None:
    """Refuses, in one line, stored expert tensors mcore's SequentialMLP experts cannot load.

    mcore saves every expert implementation under one set of keys (``...mlp.experts.experts.
    linear_fc1.weight`` [.., experts, out, in]): SequentialMLP, Transformer Engine's grouped
    GEMM (``TEGroupedMLP``, ``weight{e}`` parameters) and the legacy ``GroupedMLP``
    (``weight1``/``weight2``, transposed on save) alike, which is how Megatron-LM writes them.
    Other layouts (per-expert keys of mcore's ``singleton_local_shards``, raw module names)
    are refused."""
    for key in keys:
        if _UNMAPPED_EXPERT_KEY.search(key):
            raise UsageError(f"--load {path}: stored expert tensor {key!r} is not in mcore's "
                             "common expert layout (...mlp.experts.experts.linear_fc1.weight); "
                             "re-save it with Megatron-LM's torch_dist format "
                             "(singleton_local_shards off)")


_PER_LAYER_KEY = re.compile(r"^decoder\.layers\.\d+\.")


def match_layer_layout(cfg: ModelConfig, keys) -> ModelConfig:
    """``cfg`` with ``moe_layer_freq`` in the form whose checkpoint keys ``keys`` holds.

    mcore stores a block's layers stacked (``decoder.layers.<name>`` [L, ...]) when
    ``moe_layer_freq`` is the int 1 and one per layer (``decoder.layers.<i>.<name>``) when it is
    a list (or a mixed stack, or a run saved with ``non_homogeneous_layers``). An all-MoE stack
    is the same network either way; the form follows the stored keys so the load finds them.
    """
    if not cfg.is_moe or not cfg.moe_layers() or not all(cfg.moe_layers()):
        return cfg
    layered = [key for key in keys if key.startswith("decoder.layers.")]
    if not layered:
        return cfg
    per_layer = all(_PER_LAYER_KEY.match(key) for key in layered)
    if per_layer and cfg.moe_layer_freq == 1:
        return cfg.replace(moe_layer_freq=[1] * cfg.num_layers)
    if not per_layer and isinstance(cfg.moe_layer_freq, list):
        return cfg.replace(moe_layer_freq=1)
    return cfg


def moe_args(cfg: ModelConfig) -> Dict[str, Any]:
    """Megatron-LM's mixture-of-experts args for ``cfg`` (num_experts=None for a dense one):
    SequentialMLP experts, softmax top-k routing, dropless."""
    dense = not cfg.is_moe
    return dict(
        num_experts=None if dense else cfg.num_moe_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=None if dense else cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=None if dense else
        cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate and not dense,
        moe_shared_expert_overlap=False,
        moe_layer_freq=list(cfg.moe_layer_freq) if isinstance(cfg.moe_layer_freq, list)
        else cfg.moe_layer_freq,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_pad_expert_input_to_capacity=False,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_use_legacy_grouped_gemm=False,
        moe_apply_probs_on_input=False,
        moe_latent_size=None,
    )
