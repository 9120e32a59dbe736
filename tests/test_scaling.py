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
    assert len(rows) == 9
    for row in rows:
        tp, pp, dp = (int(value) for value in row.layout.split("×"))
        assert tp * pp * dp == row.gpus and row.total_gib * plan.GIB <= budget
        student = row.models.split(" ← ")[0]
        teacher = row.models.split(" ← ")[1] if "←" in row.models else None
        cfg, tcfg = plan.MODELS[student], plan.MODELS[teacher] if teacher else None
        for ctp, cpp in plan.candidate_layouts(cfg, row.gpus, tcfg):
            if (ctp, cpp) == (tp, pp):
                break
            cdp = row.gpus // (ctp * cpp)
            smaller = (plan.importance_memory(cfg, ctp, cpp) if row.stage == "importance"
                       else plan.training_memory(cfg, ctp, cpp, cdp, tcfg))
            assert smaller.total > budget, (row, ctp, cpp)
        else:
            pytest.fail(f"{row.layout} is not a candidate")


def test_doc_states_the_exact_counts_and_is_up_to_date():
    text = (ROOT / "docs" / "SCALING.md").read_text()
    assert text == plan.generate(), "run python scripts/scaling_plan.py"
    assert plan.main(["--check"]) == 0
    for name, cfg in plan.MODELS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {count_parameters(cfg)['total']:,} (" in row
    assert re.search(r"312 TFLOP/s.*40%", text) and "94B" in text and "100B" in text
    assert "No GPU measurement" in text and "squared-ReLU" in text
