"""Scale-out plan: exact parameter counts, shards that add up, minimal layouts, doc up to date.

    python -m pytest -q tests/test_scaling.py
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from megatron_minitron.config import ModelConfig, count_parameters

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("scaling_plan", ROOT / "scripts" / "scaling_plan.py")
plan = importlib.util.module_from_spec(SPEC)
sys.modules["scaling_plan"] = plan  # dataclasses look their module up
SPEC.loader.exec_module(plan)

# The papers' architectures: (layers, hidden, heads, groups, MLP, vocab, gated, published size)
ARCHITECTURES = {
    "Llama-3.1-8B": (32, 4096, 32, 8, 14336, 128256, True, 8.0e9),
    "Llama-3.1-Minitron-4B-Width": (32, 3072, 32, 8, 9216, 128256, True, 4.5e9),
    "Llama-3.1-Minitron-4B-Depth": (16, 4096, 32, 8, 14336, 128256, True, 4.5e9),
    "Nemotron-4-15B": (32, 6144, 48, 8, 24576, 256000, False, 15.6e9),
    "Minitron-8B": (32, 4096, 48, 8, 16384, 256000, False, 8.3e9),
    "Minitron-4B": (32, 3072, 24, 8, 9216, 256000, False, 4.2e9),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_models_are_the_papers_architectures(name):
    layers, hidden, heads, groups, mlp, vocab, gated, published = ARCHITECTURES[name]
    cfg = plan.MODELS[name]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.ffn_hidden_size, cfg.vocab_size, cfg.gated) == (layers, hidden, heads, groups,
                                                                 mlp, vocab, gated)
    assert cfg.kv_channels == 128 and not cfg.tie_word_embeddings
    # independent count: untied embeddings, GQA attention, 2 or 3 MLP matrices, norms
    q, kv = heads * 128, groups * 128
    norm = hidden if cfg.normalization == "RMSNorm" else 2 * hidden
    per_layer = hidden * (q + 2 * kv) + q * hidden + (3 if gated else 2) * hidden * mlp + 2 * norm
    expected = 2 * vocab * hidden + layers * per_layer + norm
    assert count_parameters(cfg)["total"] == expected
    assert abs(expected / published - 1) < 0.02, expected


CONFIGS = [
    plan.MODELS["Llama-3.1-8B"],
    plan.MODELS["Minitron-8B"],
    ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                num_query_groups=4, vocab_size=256, tie_word_embeddings=True),
    ModelConfig(num_layers=8, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                vocab_size=512, normalization="LayerNorm", activation="gelu",
                add_bias_linear=True, tie_word_embeddings=False),
    ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=64, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, add_qkv_bias=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 4), (4, 2)])
def test_rank_shards_add_up_to_count_parameters(cfg, tp, pp):
    parts = plan.parts(cfg)  # asserts its own sum against count_parameters
    held = tp * sum(plan.stage_params(cfg, tp, pp, stage) for stage in range(pp))
    replicated = cfg.num_layers * parts["layer_replicated"] + parts["final_norm"]
    bias_replicated = 2 * cfg.hidden_size * cfg.num_layers if cfg.add_bias_linear else 0
    assert replicated >= bias_replicated
    tied_copy = parts["embedding"] if cfg.tie_word_embeddings and pp > 1 else 0
    assert held - (tp - 1) * replicated - tied_copy == count_parameters(cfg)["total"]


def test_training_memory_components():
    student, teacher = plan.MODELS["Llama-3.1-Minitron-4B-Width"], plan.MODELS["Llama-3.1-8B"]
    memory = dict(plan.training_memory(student, 1, 1, 8, teacher).items)
    total = count_parameters(student)["total"]
    assert memory["weights+grads"] == 6 * total
    assert memory["optimizer"] == 12 * total / 8
    assert memory["teacher"] == 2 * count_parameters(teacher)["total"]
    assert memory["logits"] == 9 * plan.A.seq_length * student.vocab_size
    # more data parallel ranks shard the optimizer further; more TP shrinks everything
    assert dict(plan.training_memory(student, 1, 1, 64, teacher).items)["optimizer"] < \
        memory["optimizer"]
    assert plan.training_memory(student, 2, 1, 4, teacher).total < \
        plan.training_memory(student, 1, 1, 8, teacher).total
    # with PP the first stage holds PP micro-batches of its layers: all layers' activations
    first = dict(plan.training_memory(teacher, 1, 4, 2).items)["activations"]
    assert first == dict(plan.training_memory(teacher, 1, 1, 8).items)["activations"]


def test_recommended_layouts_fit_and_are_minimal():
    budget = plan.budget_bytes()
    rows = [row for rows in plan.plans().values() for row in rows if row.stage != "prune"]
    assert len(rows) == 12
    for row in rows:
        grid, _, expert = row.layout.partition(", EP ")
        tp, pp, dp = (int(value) for value in grid.split("×"))
        ep = int(expert or 1)
        assert tp * pp * dp == row.gpus and row.total_gib * plan.GIB <= budget and dp % ep == 0
        student = row.models.split(" ← ")[0]
        teacher = row.models.split(" ← ")[1] if "←" in row.models else None
        cfg, tcfg = plan.MODELS[student], plan.MODELS[teacher] if teacher else None
        for ctp, cpp, cep in plan.candidate_layouts(cfg, row.gpus, tcfg):
            if (ctp, cpp, cep) == (tp, pp, ep):
                break
            cdp = row.gpus // (ctp * cpp)
            smaller = (plan.importance_memory(cfg, ctp, cpp, cep) if row.stage == "importance"
                       else plan.training_memory(cfg, ctp, cpp, cdp, tcfg, cep))
            assert smaller.total > budget, (row, ctp, cpp, cep)
        else:
            pytest.fail(f"{row.layout} is not a candidate")


def test_qwen3_moe_is_the_published_model():
    cfg = plan.MODELS["Qwen3-30B-A3B"]
    counts = count_parameters(cfg)
    # independent count: 48 MoE layers of GQA attention with per-head q/k norms, a router and
    # 128 SwiGLU experts; untied embeddings
    h, q, kv = 2048, 32 * 128, 4 * 128
    attention = h * (q + 2 * kv) + q * h + 2 * 128 + 2 * h
    expert = 3 * h * 768
    total = 2 * 151936 * h + 48 * (attention + 128 * h + 128 * expert) + h
    assert counts["total"] == total and abs(total / 30.5e9 - 1) < 0.01  # "30.5B"
    assert counts["active"] == total - 48 * 120 * expert and abs(counts["active"] / 3.3e9 - 1) < 0.02
    pruned = plan.MODELS["Qwen3-30B-A3B-88E"]
    assert count_parameters(pruned)["active"] == counts["active"] - 48 * 40 * h
    assert pruned.num_moe_experts == 88 and 88 % 8 == 0


MOE_CONFIGS = [
    plan.MODELS["Qwen3-30B-A3B"],
    ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, tie_word_embeddings=True, num_moe_experts=8,
                moe_router_topk=2, moe_ffn_hidden_size=32,
                moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
                moe_layer_freq=[1, 0, 1, 1]),
]


@pytest.mark.parametrize("cfg", MOE_CONFIGS, ids=range(len(MOE_CONFIGS)))
@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (1, 1, 8), (2, 2, 4), (1, 4, 2)])
def test_moe_rank_shards_add_up_to_count_parameters(cfg, tp, pp, ep):
    parts = plan.parts(cfg)
    held = tp * ep * sum(plan.stage_params(cfg, tp, pp, stage, ep) for stage in range(pp))
    experts = tp * ep * sum(plan.stage_params(cfg, tp, pp, stage, ep, experts_only=True)
                            for stage in range(pp))
    moe = cfg.moe_layers()
    routed = sum(moe) * cfg.num_moe_experts * parts["expert"]
    assert experts == routed  # every expert once over the EP x TP grid
    # everything else is held by each of the ep copies; TP-replicated parts tp times
    replicated = (sum(moe) * parts["moe_replicated"]
                  + (len(moe) - sum(moe)) * parts["layer_replicated"] + parts["final_norm"])
    tied_copy = parts["embedding"] if cfg.tie_word_embeddings and pp > 1 else 0
    rest = held - experts
    assert rest == ep * (count_parameters(cfg)["total"] - routed + tied_copy
                         + (tp - 1) * replicated)


def test_expert_parallelism_shrinks_expert_memory():
    cfg = plan.MODELS["Qwen3-30B-A3B"]
    one = dict(plan.training_memory(cfg, 1, 1, 32, None, 1).items)
    eight = dict(plan.training_memory(cfg, 1, 1, 32, None, 8).items)
    assert eight["weights+grads"] < one["weights+grads"] / 4
    # the experts' optimizer state is sharded over DP/EP ranks: it does not shrink with EP
    experts = plan.stage_params(cfg, 1, 1, 0, 1, experts_only=True)
    assert eight["optimizer"] == pytest.approx(one["optimizer"], rel=1e-9)
    assert one["optimizer"] == pytest.approx(
        12 * (plan.stage_params(cfg, 1, 1, 0) - experts) / 32 + 12 * experts / 32)


def test_doc_states_the_exact_counts_and_is_up_to_date():
    text = (ROOT / "docs" / "SCALING.md").read_text()
    assert text == plan.generate(), "run python scripts/scaling_plan.py"
    assert plan.main(["--check"]) == 0
    for name, cfg in plan.MODELS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {count_parameters(cfg)['total']:,} (" in row
    assert re.search(r"312 TFLOP/s.*40%", text) and "94B" in text and "100B" in text
    assert "No GPU measurement" in text and "squared-ReLU" in text
