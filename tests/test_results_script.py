"""scripts/results.py builds a valid recipe whose compared runs share one token budget and whose
width and depth students have (nearly) the same parameter count."""

import argparse
import os
import sys

import yaml

from megatron_minitron.config import count_parameters
from megatron_minitron.prune.plan import target_config
from megatron_minitron.recipe import load_recipe, parse_step
from megatron_minitron.testing import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import results  # noqa: E402

SMOLLM2 = tiny_config(num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                      num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def _args(**overrides):
    values = dict(tokens=8192, search_tokens=4096, search_params="67.5M", seq_length=256,
                  calib_samples=64, depth_samples=16, eval_samples=32, limit=50)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_recipe_is_valid_and_fair(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    work = str(tmp_path / "work")
    recipe = results.build_recipe(work, str(tmp_path / "teacher"), str(docs), _args())
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(str(path))  # every step parsed by the real CLI parsers
    steps = {step.name: step for step in loaded.steps}
    trained = [steps[name] for name, *_ in results.TRAINED] + [steps["teacher_correction"]]
    assert {parse_step(step).train_tokens for step in trained} == {8192}
    assert parse_step(steps["train_width_ce"]).ce_only
    assert parse_step(steps["distill_width_corrected"]).teacher.endswith(
        os.path.join("teacher_correction", "final"))
    assert parse_step(steps["prune_width"]).head_add_back == "none"
    assert parse_step(steps["prune_width_addback"]).head_add_back == "output"
    width = count_parameters(target_config(SMOLLM2, results.WIDTH))["total"]
    depth = count_parameters(target_config(SMOLLM2, results.DEPTH))["total"]
    assert abs(width - depth) / width < 0.01
    assert abs(width - 67_558_272) < 1  # the 67.6M of the README's table
    evaluated = {step.name for step in loaded.steps if step.stage == "eval"}
    assert {f"eval_{name}" for name, *_ in results.TRAINED} <= evaluated
