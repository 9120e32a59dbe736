"""``minitron search``: the exact budget filter, one-line errors before any work, and a real
search (prune → distill → rank) on tiny models at DP=2 whose zero-shot losses equal a
single-rank ``--no-retrain`` search of the same space."""

import csv
import itertools
import json
import os

import pytest
import torch

from megatron_minitron import cli
from megatron_minitron.config import count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.prune.plan import TARGET_KEYS, target_config
from megatron_minitron.search import enumerate_candidates, load_space, parse_params
from megatron_minitron.testing import spawn, tiny_config
from test_distill import distill_models  # noqa: F401 - shared fixture

SPACE = {"num_layers": [2, 3], "hidden_size": [32, 48], "ffn_hidden_size": [64, 96],
         "num_attention_heads": [2, 4]}


def test_parse_params():
    assert parse_params("70M") == 70_000_000
    assert parse_params("4.5B") == 4_500_000_000
    assert parse_params("135000000") == 135_000_000
    assert parse_params("12k") == 12_000
    with pytest.raises(UsageError, match="--params '70 MB'"):
        parse_params("70 MB")


def test_candidates_are_every_buildable_architecture_in_budget():
    source = tiny_config()
    budget, tolerance = 60_000, 0.15
    candidates, stats = enumerate_candidates(source, SPACE, budget, tolerance)
    expected = set()
    for values in itertools.product(*SPACE.values()):
        target = dict(zip(SPACE, values))
        try:
            cfg = target_config(source, target)
        except UsageError:
            continue
        if abs(count_parameters(cfg)["total"] - budget) <= tolerance * budget:
            expected.add(tuple(getattr(cfg, k) for k in TARGET_KEYS))
    assert 2 <= len(candidates) < stats["combinations"]
    assert {tuple(c.architecture().values()) for c in candidates} == expected
    for candidate in candidates:
        assert candidate.params == count_parameters(candidate.config)["total"]
    assert [c.params for c in candidates] == sorted(c.params for c in candidates)


def test_bad_spaces_fail_in_one_line(tmp_path):
    source = tiny_config()
    cases = {"unknown": ({"width": [3]}, "unknown field 'width'"),
             "larger": ({"hidden_size": [128]}, "hidden_size 128 is outside 1..64"),
             "type": ({"num_layers": ["two"]}, "must be a list of integers")}
    for name, (space, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(space))
        with pytest.raises(UsageError, match=message) as err:
            load_space(str(path), source)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"), source)


def _write_inputs(root, tmp_path):
    from megatron_minitron.importance.estimate import random_scores
    from megatron_minitron.checkpoint.io import load_config

    teacher = os.path.join(root, "teacher")
    scores = str(tmp_path / "scores.pt")
    torch.save(random_scores(load_config(teacher), seed=3), scores)
    space = tmp_path / "space.yaml"
    space.write_text("\n".join(f"{k}: {v}" for k, v in SPACE.items()) + "\n")
    return teacher, scores, str(space)


def _search_args(distill_models, tmp_path, output, *extra):
    root, text = distill_models
    teacher, scores, space = _write_inputs(root, tmp_path)
    return ["search", "--load", teacher, "--scores", scores, "--params", "59k",
            "--tolerance", "0.05", "--space", space, "--text-file", text, "--seq-length", "16",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-samples", "8",
            "--lr", "2e-3", "--output", output, *extra]


