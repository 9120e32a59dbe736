"""Hugging Face configs and weights <-> our ModelConfig and mcore GPTModel.

Supported: ``LlamaForCausalLM`` (Llama 2, Llama 3.x with its ``llama3`` RoPE scaling, SmolLM2),
``MistralForCausalLM`` without a sliding window (Mistral-NeMo's head_dim included),
``Qwen2ForCausalLM`` (QKV bias, no sliding window), ``Qwen3ForCausalLM`` (per-head q/k RMSNorm,
dense) and ``NemotronForCausalLM`` (Nemotron-4: squared-ReLU MLP, LayerNorm1P with bias, partial
RoPE). The mixture-of-experts ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and
``Qwen3MoeForCausalLM`` share this attention and dense-layer mapping; their routers, experts and
shared experts are mapped in :mod:`megatron_minitron.hf.moe`. Anything the mcore model cannot
reproduce exactly raises a one-line :class:`UsageError` naming the value.

Weight layout (per layer ``i``, HF names under ``model.layers.{i}``)::

    input_layernorm            <-> input norm (weight, and bias for LayerNorm)
    self_attn.{q,k,v}_proj     <-> fused QKV, rows query group by group: [q heads, k, v]
    self_attn.{q,k}_norm       <-> q_layernorm / k_layernorm (Qwen3, one head's width)
    self_attn.o_proj           <-> attention output projection
    post_attention_layernorm   <-> pre-MLP norm
    mlp.{gate,up}_proj         <-> MLP fc1 = cat[gate, up] (SwiGLU); mlp.up_proj alone when
                                   the MLP is not gated (Nemotron)
    mlp.down_proj              <-> MLP fc2
    mlp.* / block_sparse_moe.* <-> router, routed and shared experts of a MoE layer
                                   (:mod:`megatron_minitron.hf.moe`)

plus ``model.embed_tokens``, ``model.norm`` and ``lm_head`` (untied models only).

Nemotron's LayerNorm1P stores gamma - 1 exactly as Megatron does with
``layernorm_zero_centered_gamma`` (our ``ZeroCenteredLayerNorm`` on the local spec), so norm
weights are copied unchanged in both directions. Its partial RoPE rotates the leading
``partial_rotary_factor`` of each head's channels with the half-split convention, the same as
mcore's ``rotary_percent``. Llama 3.x's ``llama3`` RoPE scaling is mcore's ``rope_scaling``,
whose low/high frequency factors and original context (1, 4, 8192) are fixed: other values are
refused. ``linear`` RoPE scaling is mcore's ``seq_len_interpolation_factor``; other scalings
(yarn, dynamic, longrope, ...) are refused.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_minitron import adapter
from megatron_minitron.config import LLAMA3_ROPE_FIXED, ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.hf import moe

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "NemotronForCausalLM": "nemotron",
    **moe.MOE_ARCHITECTURES,
}
"""Supported HF architectures and their ``model_type``."""

MODEL_TYPES = {model_type: arch for arch, model_type in ARCHITECTURES.items()}

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# HF buffers that are recomputed from the config and carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------- configs


def check_architecture(architectures: Optional[List[str]], model_type: Optional[str],
                       where: str) -> str:
    """Returns the supported architecture name, or raises UsageError naming the unknown one."""
    names = list(architectures or [])
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    supported = ", ".join(ARCHITECTURES)
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        shown = names or [f"model_type={model_type!r}"]
        raise UsageError(f"{where}: architecture {', '.join(map(str, shown))} is not supported; "
                         f"supported: {supported}")
    return names[0]


def _rope(hf_config, where: str) -> Tuple[float, Dict[str, Any]]:
    """(rope_theta, rope parameters) from either the transformers 5 ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` fields."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # one per layer type
        if len(params) != 1:
            raise UsageError(f"{where}: per-layer-type rope parameters {sorted(params)} are not "
                             "supported; only one RoPE for all layers maps onto Megatron-Core")
        params = next(iter(params.values()))
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(10000.0 if theta is None else theta), merged


def _partial_rotary(hf_config, rope: Dict[str, Any]) -> float:
    """Fraction of each head's channels rotated: ``partial_rotary_factor`` from the rope
    parameters (transformers 5) or the config itself (older releases)."""
    partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    return float(partial or 1.0)


def _rope_type(rope: Dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type")) or "default"


def _check_rope_scaling(rope: Dict[str, Any], where: str) -> None:
    """Only the plain RoPE and Llama 3.x's ``llama3`` scaling with mcore's fixed parameters."""
    rope_type = _rope_type(rope)
    if rope_type == "default":
        return
    if rope_type not in ("llama3", "linear"):
        raise UsageError(f"{where}: rope_scaling rope_type={rope_type!r} is not supported; only "
                         "the default RoPE, 'linear' and Llama 3.x's 'llama3' map onto "
                         "Megatron-Core")
    if rope_type == "llama3":
        for name, fixed in LLAMA3_ROPE_FIXED.items():
            if name not in rope or float(rope[name]) != fixed:
                raise UsageError(f"{where}: rope_scaling {name}={rope.get(name)} is not "
                                 "supported; Megatron-Core's llama3 RoPE scaling fixes it at "
                                 f"{fixed:g}")
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise UsageError(f"{where}: rope_scaling factor={factor} is not supported; the "
                         f"{rope_type} scaling needs a factor >= 1")


def _check_supported(hf_config, arch: str, where: str) -> None:
    """Raises UsageError for features the mcore model here cannot reproduce."""
    nemotron = arch == "NemotronForCausalLM"
    _, rope = _rope(hf_config, where)
    _check_rope_scaling(rope, where)
    act = getattr(hf_config, "hidden_act", "silu")
    expected_act = "relu2" if nemotron else "silu"
    if act != expected_act:
        kind = "relu2 (squared ReLU)" if nemotron else "silu (SwiGLU)"
        raise UsageError(f"{where}: hidden_act={act!r} is not supported for {arch}; only {kind}")
    if moe.is_moe_architecture(arch):
        moe.check_supported(hf_config, arch, where)
    else:
        for name in ("num_local_experts", "num_experts", "n_routed_experts"):
            if getattr(hf_config, name, None):
                raise UsageError(f"{where}: {name}={getattr(hf_config, name)} (mixture of "
                                 f"experts) is not supported for {arch}; only dense models "
                                 f"(MoE: {', '.join(moe.MOE_ARCHITECTURES)})")
    window = getattr(hf_config, "sliding_window", None)
    windowed = getattr(hf_config, "use_sliding_window",
                       arch in ("MistralForCausalLM", moe.MIXTRAL))
    if windowed and window and window < hf_config.max_position_embeddings:
        raise UsageError(f"{where}: sliding_window={window} is not supported; Megatron-Core "
                         "attends over the full context (use a model without a sliding window)")
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UsageError(f"{where}: layer_types {sorted(layer_types)} are not supported; only "
                         "full_attention")
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    if nemotron and attention_bias != mlp_bias:
        raise UsageError(f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is "
                         "not supported; Megatron-Core puts biases on all linear layers or none")
    if not nemotron:
        for name, value in (("attention_bias", attention_bias), ("mlp_bias", mlp_bias)):
            if value:
                raise UsageError(f"{where}: {name}=True is not supported for {arch} "
                                 "(Megatron-Core would add biases to every linear layer)")
        partial = _partial_rotary(hf_config, rope)
        if partial != 1.0:
            raise UsageError(f"{where}: partial_rotary_factor={partial} is not supported for "
                             f"{arch}; only 1.0")


def _family_fields(hf_config, arch: str, rope: Dict[str, Any]) -> Dict[str, Any]:
    """The ModelConfig fields that differ between the Llama family and Nemotron."""
    if arch == "NemotronForCausalLM":
        bias = bool(getattr(hf_config, "attention_bias", False))
        return dict(normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                    norm_epsilon=float(hf_config.norm_eps), activation="squared_relu",
                    rotary_percent=_partial_rotary(hf_config, rope), add_bias_linear=bias,
                    add_qkv_bias=False)
    fields = dict(normalization="RMSNorm", norm_epsilon=float(hf_config.rms_norm_eps),
                  activation="swiglu", add_bias_linear=False,
                  add_qkv_bias=arch == "Qwen2ForCausalLM",
                  qk_layernorm=arch in ("Qwen3ForCausalLM", moe.QWEN3_MOE))
    if arch == moe.QWEN2_MOE:  # transformers 5 makes the QKV bias optional (qkv_bias)
        fields["add_qkv_bias"] = bool(getattr(hf_config, "qkv_bias", True))
    if moe.is_moe_architecture(arch):
        fields.update(moe.moe_fields(hf_config, arch, ""))
    return fields


def config_from_hf(hf_config, arch: str, where: str) -> ModelConfig:
    """Maps a transformers Llama/Mistral/Qwen2/Qwen3/Nemotron config, or a Mixtral/Qwen2-MoE/
    Qwen3-MoE one (:mod:`megatron_minitron.hf.moe`), onto our ModelConfig."""
    _check_supported(hf_config, arch, where)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    theta, rope = _rope(hf_config, where)
    token_ids = {k: getattr(hf_config, k, None) for k in TOKEN_ID_FIELDS}
    try:
        return ModelConfig(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            ffn_hidden_size=hf_config.intermediate_size,
            num_attention_heads=heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            kv_channels=head_dim,
            vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            rotary_base=theta,
            rope_scaling=_rope_type(rope) == "llama3",
            rope_scaling_factor=float(rope["factor"]) if _rope_type(rope) == "llama3" else 8.0,
            seq_len_interpolation_factor=(float(rope["factor"]) if _rope_type(rope) == "linear"
                                          else None),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
            extra={"hf_architecture": arch, "hf_token_ids": token_ids},
            **_family_fields(hf_config, arch, rope),
        )
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from err


def nemotron_like(cfg: ModelConfig) -> bool:
    """True when ``cfg`` is a Nemotron-4 architecture (exported as ``NemotronForCausalLM``)."""
    return cfg.activation == "squared_relu"


def _export_problems(cfg: ModelConfig) -> Tuple[List[str], str]:
    """(what in ``cfg`` has no HF equivalent, what the chosen HF architecture needs)."""
    problems = []
    if cfg.is_moe:
        return _rms_swiglu_problems(cfg) + moe.export_choice(cfg)[1], moe.EXPORT_FIX
    if nemotron_like(cfg):
        if cfg.normalization != "LayerNorm" or not cfg.layernorm_zero_centered_gamma:
            problems.append(f"normalization={cfg.normalization} with layernorm_zero_centered_"
                            f"gamma={cfg.layernorm_zero_centered_gamma}")
        if cfg.add_qkv_bias and not cfg.add_bias_linear:
            problems.append("add_qkv_bias=True")
        if cfg.qk_layernorm:
            problems.append("qk_layernorm=True")
        return problems, ("Nemotron export needs squared_relu + LayerNorm with "
                          "layernorm_zero_centered_gamma=True and no qk_layernorm")
    problems = _rms_swiglu_problems(cfg)
    if cfg.qk_layernorm and cfg.add_qkv_bias:
        problems.append("qk_layernorm=True with add_qkv_bias=True")
    return problems, ("export supports RMSNorm + SwiGLU + full RoPE models (Llama/Mistral, "
                      "Qwen2 with QKV bias, Qwen3 with qk_layernorm) and squared_relu + "
                      "zero-centred LayerNorm models (Nemotron)")


def _rms_swiglu_problems(cfg: ModelConfig) -> List[str]:
    """What keeps ``cfg`` from being a Llama-like model (RMSNorm, SwiGLU, no biases, full
    RoPE)."""
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append(f"normalization={cfg.normalization}")
    if not cfg.gated:
        problems.append(f"activation={cfg.activation}")
    if cfg.add_bias_linear:
        problems.append("add_bias_linear=True")
    if cfg.rotary_percent != 1.0:
        problems.append(f"rotary_percent={cfg.rotary_percent}")
    return problems


def _hf_choices(cfg: ModelConfig) -> List[Tuple[str, Dict[str, Any]]]:
    """(transformers config class, its family's fields) to try, the preferred first: Nemotron
    for squared-ReLU models, Qwen3 with q/k norms, Qwen2 with a QKV bias only, else Llama, or
    Mistral (which accepts a hidden size that is no multiple of the heads) for what LlamaConfig
    refuses and for models imported from Mistral."""
    if cfg.is_moe:
        return [moe.hf_choice(cfg)]
    if nemotron_like(cfg):
        return [("NemotronConfig", dict(
            hidden_act="relu2", norm_eps=cfg.norm_epsilon,
            partial_rotary_factor=cfg.rotary_percent, attention_bias=cfg.add_bias_linear,
            mlp_bias=cfg.add_bias_linear))]
    rms = dict(hidden_act="silu", rms_norm_eps=cfg.norm_epsilon)
    if cfg.qk_layernorm:
        return [("Qwen3Config", dict(rms, attention_bias=False, use_sliding_window=False))]
    if cfg.add_qkv_bias:
        return [("Qwen2Config", dict(rms, use_sliding_window=False))]
    llama = ("LlamaConfig", dict(rms, attention_bias=False, mlp_bias=False))
    mistral = ("MistralConfig", dict(rms, sliding_window=None))
    if cfg.extra.get("hf_architecture") == "MistralForCausalLM":
        return [mistral, llama]
    return [llama, mistral]


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def hf_config_from(cfg: ModelConfig, dtype: torch.dtype, token_ids: Optional[Dict] = None):
    """The transformers config that holds ``cfg`` (see :func:`_hf_choices`).

    Raises:
        UsageError: one line, when ``cfg`` has no Hugging Face equivalent or the installed
            transformers refuses every candidate config.
    """
    problems, fix = _export_problems(cfg)
    if problems:
        raise UsageError(f"model config {', '.join(problems)} has no Hugging Face equivalent; "
                         f"{fix}")
    import transformers

    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=float(cfg.rotary_base),
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.init_method_std,
        **ids,
    )
    if cfg.rope_scaling:
        kwargs["rope_scaling"] = dict(rope_type="llama3", factor=float(cfg.rope_scaling_factor),
                                      **LLAMA3_ROPE_FIXED)
    elif cfg.seq_len_interpolation_factor is not None:
        kwargs["rope_scaling"] = dict(rope_type="linear",
                                      factor=float(cfg.seq_len_interpolation_factor))
    refusals = []
    for class_name, family in _hf_choices(cfg):
        arch = class_name[:-len("Config")] + "ForCausalLM"
        try:
            hf_config = getattr(transformers, class_name)(architectures=[arch],
                                                          **{**kwargs, **family})
            break
        except Exception as err:  # noqa: BLE001 - any refusal by transformers' validation
            refusals.append(f"{arch}: {_last_line(err)}")
    else:
        raise UsageError(f"model config hidden_size={cfg.hidden_size}, num_attention_heads="
                         f"{cfg.num_attention_heads}, kv_channels={cfg.kv_channels} cannot be "
                         f"written for transformers {transformers.__version__} "
                         f"({'; '.join(refusals)}); prune to a shape it accepts")
    refusal = moe.check_written(hf_config, cfg) if cfg.is_moe else None
    if refusal:
        raise UsageError(f"model config {refusal}")
    # transformers 5 names the weight dtype "dtype", older releases "torch_dtype"
    setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", dtype)
    return hf_config


def hf_exportable(cfg: ModelConfig) -> Optional[str]:
    """None when ``export-hf`` can write ``cfg`` as a transformers model; otherwise the one-line
    reason (checked against the installed transformers when there is one)."""
    try:
        hf_config_from(cfg, torch.float32)
    except UsageError as err:
        return str(err)
    except ImportError:  # no transformers here: only our own mapping was checked
        return None
    return None


# ---------------------------------------------------------------- weights


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q [n_heads*d, ...], k/v [n_groups*d, ...] -> mcore QKV [n_groups*(hpg+2)*d, ...]."""
    groups, d = cfg.num_query_groups, cfg.kv_channels
    rest = q.shape[1:]
    q = q.reshape(groups, cfg.heads_per_group * d, *rest)  # [g, hpg*d, ...]
    k = k.reshape(groups, d, *rest)  # [g, d, ...]
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [g*(hpg+2)*d, ...]


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: mcore QKV -> [q, k, v] in HF's layout."""
    groups, d, hpg = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (hpg + 2) * d, *rest)  # [g, (hpg+2)*d, ...]
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


def _combine(kind: str, tensors: List[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if kind == "qkv":
        return fuse_qkv(*tensors, cfg)
    if kind == "fc1":
        return torch.cat(tensors, dim=0)  # [2*ffn, h] = [gate; up]
    return tensors[0]


def _split(kind: str, tensor: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
    if kind == "qkv":
        return split_qkv(tensor, cfg)
    if kind == "fc1":
        return list(torch.chunk(tensor, 2, dim=0))  # [gate, up], each [ffn, h]
    return [tensor]


def _norm_slots(hf_name: str, norm, cfg: ModelConfig) -> List[Tuple[str, List[str], torch.Tensor]]:
    slots = [("copy", [hf_name + ".weight"], norm.weight)]
    if cfg.normalization == "LayerNorm":
        slots.append(("copy", [hf_name + ".bias"], norm.bias))
    return slots


def _moe_architecture(cfg: ModelConfig) -> Optional[str]:
    """The HF MoE architecture whose weight names a MoE ``cfg`` uses (the one export writes;
    the source architecture for an imported model), None for a dense model."""
    if not cfg.is_moe:
        return None
    arch = moe.export_choice(cfg)[0] or cfg.extra.get("hf_architecture")
    return arch if moe.is_moe_architecture(arch) else moe.MIXTRAL


def weight_slots(model, cfg: ModelConfig) -> List[Tuple[str, List[str], torch.Tensor]]:
    """``(kind, hf_names, mcore_tensor)`` for every weight of a TP=1, PP=1 model (either spec:
    a norm's tensors are its own module's or those of the linear it is fused into).

    ``kind`` says how the HF tensors combine into the mcore one: "copy", "qkv" or "fc1".
    """
    bias = cfg.add_bias_linear
    fc1_kind = "fc1" if cfg.gated else "copy"
    fc1_names = ["mlp.gate_proj", "mlp.up_proj"] if cfg.gated else ["mlp.up_proj"]
    moe_arch = _moe_architecture(cfg)
    slots = [("copy", ["model.embed_tokens.weight"], adapter.word_embeddings(model).weight)]
    for layer in adapter.decoder_layers(model):
        i = adapter.layer_global_index(layer)
        hf = f"model.layers.{i}."
        input_norm, pre_mlp_norm = adapter.layer_norms(layer)
        qkv = adapter.attention_qkv(layer)
        proj = adapter.attention_output_projection(layer)
        attn = [hf + f"self_attn.{p}_proj." for p in "qkv"]
        slots += _norm_slots(hf + "input_layernorm", input_norm, cfg)
        slots.append(("qkv", [n + "weight" for n in attn], qkv.weight))
        if cfg.add_qkv_bias or bias:
            slots.append(("qkv", [n + "bias" for n in attn], qkv.bias))
        for name, norm in zip(("q_norm", "k_norm"), adapter.attention_qk_norms(layer)):
            slots += _norm_slots(hf + "self_attn." + name, norm, cfg)
        slots.append(("copy", [hf + "self_attn.o_proj.weight"], proj.weight))
        if bias:
            slots.append(("copy", [hf + "self_attn.o_proj.bias"], proj.bias))
        slots += _norm_slots(hf + "post_attention_layernorm", pre_mlp_norm, cfg)
        if adapter.is_moe_layer(layer):
            slots += moe.layer_slots(layer, cfg, hf, moe_arch)
            continue
        fc1, fc2 = adapter.mlp_fc1(layer), adapter.mlp_fc2(layer)
        slots.append((fc1_kind, [hf + n + ".weight" for n in fc1_names], fc1.weight))
        if bias:
            slots.append((fc1_kind, [hf + n + ".bias" for n in fc1_names], fc1.bias))
        slots.append(("copy", [hf + "mlp.down_proj.weight"], fc2.weight))
        if bias:
            slots.append(("copy", [hf + "mlp.down_proj.bias"], fc2.bias))
    slots += _norm_slots("model.norm", adapter.final_norm(model), cfg)
    if not cfg.tie_word_embeddings:
        slots.append(("copy", ["lm_head.weight"], adapter.output_layer(model).weight))
    return slots


@torch.no_grad()
def load_hf_state(model, cfg: ModelConfig, hf_state: Dict[str, torch.Tensor], where: str) -> None:
    """Copies an HF state dict into ``model``; consumes ``hf_state`` as it goes (frees memory).

    Raises UsageError for a missing, surplus or mis-shaped tensor.
    """
    if cfg.is_moe:  # either expert layout: transformers 5's fused tensors or per-expert names
        per_expert = moe.unfuse_experts(hf_state, _moe_architecture(cfg))
        hf_state.update(per_expert)
    for kind, names, target in weight_slots(model, cfg):
        missing = [n for n in names if n not in hf_state]
        if missing:
            raise UsageError(f"{where}: weight {missing[0]} is missing from the model")
        value = _combine(kind, [hf_state.pop(n) for n in names], cfg)
        if value.shape != target.shape:
            raise UsageError(f"{where}: weight {names[0]} has shape {tuple(value.shape)}, the "
                             f"config implies {tuple(target.shape)}")
        target.copy_(value)
    if cfg.tie_word_embeddings:
        hf_state.pop("lm_head.weight", None)  # the tied alias of the embedding
    surplus = [k for k in hf_state if not k.endswith(_IGNORED_SUFFIXES)]
    if surplus:
        raise UsageError(f"{where}: weights the config does not account for: {surplus[:3]}")


@torch.no_grad()
def hf_state_from(model, cfg: ModelConfig, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """HF state dict (contiguous, unshared tensors of ``dtype``) of a TP=1, PP=1 model."""
    state = {}
    for kind, names, source in weight_slots(model, cfg):
        for name, part in zip(names, _split(kind, source.detach(), cfg)):
            state[name] = part.to(device="cpu", dtype=dtype).contiguous().clone()
    return state
