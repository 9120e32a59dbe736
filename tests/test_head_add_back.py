"""Head add-back modes: ``query`` adds each pruned partner's residual into the kept heads' query
rows of the fused QKV, ``output`` into their output-projection columns (the former switch's
form), ``none`` only selects; every entry point (API, CLI, recipe, search settings) takes them.

Hand computation on a model of 8 heads in 2 query groups (head dim 8, so a group's block of the
fused QKV is 48 rows: q0 q1 q2 q3 k v of 8 rows each) pruned to 2 heads per group, with head
scores chosen so the pairs are known: group 0 scores [.1, .9, .5, .3] rank heads 1, 2, 3, 0
and keep 1 and 2; kept rank 1 meets rank 2K − 1 + 1 = 4 (head 0), rank 2 meets rank 3 (head 3).
Group 1 scores [.8, .2, .4, .6] keep 4 and 7, pairs (4, 5) and (7, 6).
"""

import os

import pytest
import torch
import yaml

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.checkpoint.stream import CheckpointReader
from megatron_minitron.cli import build_parser
from megatron_minitron.cli import main as cli
from megatron_minitron.errors import UsageError
from megatron_minitron.importance import random_scores
from megatron_minitron.prune import plan_pruning, prune_checkpoint
from megatron_minitron.prune.plan import DEFAULT_HEAD_ADD_BACK, head_add_back_mode
from megatron_minitron.recipe import load_recipe, parse_step
from megatron_minitron.search import SearchSettings
from megatron_minitron.testing import tiny_config

TARGET = {"num_attention_heads": 4, "num_query_groups": 2}
PAIRS = [(1, 0), (2, 3), (4, 5), (7, 6)]  # (kept, pruned), by hand from HEAD_SCORES
HEAD_SCORES = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.4, 0.6]
QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
PROJ = "decoder.layers.self_attention.linear_proj.weight"


def q_rows(head):
    """Source rows of query head ``head``: group block of 48 rows, 8 rows per query head."""
    group, local = divmod(head, 4)
    return slice(48 * group + 8 * local, 48 * group + 8 * local + 8)


