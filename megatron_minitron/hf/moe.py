"""Hugging Face mixture-of-experts families <-> our ModelConfig and mcore MoE layers.

Supported: ``MixtralForCausalLM`` (every layer MoE, top-k renormalised, no sliding window),
``Qwen2MoeForCausalLM`` (QKV bias, a shared expert scaled by ``sigmoid(x · shared_expert_gate)``,
``norm_topk_prob``, dense layers from ``decoder_sparse_step`` / ``mlp_only_layers``) and
``Qwen3MoeForCausalLM`` (per-head q/k RMSNorm, no shared expert, ``norm_topk_prob``, dense
layers as for Qwen2-MoE).

Config mapping::

    num_local_experts / num_experts   <-> num_moe_experts
    num_experts_per_tok               <-> moe_router_topk
    intermediate_size                 <-> ffn_hidden_size (dense layers), and Mixtral's experts
    moe_intermediate_size             <-> moe_ffn_hidden_size (Qwen)
    shared_expert_intermediate_size   <-> moe_shared_expert_intermediate_size (Qwen2-MoE, gated)
    norm_topk_prob                    <-> not moe_router_pre_softmax (Mixtral: always True)
    router_aux_loss_coef              <-> moe_aux_loss_coeff
    decoder_sparse_step, mlp_only_layers <-> moe_layer_freq as a 0/1 list per layer (1 when
                                         every layer is MoE); layer i is MoE in HF when
                                         ``i not in mlp_only_layers and (i + 1) % step == 0``

Router semantics, checked numerically by the tests: HF takes the softmax over all experts
and keeps the top k, renormalised when ``norm_topk_prob`` (Mixtral always). The renormalised
weights are mcore's softmax over the top-k logits (``moe_router_pre_softmax=False``); the
plain ones are mcore's pre-softmax routing (``moe_router_pre_softmax=True``).

Weight layout of a MoE layer ``i`` (names as written on the Hub and by ``save_pretrained``;
``B`` is ``block_sparse_moe`` for Mixtral and ``mlp`` for Qwen)::

    B.gate.weight [E, h]                          <-> mlp.router.weight
    B.experts.{e}.{w1,w3}.weight (Mixtral),
    mlp.experts.{e}.{gate,up}_proj.weight (Qwen) <-> mlp.experts.local_experts.{e}.linear_fc1
                                                    = cat[gate, up]
    B.experts.{e}.w2.weight / mlp.experts.{e}.down_proj.weight
                                                 <-> mlp.experts.local_experts.{e}.linear_fc2
    mlp.shared_expert.{gate,up}_proj.weight      <-> mlp.shared_experts.linear_fc1
    mlp.shared_expert.down_proj.weight           <-> mlp.shared_experts.linear_fc2
    mlp.shared_expert_gate.weight [1, h]         <-> mlp.shared_experts.gate_weight

transformers 5 keeps experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2f, h] with
gate rows first, ``mlp.experts.down_proj`` [E, h, f], Mixtral's block renamed ``mlp``) and
converts to and from the per-expert names when it loads and saves; :func:`unfuse_experts`
reads either layout, and export writes the per-expert names, which every transformers release
loads.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_minitron import adapter
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError

MIXTRAL, QWEN2_MOE, QWEN3_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
MOE_ARCHITECTURES = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", QWEN3_MOE: "qwen3_moe"}
"""Supported HF mixture-of-experts architectures and their ``model_type``."""

_NAMES = {  # block, expert gate, up and down projections
    MIXTRAL: ("block_sparse_moe", "w1", "w3", "w2"),
    QWEN2_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
    QWEN3_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
}
_SHARED_FIELDS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
                  "moe_shared_expert_intermediate_size")


def is_moe_architecture(arch: str) -> bool:
    return arch in MOE_ARCHITECTURES


# ---------------------------------------------------------------- configs


def moe_layer_pattern(hf_config, arch: str, where: str) -> List[int]:
    """Per layer 1 (MoE) or 0 (dense), as the HF model builds them."""
    layers = hf_config.num_hidden_layers
    if arch == MIXTRAL:
        return [1] * layers
    step = getattr(hf_config, "decoder_sparse_step", None)
    step = 1 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UsageError(f"{where}: decoder_sparse_step={step} is not supported; it must be a "
                         "positive integer")
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]


def check_supported(hf_config, arch: str, where: str) -> None:
    """Raises UsageError for MoE features the mcore model here cannot reproduce (the checks
    common with the dense families run beside these)."""
    experts = _experts(hf_config, arch)
    if not experts or experts < 1:
        raise UsageError(f"{where}: {_experts_field(arch)}={experts} is not supported; a "
                         f"{arch} needs at least one expert")
    topk = getattr(hf_config, "num_experts_per_tok", None)
    if not isinstance(topk, int) or not 1 <= topk <= experts:
        raise UsageError(f"{where}: num_experts_per_tok={topk} is not supported; it must be "
                         f"between 1 and {_experts_field(arch)}={experts}")
    pattern = moe_layer_pattern(hf_config, arch, where)
    if not any(pattern):
        step = getattr(hf_config, "decoder_sparse_step", None)
        dense = getattr(hf_config, "mlp_only_layers", None)
        raise UsageError(f"{where}: decoder_sparse_step={step} with mlp_only_layers={dense} "
                         "leaves no mixture-of-experts layer; Megatron-Core needs at least one "
                         "(save the model as its dense family)")
    if arch == QWEN2_MOE:
        shared = getattr(hf_config, "shared_expert_intermediate_size", None)
        if not shared or shared < 1:
            raise UsageError(f"{where}: shared_expert_intermediate_size={shared} is not "
                             "supported; Qwen2-MoE needs a shared expert of positive width")
    else:
        for name in _SHARED_FIELDS:
            if getattr(hf_config, name, None):
                raise UsageError(f"{where}: {name}={getattr(hf_config, name)} is not supported "
                                 f"for {arch}, which has no shared expert; use "
                                 "Qwen2MoeForCausalLM for a model with one")
    if arch == QWEN3_MOE and getattr(hf_config, "attention_bias", False):
        raise UsageError(f"{where}: attention_bias=True is not supported for {arch} "
                         "(Megatron-Core would add biases to every linear layer)")


def _experts_field(arch: str) -> str:
    return "num_local_experts" if arch == MIXTRAL else "num_experts"


def _experts(hf_config, arch: str) -> Optional[int]:
    return getattr(hf_config, _experts_field(arch), None)


def moe_fields(hf_config, arch: str, where: str) -> Dict[str, Any]:
    """The ModelConfig fields of an HF MoE config (after :func:`check_supported`)."""
    pattern = moe_layer_pattern(hf_config, arch, where)
    mixtral = arch == MIXTRAL
    fields = dict(
        num_moe_experts=int(_experts(hf_config, arch)),
        moe_router_topk=int(hf_config.num_experts_per_tok),
        moe_ffn_hidden_size=int(hf_config.intermediate_size if mixtral
                                else hf_config.moe_intermediate_size),
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_router_pre_softmax=(False if mixtral
                                else not bool(getattr(hf_config, "norm_topk_prob", False))),
        moe_aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
    )
    if arch == QWEN2_MOE:
        fields.update(moe_shared_expert_intermediate_size=int(
            hf_config.shared_expert_intermediate_size), moe_shared_expert_gate=True)
    return fields


def export_choice(cfg: ModelConfig) -> Tuple[Optional[str], List[str]]:
    """(HF architecture for a MoE ``cfg``, what in it that architecture cannot hold).

    A shared expert means Qwen2-MoE, q/k norms Qwen3-MoE, neither Mixtral; the source
    architecture (``cfg.extra["hf_architecture"]``) is the same by construction for imported
    models."""
    problems = []
    shared = cfg.moe_shared_expert_intermediate_size is not None
    every_layer = all(cfg.moe_layers())
    if shared:
        arch = QWEN2_MOE
        if not cfg.moe_shared_expert_gate:
            problems.append("a shared expert with moe_shared_expert_gate=False")
        if cfg.qk_layernorm:
            problems.append("qk_layernorm=True with a shared expert")
    elif cfg.qk_layernorm:
        arch = QWEN3_MOE
        if cfg.add_qkv_bias:
            problems.append("qk_layernorm=True with add_qkv_bias=True")
    elif cfg.add_qkv_bias:
        arch = None
        problems.append("add_qkv_bias=True without a shared expert")
    else:
        arch = MIXTRAL
        if not every_layer:
            problems.append(f"moe_layer_freq={cfg.moe_layer_freq} (Mixtral has experts in "
                            "every layer)")
        if cfg.moe_router_pre_softmax:
            problems.append("moe_router_pre_softmax=True (Mixtral renormalises the top k)")
    return arch, problems


EXPORT_FIX = ("MoE export supports RMSNorm + SwiGLU experts as Mixtral (every layer MoE, top-k "
              "renormalised), Qwen2-MoE (a sigmoid-gated shared expert) or Qwen3-MoE (q/k norms, "
              "no shared expert)")


def _sparse_step(pattern: List[bool]) -> Tuple[int, List[int]]:
    """(decoder_sparse_step, mlp_only_layers) for a per-layer MoE pattern: the largest step
    whose layers are exactly the MoE ones, else step 1 with the dense layers listed."""
    for step in range(len(pattern), 1, -1):
        if [(i + 1) % step == 0 for i in range(len(pattern))] == list(pattern):
            return step, []
    return 1, [i for i, moe in enumerate(pattern) if not moe]


def hf_choice(cfg: ModelConfig) -> Tuple[str, Dict[str, Any]]:
    """(transformers config class, its MoE fields) for a MoE ``cfg`` without problems."""
    arch, _ = export_choice(cfg)
    common = dict(hidden_act="silu", rms_norm_eps=cfg.norm_epsilon,
                  num_experts_per_tok=cfg.moe_router_topk,
                  router_aux_loss_coef=float(cfg.moe_aux_loss_coeff))
    if arch == MIXTRAL:
        return "MixtralConfig", dict(common, num_local_experts=cfg.num_moe_experts,
                                     intermediate_size=cfg.moe_ffn_hidden_size,
                                     sliding_window=None)
    step, dense = _sparse_step(cfg.moe_layers())
    qwen = dict(common, num_experts=cfg.num_moe_experts,
                moe_intermediate_size=cfg.moe_ffn_hidden_size,
                norm_topk_prob=not cfg.moe_router_pre_softmax, decoder_sparse_step=step,
                mlp_only_layers=dense, use_sliding_window=False)
    if arch == QWEN2_MOE:
        return "Qwen2MoeConfig", dict(
            qwen, shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            qkv_bias=cfg.add_qkv_bias)
    return "Qwen3MoeConfig", dict(qwen, attention_bias=False)


def check_written(hf_config, cfg: ModelConfig) -> Optional[str]:
    """Why the transformers config built for ``cfg`` would not hold it (a release whose
    Qwen2-MoE always has QKV biases), or None."""
    if type(hf_config).__name__ == "Qwen2MoeConfig" and not cfg.add_qkv_bias:
        # transformers 5 declares the field; older releases keep an unknown qkv_bias=False as
        # a plain attribute but build the biases regardless
        if not hasattr(type(hf_config), "qkv_bias"):
            return ("add_qkv_bias=False: this transformers' Qwen2-MoE always has QKV biases; "
                    "upgrade transformers")
    return None


# ---------------------------------------------------------------- weights


def layer_slots(layer, cfg: ModelConfig, hf_layer: str,
                arch: str) -> List[Tuple[str, List[str], torch.Tensor]]:
    """``(kind, hf_names, mcore_tensor)`` of a TP=1, EP=1 MoE layer's MLP (router, routed
    experts, shared expert); ``hf_layer`` is ``model.layers.{i}.``."""
    block, gate, up, down = _NAMES[arch]
    moe = f"{hf_layer}{block}."
    slots = [("copy", [moe + "gate.weight"], adapter.moe_router(layer).weight)]
    experts = adapter.local_experts(layer)
    if len(experts) != cfg.num_moe_experts:
        raise ValueError(f"{len(experts)} local experts of {cfg.num_moe_experts}: Hugging Face "
                         "conversion runs at expert parallel size 1")
    for e, expert in enumerate(experts):
        names = [f"{moe}experts.{e}.{p}.weight" for p in (gate, up)]
        slots.append(("fc1", names, expert.linear_fc1.weight))
        slots.append(("copy", [f"{moe}experts.{e}.{down}.weight"], expert.linear_fc2.weight))
    shared = adapter.shared_expert(layer)
    if shared is not None:
        base = f"{hf_layer}mlp.shared_expert."
        slots.append(("fc1", [base + "gate_proj.weight", base + "up_proj.weight"],
                      shared.linear_fc1.weight))
        slots.append(("copy", [base + "down_proj.weight"], shared.linear_fc2.weight))
        if getattr(shared, "gate_weight", None) is not None:
            slots.append(("copy", [f"{hf_layer}mlp.shared_expert_gate.weight"],
                          shared.gate_weight))
    return slots


_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)(\.weight)?$")
_MIXTRAL_MLP = re.compile(r"^(model\.layers\.\d+\.)mlp\.")


def unfuse_experts(hf_state: Dict[str, torch.Tensor], arch: str) -> Dict[str, torch.Tensor]:
    """``hf_state`` with transformers 5's fused 3-D expert tensors split into the per-expert
    Hub names (and Mixtral's ``mlp`` block named ``block_sparse_moe``); a state dict already
    in the per-expert layout comes back unchanged."""
    block, gate, up, down = _NAMES[arch]
    out: Dict[str, torch.Tensor] = {}
    for key in list(hf_state):
        tensor = hf_state.pop(key)
        match = _FUSED.match(key)
        if match and tensor.dim() == 3:
            layer, kind = match.group(1), match.group(2)
            moe = f"{layer}{block}.experts."
            for e in range(tensor.shape[0]):
                if kind == "gate_up_proj":  # [E, 2f, h]: gate rows, then up rows
                    gate_w, up_w = torch.chunk(tensor[e], 2, dim=0)
                    out[f"{moe}{e}.{gate}.weight"] = gate_w
                    out[f"{moe}{e}.{up}.weight"] = up_w
                else:  # [E, h, f]
                    out[f"{moe}{e}.{down}.weight"] = tensor[e]
            continue
        if arch == MIXTRAL:
            key = _MIXTRAL_MLP.sub(r"\1block_sparse_moe.", key)
        out[key] = tensor
    return out
