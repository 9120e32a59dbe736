"""The scale-out plan's model (scripts/scaling_plan.py writes it as docs/SCALING.md): the
assumptions, the models, every rank's share of the parameters, activation and optimizer memory,
the smallest layouts that fit, and the time of each stage.

Parameter counts are exact (``megatron_minitron.config.count_parameters``); every rank's share
of them follows Megatron's sharding (column/row-parallel linears split by TP, norms replicated,
embedding on the first and output layer on the last pipeline stage).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_minitron.config import ModelConfig, count_parameters  # noqa: E402

DOC = os.path.join(ROOT, "docs", "SCALING.md")
GIB = 1024 ** 3


@dataclass(frozen=True)
class Assumptions:
    """What the plan takes as given (every figure in the document follows from these)."""

    gpus_per_node: int = 8
    """DGX A100: 8 GPUs per node, NVLink inside the node."""
    gpu_memory_gib: float = 80.0
    """A100 80GB."""
    reserve_gib: float = 8.0
    """Kept free per GPU for the CUDA context, NCCL buffers and allocator fragmentation."""
    peak_tflops: float = 312.0
    """A100 dense bf16 peak, TFLOP/s per GPU."""
    mfu_train: float = 0.40
    """Model FLOPs utilisation of training steps (correction, distillation)."""
    mfu_forward: float = 0.30
    """Model FLOPs utilisation of forward-only passes (importance)."""
    seq_length: int = 4096
    """Tokens per sample in every stage."""
    calib_samples: int = 1024
    """Calibration samples for importance (1024 x 4096 tokens, as in the paper)."""
    depth_samples: int = 128
    """Samples of the layer-perplexity passes (one forward per skipped layer)."""
    importance_micro_batch: int = 1
    """Samples per forward pass during importance."""
    train_micro_batch: int = 1
    """Samples per forward/backward pass while training."""
    checkpoint_io_gbps: float = 1.0
    """Checkpoint read+write bandwidth of one process, GB/s (pruning time)."""
    correction_tokens: float = 10e9
    """Tokens of the teacher-correction row (time scales linearly with the budget you choose)."""


A = Assumptions()


def llama31_8b() -> ModelConfig:
    return ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                       num_attention_heads=32, num_query_groups=8, kv_channels=128,
                       vocab_size=128256, max_position_embeddings=131072, rotary_base=500000.0,
                       tie_word_embeddings=False, normalization="RMSNorm", activation="swiglu")


def nemotron4_15b() -> ModelConfig:
    # squared-ReLU MLP (two matrices), LayerNorm1P with bias, half of each head rotated by RoPE
    return ModelConfig(num_layers=32, hidden_size=6144, ffn_hidden_size=24576,
                       num_attention_heads=48, num_query_groups=8, kv_channels=128,
                       vocab_size=256000, max_position_embeddings=4096, rotary_percent=0.5,
                       tie_word_embeddings=False, normalization="LayerNorm",
                       layernorm_zero_centered_gamma=True, activation="squared_relu")


def qwen3_30b_a3b() -> ModelConfig:
    # Qwen3-30B-A3B's config.json: every layer MoE, 128 experts of width 768, top 8 renormalised
    return ModelConfig(num_layers=48, hidden_size=2048, ffn_hidden_size=6144,
                       num_attention_heads=32, num_query_groups=4, kv_channels=128,
                       vocab_size=151936, max_position_embeddings=40960, rotary_base=1000000.0,
                       norm_epsilon=1e-6, tie_word_embeddings=False, qk_layernorm=True,
                       num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
                       moe_aux_loss_coeff=0.001)


MODELS: Dict[str, ModelConfig] = {
    "Llama-3.1-8B": llama31_8b(),
    "Llama-3.1-Minitron-4B-Width": llama31_8b().replace(hidden_size=3072, ffn_hidden_size=9216),
    "Llama-3.1-Minitron-4B-Depth": llama31_8b().replace(num_layers=16),
    "Nemotron-4-15B": nemotron4_15b(),
    "Minitron-8B": nemotron4_15b().replace(hidden_size=4096, ffn_hidden_size=16384),
    "Minitron-4B": nemotron4_15b().replace(hidden_size=3072, ffn_hidden_size=9216,
                                           num_attention_heads=24),
    "Qwen3-30B-A3B": qwen3_30b_a3b(),
    "Qwen3-30B-A3B-88E": qwen3_30b_a3b().replace(num_moe_experts=88),
}
MOE_TARGET = "num_moe_experts=88"
"""The pruning target of the MoE plan (about two thirds of the experts, a multiple of EP=8)."""


# ----------------------------------------------------------------------------- parameters
def _mlp_params(cfg: ModelConfig, width: int) -> int:
    fc1 = 2 * width if cfg.gated else width
    return cfg.hidden_size * fc1 + width * cfg.hidden_size + (fc1 if cfg.add_bias_linear else 0)


def parts(cfg: ModelConfig) -> Dict[str, int]:
    """Parameters by how Megatron shards them, per layer kind: ``layer_split`` (split by TP) and
    ``layer_replicated`` of a dense layer; for a mixture-of-experts model also ``moe_split``
    (attention and shared expert, split by TP), ``moe_replicated`` (norms and router) and
    ``expert`` (one routed expert, split by TP; each rank holds experts/EP of them); embedding;
    output layer (0 when tied); final norm. Sums to ``count_parameters(cfg)["total"]``."""
    h, d = cfg.hidden_size, cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    norm = h if cfg.normalization == "RMSNorm" else 2 * h
    qk_norms = 2 * (d if cfg.normalization == "RMSNorm" else 2 * d) if cfg.qk_layernorm else 0
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.add_bias_linear or
                                            cfg.add_qkv_bias else 0)
    row_bias = 2 * h if cfg.add_bias_linear else 0  # proj and fc2 biases: replicated
    result = {
        "layer_split": attention + _mlp_params(cfg, cfg.ffn_hidden_size),
        "layer_replicated": 2 * norm + row_bias + qk_norms,
        "embedding": cfg.vocab_size * h,
        "output": 0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
        "final_norm": norm,
    }
    total = result["embedding"] + result["output"] + result["final_norm"]
    if cfg.is_moe:
        shared = cfg.moe_shared_expert_intermediate_size
        result["moe_split"] = attention + (_mlp_params(cfg, shared) if shared else 0)
        result["moe_replicated"] = (2 * norm + qk_norms + cfg.num_moe_experts * h
                                    + (h if cfg.moe_shared_expert_gate else 0))
        result["expert"] = _mlp_params(cfg, cfg.moe_ffn_hidden_size) + (
            h if cfg.add_bias_linear else 0)
    for moe in cfg.moe_layers():
        total += (result["moe_split"] + result["moe_replicated"]
                  + cfg.num_moe_experts * result["expert"] if moe else
                  result["layer_split"] + result["layer_replicated"])
    assert total == count_parameters(cfg)["total"], (total, count_parameters(cfg))
    return result


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> List[bool]:
    """Per layer of pipeline stage ``stage``: whether it is a mixture-of-experts layer."""
    per_stage = cfg.num_layers // pp
    return cfg.moe_layers()[stage * per_stage:(stage + 1) * per_stage]


def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1,
                 experts_only: bool = False) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (0-based) at TP=tp, PP=pp, EP=ep
    (``experts_only``: of them, the routed experts', whose optimizer state is sharded over the
    expert data parallel ranks)."""
    p = parts(cfg)
    experts = sum(cfg.num_moe_experts // ep * (p["expert"] // tp)
                  for moe in stage_layers(cfg, pp, stage) if moe)
    if experts_only:
        return experts
    params = experts + sum(p["moe_split"] // tp + p["moe_replicated"] if moe else
                           p["layer_split"] // tp + p["layer_replicated"]
                           for moe in stage_layers(cfg, pp, stage))
    if stage == 0:
        params += p["embedding"] // tp
    if stage == pp - 1:
        # a tied output layer on another stage keeps its own copy of the embedding
        output = p["output"] or (p["embedding"] if pp > 1 else 0)
        params += output // tp + p["final_norm"]
    return params