KV_ROWS = [slice(32, 48), slice(80, 96)]  # k and v of group 0 and of group 1
PRUNED_Q_ROWS = [slice(0, 16), slice(32, 48)]  # in the pruned QKV: [q q k v] per group
PRUNED_KV_ROWS = [slice(16, 32), slice(48, 64)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-layer source with non-zero QKV biases (mcore starts them at zero) and hand scores."""
    root = tmp_path_factory.mktemp("head_add_back")
    cfg = tiny_config(num_layers=2, num_attention_heads=8, num_query_groups=2, hidden_size=64,
                      add_qkv_bias=True)
    assert cfg.kv_channels == 8
    with parallel.parallel_context(1, 1):
        model = adapter.build_gpt_model(cfg)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in adapter.decoder_layers(model):
                adapter.attention_qkv(layer).bias.normal_(generator=generator)
        io.save_checkpoint(model, cfg, str(root / "source"))
    scores = random_scores(cfg, seed=1)
    scores["head"] = torch.tensor([HEAD_SCORES] * cfg.num_layers, dtype=torch.float64)
    scores_path = str(root / "scores.pt")
    torch.save(scores, scores_path)
    return root, str(root / "source"), scores, scores_path


def _tensors(path):
    reader = CheckpointReader(path)
    return reader.read(list(reader.layer_keys()) + list(reader.global_keys()))


@pytest.fixture(scope="module")
def pruned(source):
    """{mode: pruned tensors} and the source tensors."""
    root, ckpt, scores, _ = source
    out = {}
    for mode in ("none", "query", "output"):
        prune_checkpoint(ckpt, scores, TARGET, str(root / mode), head_add_back=mode)
        out[mode] = _tensors(str(root / mode))
    return out, _tensors(ckpt)


def test_plan_pairs_kept_and_pruned_heads_by_rank(source):
    _, ckpt, scores, _ = source
    cfg = io.load_config(ckpt)
    for mode in ("query", "output", True):
        plan = plan_pruning(cfg, scores, TARGET, head_add_back=mode)
        assert plan.head_add_back == head_add_back_mode(mode)
        for layer in plan.layers:
            assert layer.heads == [1, 2, 4, 7]
            assert sorted(layer.add_back) == PAIRS
    for mode in ("none", False):
        plan = plan_pruning(cfg, scores, TARGET, head_add_back=mode)
        assert plan.head_add_back == "none" and all(not layer.add_back for layer in plan.layers)


def _expected_qkv(source_qkv, add_back):
    """[layers, 64, ...]: per group [q_kept_a, q_kept_b, k, v], kept query rows added back."""
    blocks = []
    for (a, a_partner), (b, b_partner), kv in zip(PAIRS[0::2], PAIRS[1::2], KV_ROWS):
        for kept, partner in ((a, a_partner), (b, b_partner)):
            q = source_qkv[:, q_rows(kept)]
            blocks.append(q + (q - source_qkv[:, q_rows(partner)]) if add_back else q)
        blocks.append(source_qkv[:, kv])
    return torch.cat(blocks, dim=1)


def _expected_proj(source_proj, add_back):
    """[layers, h, 32]: kept heads' columns (8 each), in kept order 1, 2, 4, 7."""
    columns = []
    for kept, partner in PAIRS:
        w = source_proj[:, :, 8 * kept:8 * kept + 8]
        columns.append(w + (w - source_proj[:, :, 8 * partner:8 * partner + 8]) if add_back
                       else w)
    return torch.cat(columns, dim=2)


def test_query_mode_adds_back_into_kept_query_rows_only(pruned):
    out, src = pruned
    query, none = out["query"], out["none"]
    for key in (QKV, QKV_BIAS):
        torch.testing.assert_close(query[key], _expected_qkv(src[key], add_back=True))
        for rows in PRUNED_KV_ROWS:  # K/V untouched
            assert torch.equal(query[key][:, rows], none[key][:, rows])
        for rows in PRUNED_Q_ROWS:  # every kept query row changed
            assert not torch.isclose(query[key][:, rows], none[key][:, rows]).any()
    torch.testing.assert_close(query[PROJ], _expected_proj(src[PROJ], add_back=False))
    changed = sorted(k for k in query if not torch.equal(query[k], none[k]))
    assert changed == sorted([QKV, QKV_BIAS])


def test_output_mode_adds_back_into_kept_projection_columns_only(pruned):
    out, src = pruned
    output, none = out["output"], out["none"]
    torch.testing.assert_close(output[PROJ], _expected_proj(src[PROJ], add_back=True))
    changed = sorted(k for k in output if not torch.equal(output[k], none[k]))
    assert changed == [PROJ]


def test_none_mode_only_selects(pruned):
    out, src = pruned
    none = out["none"]
    for key in (QKV, QKV_BIAS):
        assert torch.equal(none[key], _expected_qkv(src[key], add_back=False))
    assert torch.equal(none[PROJ], _expected_proj(src[PROJ], add_back=False))


def test_booleans_are_the_former_switch(source, pruned):
    root, ckpt, scores, _ = source
    out, _ = pruned
    for value, mode in ((True, "output"), (False, "none")):
        path = str(root / f"bool_{value}")
        prune_checkpoint(ckpt, scores, TARGET, path, head_add_back=value)
        tensors = _tensors(path)
        assert all(torch.equal(tensors[k], out[mode][k]) for k in out[mode])
        assert io.read_checkpoint_info(path)["meta"]["head_add_back"] == mode


def test_unknown_mode_is_refused_before_any_work(source):
    root, ckpt, scores, _ = source
    out = str(root / "never")
    for value in ("foo", "Query", None, 1):
        with pytest.raises(UsageError, match="--head-add-back .* is unknown; use none, query, "
                                             "output"):
            prune_checkpoint(ckpt, scores, TARGET, out, head_add_back=value)
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("command", ["prune", "search"])
@pytest.mark.parametrize("argv,mode", [
    ([], DEFAULT_HEAD_ADD_BACK), (["--head-add-back"], "output"),
    (["--no-head-add-back"], "none"), (["--head-add-back", "none"], "none"),
    (["--head-add-back", "query"], "query"), (["--head-add-back", "output"], "output"),
    (["--no-head-add-back", "--head-add-back"], "output"),  # the last flag wins, as before
])
def test_flags_give_the_mode(command, argv, mode):
    base = ["--load", "x", "--output", "y"]
    if command == "search":
        base += ["--scores", "s", "--params", "1M", "--space", "s.yaml"]
    args = build_parser(only=command).parse_args([command, *base, *argv])
    assert head_add_back_mode(args.head_add_back) == mode


@pytest.mark.parametrize("argv,mode", [(["--head-add-back", "query"], "query"),
                                       (["--head-add-back"], "output"),
                                       (["--no-head-add-back"], "none")])
def test_prune_command_applies_the_mode(source, pruned, argv, mode):
    root, ckpt, _, scores_path = source
    out = str(root / ("cli_" + "_".join(argv).strip("-")))
    assert cli(["prune", "--load", ckpt, "--scores", scores_path, "--target",
                "num_attention_heads=4,num_query_groups=2", "--output", out, *argv]) == 0
    assert io.read_checkpoint_info(out)["meta"]["head_add_back"] == mode
    expected = pruned[0][mode]
    tensors = _tensors(out)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)