def test_bad_requests_fail_before_any_work(distill_models, tmp_path, capsys):
    base = str(tmp_path / "s")
    cases = [(("--params", "1k"), "no architecture of --space"),
             (("--max-candidates", "1", "--retrain-tokens", "64"), "more than --max-candidates 1"),
             ((), "--retrain-tokens is required")]
    for extra, message in cases:
        args = _search_args(distill_models, tmp_path, base, *extra)
        if "--params" in extra:
            args[args.index("--params") + 1] = extra[1]
            extra = extra[2:] + ("--no-retrain",)
        assert cli.main(args + list(extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(base)


def _run(argv):
    assert cli.main(argv) == 0


def _rows(output):
    with open(os.path.join(output, "search.csv")) as handle:
        return list(csv.DictReader(handle))


def test_search_retrains_ranks_and_resumes(distill_models, tmp_path):
    output, plain = str(tmp_path / "search"), str(tmp_path / "zero_shot")
    argv = _search_args(distill_models, tmp_path, output, "--retrain-tokens", "192")
    spawn(_run, 2, argv)  # DP=2: rank 0 prunes, both ranks retrain
    summary = json.load(open(os.path.join(output, "search.json")))
    rows = _rows(output)
    assert len(rows) == len(summary["candidates"]) == 3
    losses = [float(r["retrained_loss"]) for r in rows]
    assert losses == sorted(losses) and [int(r["rank"]) for r in rows] == list(
        range(1, len(rows) + 1))
    assert sorted(int(r["zero_shot_rank"]) for r in rows) == list(range(1, len(rows) + 1))
    for row in summary["candidates"]:
        assert row["retrained"]["kd"] < row["zero_shot"]["kd"]  # distillation moved it
        assert row["retrain_tokens"] == 192 and len(row["train_curve"]) == 3
    best = os.path.join(output, "best")
    assert os.path.islink(best) and os.path.realpath(best) == os.path.realpath(
        os.path.join(output, "candidates", rows[0]["name"], "retrain", "final"))
    info = json.load(open(os.path.join(best, "minitron_config.json")))
    assert {k: info["model"][k] for k in TARGET_KEYS} == {
        k: int(rows[0][k]) for k in TARGET_KEYS}
    assert os.path.getsize(os.path.join(output, "search.png")) > 10_000
    assert rows[0]["name"] in open(os.path.join(output, "search.md")).read()

    results = [os.path.join(output, "candidates", r["name"], "result.json") for r in rows]
    stamps = [os.path.getmtime(p) for p in results]
    spawn(_run, 1, argv)  # a re-run skips every finished candidate (here on one rank)
    assert [os.path.getmtime(p) for p in results] == stamps
    assert _rows(output) == rows

    spawn(_run, 1, _search_args(distill_models, tmp_path, plain, "--no-retrain"))
    zero = {r["name"]: float(r["zero_shot_loss"]) for r in _rows(plain)}
    assert zero == pytest.approx({r["name"]: float(r["zero_shot_loss"]) for r in rows},
                                 rel=1e-5)
    assert os.path.realpath(os.path.join(plain, "best")).endswith("pruned")

    changed = _search_args(distill_models, tmp_path, output, "--retrain-tokens", "128")
    assert cli.main(changed) == 2  # the output holds a search with other settings


def test_a_search_written_with_the_former_switch_resumes_with_its_mode(distill_models, tmp_path):
    """search_config.json of a search run when head add-back was on/off (a boolean) matches
    the mode it meant (output/none) and no other."""
    from megatron_minitron.commands.search import _settings
    from megatron_minitron.distill.config import TrainConfig
    from megatron_minitron.search.runner import CONFIG_FILE, Search

    output = str(tmp_path / "s")

    def search(*extra):
        args = cli.build_parser(only="search").parse_args(
            _search_args(distill_models, tmp_path, output, "--no-retrain", *extra))
        return Search(_settings(args), TrainConfig.from_args(args))

    from megatron_minitron.prune.plan import DEFAULT_HEAD_ADD_BACK

    identity = search().identity()
    assert identity["head_add_back"] == DEFAULT_HEAD_ADD_BACK
    for former, same, other in ((True, "output", "query"), (False, "none", "output")):
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, CONFIG_FILE), "w") as handle:
            json.dump(dict(identity, head_add_back=former), handle)
        search("--head-add-back", same)
        with pytest.raises(UsageError, match=r"other settings \(head_add_back\)"):
            search("--head-add-back", other)