# ----------------------------------------------------------------------------- memory
def _mlp_activations(cfg: ModelConfig, moe: bool) -> Tuple[int, int]:
    """(elements per token kept by a layer's MLP part split over TP, replicated ones): fc1's
    output and fc2's input of the dense MLP; of a MoE layer, those of each of its top-k routed
    copies and of the shared expert, and the routed copies of the token going in and coming out
    of the experts (2·k·h)."""
    def mlp(width):
        return (2 * width if cfg.gated else width) + width

    if not moe:
        return mlp(cfg.ffn_hidden_size), 0
    shared = cfg.moe_shared_expert_intermediate_size
    split = cfg.moe_router_topk * mlp(cfg.moe_ffn_hidden_size) + (mlp(shared) if shared else 0)
    return split, 2 * cfg.moe_router_topk * cfg.hidden_size


def train_activation_elements(cfg: ModelConfig, tp: int, moe: bool = False) -> int:
    """Activation elements kept for backward, per token and layer (bf16, flash attention, no
    recomputation, no sequence parallelism): both norms' inputs and outputs (4h, replicated over
    TP), Q/K/V and the attention output (2q + 2kv), and the MLP's (:func:`_mlp_activations`)."""
    d = cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    split, replicated = _mlp_activations(cfg, moe)
    return 4 * cfg.hidden_size + replicated + (2 * q + 2 * kv + split) // tp


