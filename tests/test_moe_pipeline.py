"""A Qwen3-MoE-shaped model (random weights, the published config.json fields shrunk in width and
depth) through the whole command line: import-hf → importance → prune (experts and expert
width) → distill → export-hf, and the exported model gives our logits in transformers."""

import json
import os
import shutil

import pytest
import torch

from conftest import tiny_text
from megatron_minitron.checkpoint import io
from test_hf import _load_hf, _run_cli
from test_hf_moe import FAMILIES, _make_family

transformers = pytest.importorskip("transformers")

SEQ = 32


def _state(path):
    from megatron_minitron import parallel

    with parallel.parallel_context(1, 1):
        model, _ = io.load_checkpoint(path)
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if torch.is_tensor(v)}


def test_import_importance_prune_distill_export(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, teacher = str(tmp_path / "hf"), str(tmp_path / "teacher")
    # Qwen3-30B-A3B's fields with 3 layers (the middle one dense through mlp_only_layers) and
    # a vocabulary as large as the test tokenizer's
    _make_family(hf, dict(FAMILIES["qwen3-moe"], vocab_size=320, num_hidden_layers=3,
                          mlp_only_layers=[1]), seed=3)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), hf)
    text = tmp_path / "corpus.txt"
    text.write_text(tiny_text(6000, seed=5))
    assert _run_cli(["import-hf", "--hf-path", hf, "--output", teacher]) == 0
    source = io.load_config(teacher)
    assert source.num_moe_experts == 16 and source.moe_layers() == [True, False, True]

    scores = str(tmp_path / "scores.pt")
    assert _run_cli(["importance", "--load", teacher, "--text-file", str(text),
                     "--num-samples", "8", "--seq-length", str(SEQ), "--micro-batch-size", "2",
                     "--output", scores]) == 0
    found = torch.load(scores, weights_only=False)
    assert found["expert"].shape == (3, 16) and found["expert_neuron"].shape == (3, 16, 24)
    assert float(found["expert_tokens"][1].sum()) == 0  # the dense layer routes nothing
    # every token of every sample went to moe_router_topk experts in each MoE layer
    assert float(found["expert_tokens"][0].sum()) == 8 * SEQ * source.moe_router_topk

    student = str(tmp_path / "student")
    assert _run_cli(["prune", "--load", teacher, "--scores", scores, "--target",
                     "num_moe_experts=12,moe_ffn_hidden_size=8", "--output", student]) == 0
    pruned = io.load_config(student)
    assert (pruned.num_moe_experts, pruned.moe_ffn_hidden_size) == (12, 8)

    distilled = str(tmp_path / "distilled")
    assert _run_cli(["distill", "--teacher", teacher, "--student", student,
                     "--text-file", str(text), "--seq-length", str(SEQ),
                     "--train-tokens", str(6 * 4 * SEQ), "--global-batch-size", "4",
                     "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-steps", "1",
                     "--output", distilled]) == 0
    with open(os.path.join(distilled, "log.jsonl")) as handle:
        log = [json.loads(line) for line in handle]
    # a random teacher's pruned student starts close to it: the run is checked for its steps
    # and for having moved the weights, not for a falling loss
    assert len(log) == 6 and all(0 <= record["kd"] < 1 for record in log)
    assert all(record["moe_aux_loss"] > 0 for record in log)  # router_aux_loss_coef 0.001

    exported = str(tmp_path / "exported")
    final = os.path.join(distilled, "final")
    before, after = _state(student), _state(final)
    assert any(not torch.equal(before[key], after[key]) for key in before
               if ".experts." in key)  # the experts trained
    assert _run_cli(["export-hf", "--load", final, "--output", exported]) == 0
    model = _load_hf(exported)
    assert model.config.architectures == ["Qwen3MoeForCausalLM"]
    assert model.config.num_experts == 12 and model.config.moe_intermediate_size == 8
    tokens = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(0))
    from test_hf import _mcore_logits_tp1

    with torch.no_grad():
        theirs = model(tokens).logits
    torch.testing.assert_close(_mcore_logits_tp1(final, tokens), theirs, rtol=0, atol=1e-4)
