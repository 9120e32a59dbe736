"""Model architecture config (Llama family, Qwen2/3, Nemotron-4 and their mixture-of-experts
kin: Mixtral, Qwen2-MoE, Qwen3-MoE), and exact parameter counting."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from megatron_minitron.errors import UsageError

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("swiglu", "gelu", "squared_relu")
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
"""The Llama 3.x RoPE scaling parameters Megatron-Core hard-codes (only the factor varies)."""


@dataclass
class ModelConfig:
    """Architecture of a decoder-only GPT model (Llama family, Qwen, Nemotron-4), stored beside
    every checkpoint. Fields added later default to the behaviour before them, so older
    ``minitron_config.json`` files load unchanged."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Embedding / residual stream width."""
    ffn_hidden_size: int = 128
    """MLP intermediate width (per half for gated MLPs)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads (GQA); None means one per query head (MHA)."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size // num_attention_heads. Kept explicit after pruning."""
    vocab_size: int = 256
    """Rows of the embedding table (must be divisible by the tensor parallel size)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model accepts."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm (LayerNorm has a bias: two vectors per norm)."""
    layernorm_zero_centered_gamma: bool = False
    """LayerNorm only: the stored weight is gamma - 1 and the norm scales by 1 + weight
    (Nemotron's LayerNorm1P, Megatron's ``--apply-layernorm-1p``)."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    activation: str = "swiglu"
    """swiglu (gated SiLU: fc1 holds gate and up), or the plain two-matrix MLPs gelu and
    squared_relu (relu(x)**2, Nemotron-4)."""
    rotary_base: float = 10000.0
    """RoPE base (theta)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimension rotated (its leading channels); 0.5 for Nemotron-4."""
    rope_scaling: bool = False
    """Llama 3.x RoPE frequency scaling (Hugging Face ``rope_type: llama3``) as Megatron-Core
    implements it, with ``low_freq_factor`` 1, ``high_freq_factor`` 4 and
    ``original_max_position_embeddings`` 8192 (LLAMA3_ROPE_FIXED)."""
    rope_scaling_factor: float = 8.0
    """Llama 3.x RoPE scaling factor (8 for Llama-3.1, 32 for Llama-3.2); used with
    rope_scaling only."""
    seq_len_interpolation_factor: Optional[float] = None
    """Linear RoPE scaling (Hugging Face ``rope_type: linear``): positions are divided by this
    factor (Megatron-Core's ``seq_len_interpolation_factor``); None means no interpolation."""
    tie_word_embeddings: bool = True
    """Output layer shares the input embedding."""
    add_bias_linear: bool = False
    """Biases on every linear layer."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2)."""
    qk_layernorm: bool = False
    """A norm of the model's ``normalization`` over each query and key head (its kv_channels)
    before RoPE (Qwen3)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of new weights."""
    num_moe_experts: Optional[int] = None
    """Routed experts of each mixture-of-experts layer; None: a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """Each routed expert's MLP width (per half when gated); None means ffn_hidden_size. Dense
    layers of a mixed stack keep ffn_hidden_size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert every token passes through (Qwen2-MoE); None: none."""
    moe_shared_expert_gate: bool = False
    """The shared expert's output is scaled by sigmoid(x · gate) (Qwen2-MoE)."""
    moe_layer_freq: Union[int, List[int]] = 1
    """Which layers are MoE, as mcore reads it: k means layers 0, k, 2k, ...; a list holds 1
    (MoE) or 0 (dense) per layer."""
    moe_router_pre_softmax: bool = False
    """Router weights are the softmax over all experts, taken at the top k (Qwen2-MoE, Qwen3-MoE
    without ``norm_topk_prob``); False: the softmax over the top k logits (Mixtral, Qwen3-MoE)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the router's load-balancing loss in training (Hugging Face
    ``router_aux_loss_coef``)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (source HF architecture, pruning history, ...)."""

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise UsageError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise UsageError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise UsageError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}; pick a divisor"
            )
        if self.normalization not in NORMALIZATIONS:
            raise UsageError(f"normalization={self.normalization!r}; use one of {NORMALIZATIONS}")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"activation={self.activation!r}; use one of {ACTIVATIONS}")
        if self.layernorm_zero_centered_gamma and self.normalization != "LayerNorm":
            raise UsageError(f"layernorm_zero_centered_gamma=True needs normalization='LayerNorm', "
                             f"not {self.normalization!r}; set one or the other")
        if self.rope_scaling and not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1")
        interpolation = self.seq_len_interpolation_factor
        if interpolation is not None and not interpolation > 0:
            raise ValueError(f"seq_len_interpolation_factor={interpolation} must be positive")
        if interpolation is not None and self.rope_scaling:
            raise ValueError("rope_scaling=True with seq_len_interpolation_factor="
                             f"{interpolation}: Hugging Face models have one RoPE scaling; "
                             "set one or the other")
        if self.qk_layernorm and self.layernorm_zero_centered_gamma:
            raise ValueError("qk_layernorm=True with layernorm_zero_centered_gamma=True is not "
                             "supported; set one or the other")
        self._check_moe()
        rotated = int(self.kv_channels * self.rotary_percent)  # how mcore and HF round it
        if not 0.0 < self.rotary_percent <= 1.0 or rotated <= 0 or rotated % 2:
            raise UsageError(f"rotary_percent={self.rotary_percent} must be in (0, 1] and rotate "
                             f"an even number of the kv_channels={self.kv_channels} head channels")

    def _check_moe(self) -> None:
        if self.num_moe_experts is None:
            return
        experts = int(self.num_moe_experts)
        if experts <= 0:
            raise UsageError(f"num_moe_experts={experts} must be a positive integer (or unset "
                             "for a dense model)")
        if not 1 <= self.moe_router_topk <= experts:
            raise UsageError(f"moe_router_topk={self.moe_router_topk} must be between 1 and "
                             f"num_moe_experts={experts}; keep at least as many experts as "
                             "each token is routed to")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise UsageError(f"{name}={value} must be a positive integer")
        if self.add_bias_linear and self.moe_shared_expert_intermediate_size is not None:
            raise UsageError("add_bias_linear=True with a shared expert: Megatron-Core's shared "
                             "experts have no biases; drop one or the other")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise UsageError("moe_shared_expert_gate=True needs a shared expert; set "
                             "moe_shared_expert_intermediate_size")
        pattern = self.moe_layer_freq
        if isinstance(pattern, int):
            if pattern < 1:
                raise UsageError(f"moe_layer_freq={pattern} must be >= 1")
        elif len(pattern) != self.num_layers or set(pattern) - {0, 1}:
            raise UsageError(f"moe_layer_freq={list(pattern)} must hold one 0 (dense) or 1 "
                             f"(MoE) per layer ({self.num_layers} layers)")
        else:
            self.moe_layer_freq = [int(v) for v in pattern]

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def moe_layers(self) -> List[bool]:
        """Per layer: whether it is a mixture-of-experts layer (mcore's reading of
        ``moe_layer_freq``); all False for a dense model."""
        if not self.is_moe:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]
        return [bool(v) for v in self.moe_layer_freq]

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown model config keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def check_layout(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raises UsageError when TP, PP or EP does not divide what it must split."""
        moe = () if not self.is_moe else tuple(
            (name, value, size, flag) for name, value, size, flag in (
                ("num_moe_experts", self.num_moe_experts, ep, "--expert-model-parallel-size"),
                ("moe_ffn_hidden_size", self.moe_ffn_hidden_size, tp,
                 "--tensor-model-parallel-size"),
                ("moe_shared_expert_intermediate_size",
                 self.moe_shared_expert_intermediate_size, tp, "--tensor-model-parallel-size"),
            ) if value is not None)
        if ep > 1 and not self.is_moe:
            raise UsageError(f"--expert-model-parallel-size={ep} needs a mixture-of-experts "
                             "model; this one is dense (use 1)")
        checks = moe + (
            ("num_attention_heads", self.num_attention_heads, tp, "--tensor-model-parallel-size"),
            ("num_query_groups", self.num_query_groups, tp, "--tensor-model-parallel-size"),
            ("ffn_hidden_size", self.ffn_hidden_size, tp, "--tensor-model-parallel-size"),
            ("vocab_size", self.vocab_size, tp, "--tensor-model-parallel-size"),
            ("num_layers", self.num_layers, pp, "--pipeline-model-parallel-size"),
        )
        for name, value, size, flag in checks:
            if value % size:
                raise UsageError(
                    f"{flag}={size} does not divide {name}={value}; choose a size that divides it"
                )


def _mlp_parameters(cfg: ModelConfig, width: int) -> int:
    """One MLP (dense, expert or shared expert) of ``width`` neurons."""
    h = cfg.hidden_size
    fc1_out = 2 * width if cfg.gated else width
    return h * fc1_out + width * h + ((fc1_out + h) if cfg.add_bias_linear else 0)


def count_parameters(cfg: ModelConfig) -> Dict[str, int]:
    """Exact parameter counts of the GPTModel that :func:`build_model` makes for ``cfg``.

    Returns ``{"total", "embedding", "non_embedding", "active"}``; the output layer counts as
    embedding. ``active``: the parameters one token passes through (every routed expert but
    its ``moe_router_topk`` left out; equal to ``total`` for a dense model).
    """
    h, d = cfg.hidden_size, cfg.kv_channels
    q_out = cfg.num_attention_heads * d
    kv_out = cfg.num_query_groups * d
    norm = h if cfg.normalization == "RMSNorm" else 2 * h
    qkv_bias = cfg.add_bias_linear or cfg.add_qkv_bias
    attn = h * (q_out + 2 * kv_out) + (q_out + 2 * kv_out if qkv_bias else 0)
    attn += q_out * h + (h if cfg.add_bias_linear else 0)
    qk_norms = 2 * (d if cfg.normalization == "RMSNorm" else 2 * d) if cfg.qk_layernorm else 0
    common = attn + 2 * norm + qk_norms
    dense = _mlp_parameters(cfg, cfg.ffn_hidden_size)
    total = active = 0
    for moe in cfg.moe_layers():
        if not moe:
            total += common + dense
            active += common + dense
            continue
        shared = 0
        if cfg.moe_shared_expert_intermediate_size is not None:
            shared = _mlp_parameters(cfg, cfg.moe_shared_expert_intermediate_size)
            shared += h if cfg.moe_shared_expert_gate else 0
        expert = _mlp_parameters(cfg, cfg.moe_ffn_hidden_size)
        router = cfg.num_moe_experts * (h + (1 if cfg.add_bias_linear else 0))
        total += common + router + shared + cfg.num_moe_experts * expert
        active += common + router + shared + cfg.moe_router_topk * expert
    embedding = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    non_embedding = total + norm
    return {"total": embedding + non_embedding, "embedding": embedding,
            "non_embedding": non_embedding, "active": embedding + active + norm}