@pytest.mark.parametrize("command", ["prune", "search"])
def test_bad_mode_is_one_line_before_any_work(source, tmp_path, capsys, command):
    root, ckpt, _, scores_path = source
    out = str(tmp_path / "out")
    argv = [command, "--load", ckpt, "--scores", scores_path, "--output", out,
            "--head-add-back", "foo"]
    if command == "search":
        space = tmp_path / "space.yaml"
        space.write_text("num_attention_heads: [4]\n")
        argv += ["--params", "1M", "--space", str(space), "--no-retrain"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minitron {command}: error: --head-add-back 'foo' is unknown; use none, "
                   "query, output (a bare --head-add-back means output, --no-head-add-back "
                   "none)"], err
    assert not os.path.exists(out)


def test_recipe_values_become_modes(source, tmp_path, capsys):
    root, ckpt, _, scores_path = source
    values = {"off": False, "on": True, "query": "query", "none": "none", "default": None}
    steps = [{"stage": "prune", "name": name, "load": "@teacher", "scores": scores_path,
              "target": dict(TARGET), "head_add_back": value} for name, value in values.items()]
    path = tmp_path / "recipe.yaml"
    data = {"name": "t", "workdir": str(tmp_path / "work"), "teacher": ckpt, "steps": steps}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    parsed = {step.name: head_add_back_mode(parse_step(step).head_add_back)
              for step in load_recipe(str(path)).steps}
    assert parsed == {"off": "none", "on": "output", "query": "query", "none": "none",
                      "default": DEFAULT_HEAD_ADD_BACK}

    data["steps"] = steps[:1] + [dict(steps[1], name="bad", head_add_back="foo")]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert cli(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head-add-back 'foo' is unknown" in err[0], err
    assert not (tmp_path / "work").exists()


def test_search_settings_take_modes_and_booleans():
    def settings(value):
        return SearchSettings(load="l", scores="s", params=1, space="x", output="o",
                              head_add_back=value)

    assert SearchSettings(load="l", scores="s", params=1, space="x",
                          output="o").head_add_back == DEFAULT_HEAD_ADD_BACK
    assert [settings(v).head_add_back for v in (True, False, "query")] == \
        ["output", "none", "query"]
    with pytest.raises(UsageError, match="is unknown"):
        settings("foo")