def forward_activation_elements(cfg: ModelConfig, tp: int) -> int:
    """Largest live set of a no-grad forward through one layer, per token: the residual, the norm
    output and the MLP's intermediate tensors (or attention's Q/K/V and output if larger)."""
    d = cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    largest = max(_mlp_activations(cfg, moe) for moe in set(cfg.moe_layers()))
    return 2 * cfg.hidden_size + largest[1] + max(largest[0], 2 * q + 2 * kv) // tp


@dataclass
class Memory:
    """Bytes per rank of the worst pipeline stage, by component."""

    items: List[Tuple[str, float]]

    @property
    def total(self) -> float:
        return sum(value for _, value in self.items)

    def describe(self) -> str:
        return " + ".join(f"{name} {value / GIB:.1f}" for name, value in self.items if value)


def importance_memory(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> Memory:
    """bf16 weights + one micro-batch's forward working set + the last stage's logits (bf16,
    plus fp32 copies for the loss: 10 bytes per logits element)."""
    tokens = A.importance_micro_batch * A.seq_length
    worst = None
    for stage in range(pp):
        items = [("weights", 2.0 * stage_params(cfg, tp, pp, stage, ep)),
                 ("activations", 2.0 * tokens * forward_activation_elements(cfg, tp))]
        if stage == pp - 1:
            items.append(("logits", 10.0 * tokens * cfg.vocab_size / tp))
        memory = Memory(items)
        worst = memory if worst is None or memory.total > worst.total else worst
    return worst


def training_memory(cfg: ModelConfig, tp: int, pp: int, dp: int,
                    teacher: Optional[ModelConfig] = None, ep: int = 1) -> Memory:
    """Trained model: bf16 weights (2) + fp32 gradients (4) + fp32 main weights and Adam moments
    sharded by the distributed optimizer (12 / DP; routed experts' over the DP / EP ranks that
    hold the same experts) bytes per parameter; activations of the micro-batches 1F1B keeps in
    flight ((PP - stage) micro-batches of the stage's layers); on the last stage the logits
    (student bf16, teacher bf16 and the chunked loss's extra <= 1.25 fp32 logits: 9 bytes per
    element with a teacher, 7 without). A teacher adds its frozen bf16 weights."""
    tokens = A.train_micro_batch * A.seq_length
    worst = None
    for stage in range(pp):
        params = stage_params(cfg, tp, pp, stage, ep)
        experts = stage_params(cfg, tp, pp, stage, ep, experts_only=True)
        items = [("weights+grads", 6.0 * params),
                 ("optimizer", 12.0 * ((params - experts) / dp + experts * ep / dp))]
        if teacher is not None:
            items.append(("teacher", 2.0 * stage_params(teacher, tp, pp, stage, ep)))
        in_flight = pp - stage
        per_token = sum(train_activation_elements(cfg, tp, moe)
                        for moe in stage_layers(cfg, pp, stage))
        items.append(("activations", 2.0 * tokens * in_flight * per_token))
        if stage == pp - 1:
            per_element = 9.0 if teacher is not None else 7.0
            items.append(("logits", per_element * tokens * cfg.vocab_size / tp))
        memory = Memory(items)
        worst = memory if worst is None or memory.total > worst.total else worst
    return worst


def prune_host_memory(source: ModelConfig) -> float:
    """Streamed pruning holds about two of the largest slices (embedding or one layer), bf16."""
    p = parts(source)
    layer = max(p["moe_split"] + p["moe_replicated"] + source.num_moe_experts * p["expert"]
                if moe else p["layer_split"] + p["layer_replicated"]
                for moe in source.moe_layers())
    return 2 * 2.0 * max(p["embedding"], layer)


# ----------------------------------------------------------------------------- layouts and time
def candidate_layouts(cfg: ModelConfig, gpus: int, teacher: Optional[ModelConfig] = None):
    """(TP, PP, EP) that divide the model (and teacher) and the GPU count: TP inside a node; EP
    (mixture-of-experts models only) divides the data parallel size and the experts."""
    models = (cfg, teacher) if teacher else (cfg,)
    moe = any(model.is_moe for model in models)
    for size in sorted({tp * pp for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8)}):
        for pp in (1, 2, 4, 8):
            tp = size // pp
            if tp * pp != size or tp not in (1, 2, 4, 8) or tp > A.gpus_per_node:
                continue
            if gpus % size:
                continue
            for ep in (1, 2, 4, 8, 16, 32, 64) if moe else (1,):
                if (gpus // size) % ep:
                    continue
                try:
                    for model in models:
                        model.check_layout(tp, pp, ep if model.is_moe else 1)
                except ValueError:
                    continue
                yield tp, pp, ep


def budget_bytes() -> float:
    return (A.gpu_memory_gib - A.reserve_gib) * GIB


def recommend(memory_of, cfg: ModelConfig, gpus: int, teacher: Optional[ModelConfig] = None):
    """The smallest TP x PP (then the smallest PP, then the smallest EP) whose worst rank fits
    the budget; ``memory_of(tp, pp, dp, ep)``."""
    for tp, pp, ep in candidate_layouts(cfg, gpus, teacher):
        memory = memory_of(tp, pp, gpus // (tp * pp), ep)
        if memory.total <= budget_bytes():
            return tp, pp, ep, memory
    raise ValueError(f"no layout fits {gpus} GPUs")


def layout_text(tp: int, pp: int, dp: int, ep: int, moe: bool) -> str:
    return f"{tp}×{pp}×{dp}" + (f", EP {ep}" if moe else "")


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """2 x (every matmul weight a token passes through: the output layer, and of a MoE layer
    the router, its top-k experts and the shared expert) + causal attention (2 * s * q per
    layer)."""
    p = parts(cfg)
    matmul = p["output"] or p["embedding"]
    for moe in cfg.moe_layers():
        matmul += (p["moe_split"] + (cfg.num_moe_experts * cfg.hidden_size)
                   + cfg.moe_router_topk * p["expert"] if moe else p["layer_split"])
    attention = cfg.num_layers * 2 * A.seq_length * cfg.num_attention_heads * cfg.kv_channels
    return 2.0 * matmul + attention


def seconds(flops: float, gpus: int, mfu: float) -> float:
    return flops / (gpus * A.peak_tflops * 1e12 * mfu)


def duration(value: float) -> str:
    if value < 3600:
        return f"{value / 60:.0f} min"
    if value < 3 * 86400:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} days"


# ----------------------------------------------------------------------------- the plans
@dataclass
class Row:
    stage: str
    models: str
    gpus: int
    layout: str
    memory: str
    total_gib: float
    tokens: str
    time: str


def importance_row(name: str, gpus: int) -> Row:
    cfg = MODELS[name]
    tp, pp, ep, memory = recommend(lambda tp, pp, dp, ep: importance_memory(cfg, tp, pp, ep),
                                   cfg, gpus)
    passes = A.calib_samples + cfg.num_layers * A.depth_samples
    tokens = passes * A.seq_length
    time = seconds(tokens * forward_flops_per_token(cfg), gpus, A.mfu_forward)
    layout = layout_text(tp, pp, gpus // (tp * pp), ep, cfg.is_moe)
    return Row("importance", name, gpus, layout, memory.describe(),
               memory.total / GIB, f"{tokens / 1e6:.0f}M fwd", duration(time))


def prune_row(source: str, target: str) -> Row:
    src, dst = MODELS[source], MODELS[target]
    host = prune_host_memory(src)
    moved = 2.0 * (count_parameters(src)["total"] + count_parameters(dst)["total"])
    time = 2 * moved / (A.checkpoint_io_gbps * 1e9)
    return Row("prune", f"{source} → {target}", 1, "1 process", "host RAM (2 largest slices)",
               host / GIB, "-", duration(time))


def training_row(stage: str, student: str, teacher: Optional[str], gpus: int,
                 tokens: float) -> Row:
    cfg = MODELS[student]
    tcfg = MODELS[teacher] if teacher else None
    tp, pp, ep, memory = recommend(
        lambda tp, pp, dp, ep: training_memory(cfg, tp, pp, dp, tcfg, ep), cfg, gpus, tcfg)
    flops = 3 * forward_flops_per_token(cfg) + (forward_flops_per_token(tcfg) if tcfg else 0)
    time = seconds(tokens * flops, gpus, A.mfu_train)
    models = f"{student} ← {teacher}" if teacher else student
    moe = cfg.is_moe or (tcfg is not None and tcfg.is_moe)
    layout = layout_text(tp, pp, gpus // (tp * pp), ep, moe)
    return Row(stage, models, gpus, layout, memory.describe(),
               memory.total / GIB, f"{tokens / 1e9:.0f}B", duration(time))


def plans() -> Dict[str, List[Row]]:
    node, big = A.gpus_per_node, 16 * A.gpus_per_node
    return {
        "Llama-3.1-8B → 4B (width and depth), one DGX A100 node (8 GPUs)": [
            training_row("correct-teacher", "Llama-3.1-8B", None, node, A.correction_tokens),
            importance_row("Llama-3.1-8B", node),
            prune_row("Llama-3.1-8B", "Llama-3.1-Minitron-4B-Width"),
            prune_row("Llama-3.1-8B", "Llama-3.1-Minitron-4B-Depth"),
            training_row("distill", "Llama-3.1-Minitron-4B-Width", "Llama-3.1-8B", node, 100e9),
            training_row("distill", "Llama-3.1-Minitron-4B-Depth", "Llama-3.1-8B", node, 100e9),
        ],
        "Nemotron-4 15B → 8B → 4B, 16 DGX A100 nodes (128 GPUs)": [
            training_row("correct-teacher", "Nemotron-4-15B", None, big, A.correction_tokens),
            importance_row("Nemotron-4-15B", node),
            prune_row("Nemotron-4-15B", "Minitron-8B"),
            training_row("distill", "Minitron-8B", "Nemotron-4-15B", big, 94e9),
            importance_row("Minitron-8B", node),
            prune_row("Minitron-8B", "Minitron-4B"),
            training_row("distill", "Minitron-4B", "Nemotron-4-15B", big, 94e9),
        ],
        f"Qwen3-30B-A3B → two thirds of its experts ({MOE_TARGET}), 4 DGX A100 nodes "
        "(32 GPUs)": [
            training_row("correct-teacher", "Qwen3-30B-A3B", None, 4 * node, A.correction_tokens),
            importance_row("Qwen3-30B-A3B", node),
            prune_row("Qwen3-30B-A3B", "Qwen3-30B-A3B-88E"),
            training_row("distill", "Qwen3-30B-A3B-88E", "Qwen3-30B-A3B", 4 * node, 100e9),
        ],
    }
