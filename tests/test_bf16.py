"""bf16 on CPU, the stand-in for the GPU's default precision: importance, prune, eval and
distillation steps of a tiny model of realistic weight scale run in bf16 through the GPU check's
own ``--tiny`` path, and agree with fp32 (Spearman >= 0.99 per score kind, eval loss within
0.02, first distillation step's loss within 2%)."""

import json

import pytest
import torch

from megatron_minitron import gpu_check
from megatron_minitron.testing.ranks import SCORE_KINDS, spearman


def test_spearman_matches_its_definition():
    a = torch.tensor([0.1, 0.4, 0.3, 0.9, 0.5])
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([0.1, 0.3, 0.4, 0.9, 0.5])  # one adjacent swap: 1 - 6*2/(5*24)
    assert spearman(a, b) == pytest.approx(0.9)
    ties = torch.tensor([1.0, 1.0, 2.0, 3.0])  # average ranks 0.5, 0.5, 2, 3
    assert spearman(ties, torch.tensor([0.0, 1.0, 2.0, 3.0])) == pytest.approx(0.9486832980505138)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_check") / "tiny.json"
    assert gpu_check.main(["--tiny", "--steps", "3", "--output", str(output)]) == 0
    return json.loads(output.read_text())


def test_importance_rankings_agree_with_fp32(tiny_result):
    tiny = tiny_result["models"]["tiny"]
    assert tiny["importance_dtype"] == "bfloat16"
    assert set(tiny["spearman"]) == set(SCORE_KINDS)
    for kind, rho in tiny["spearman"].items():
        assert rho >= 0.99, kind


def test_eval_and_distillation_losses_agree_with_fp32(tiny_result):
    tiny = tiny_result["models"]["tiny"]
    assert abs(tiny["eval_loss"]["diff"]) <= 0.02
    assert tiny["eval_loss"]["device"] > 1.0  # a real loss, not a degenerate one
    distill = tiny["distill"]
    assert distill["dtype"] == "bfloat16" and distill["steps"] == 3
    assert distill["first_loss_fp32"] > 0.01
    assert distill["first_loss_rel_diff"] <= 0.02
    assert distill["tokens_per_s"] > 0 and 0 < distill["mfu"] < 1
    pruned = tiny["pruned_eval_loss"]
    assert pruned["from_device_scores"] == pytest.approx(pruned["from_cpu_scores"], abs=0.02)
    assert tiny_result["device"].startswith("cpu") and all(tiny["passed"].values())
