"""The command line end to end on a tiny model with a real tokenizer: importance → prune → eval,
in one process and on two ranks, plus one-line errors for bad input."""

import functools
import json
import os

import pytest
import torch

from conftest import tiny_text
from megatron_minitron.checkpoint import io
from megatron_minitron.cli import main as cli
from megatron_minitron.testing import save_tiny_checkpoint, spawn

SEQ = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("cli")
    ckpt = str(root / "model")
    spawn(functools.partial(save_tiny_checkpoint, vocab_size=320), 1, ckpt, tiny_tokenizer_dir)
    text = root / "corpus.txt"
    text.write_text(tiny_text(6000, seed=11))
    return root, ckpt, str(text)


def _importance_args(ckpt, text, output, *extra):
    return ["importance", "--load", ckpt, "--text-file", text, "--num-samples", "8",
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--output", output, *extra]


def test_importance_prune_eval(workspace, capsys):
    root, ckpt, text = workspace
    scores_path = str(root / "scores.pt")
    assert cli(_importance_args(ckpt, text, scores_path)) == 0
    scores = torch.load(scores_path, weights_only=False)
    assert scores["head"].shape == (4, 4) and scores["neuron"].shape == (4, 128)
    assert scores["channel"].shape == (64,) and set(scores["block_bi"]) == {1, 2, 3, 4}
    assert scores["meta"]["num_tokens"] == 8 * SEQ and len(scores["meta"]["data_fingerprint"]) == 16
    assert os.path.getsize(str(root / "scores.png")) > 10_000
    pruned = str(root / "pruned")
    assert cli(["prune", "--load", ckpt, "--scores", scores_path, "--target",
                "num_layers=3,ffn_hidden_size=64,num_attention_heads=2,num_query_groups=1",
                "--depth-metric", "bi", "--output", pruned]) == 0
    out = capsys.readouterr().out
    assert "pruned:" in out and "kept layers" in out
    assert io.load_config(pruned).ffn_hidden_size == 64
    assert io.tokenizer_dir(pruned) is not None  # the tokenizer travels with the checkpoint
    result = str(root / "eval.json")
    assert cli(["eval", "--load", pruned, "--text-file", text, "--seq-length", str(SEQ),
                "--json", result]) == 0
    numbers = json.loads(open(result).read())
    assert numbers["tokens"] > 1000 and numbers["ppl"] > 1


def _importance_at(ckpt, text, output, tp, pp):
    assert cli(_importance_args(ckpt, text, output, "--tp", str(tp), "--pp", str(pp))) == 0


def test_importance_cli_on_two_ranks_equals_one(workspace):
    root, ckpt, text = workspace
    one, two = str(root / "one.pt"), str(root / "two.pt")
    spawn(_importance_at, 1, ckpt, text, one, 1, 1)
    spawn(_importance_at, 2, ckpt, text, two, 1, 2)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    for key in ("head", "query_group", "neuron", "channel", "layer_bi", "layer_ppl"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-9)
    assert a["meta"]["data_fingerprint"] == b["meta"]["data_fingerprint"]


@pytest.mark.parametrize("change,message", [
    ({"--seq-length": "4096"}, "--seq-length 4096 is longer than the model's "
                               "max_position_embeddings 128"),
    ({"--seq-length": "-5"}, "--seq-length -5 must be >= 1"),
    ({"--num-samples": "5000"}, "calibration data has"),
    ({"--aggregation": "max,mean"}, "unknown batch aggregation 'max'"),
    ({"--text-file": "/nonexistent/file.txt"}, "--text-file /nonexistent/file.txt does not exist"),
])
def test_importance_bad_input_is_one_line(workspace, capsys, change, message):
    root, ckpt, text = workspace
    args = _importance_args(ckpt, text, str(root / "bad.pt"))
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(str(root / "bad.pt"))


def test_prune_with_a_non_scores_file_is_one_line(workspace, capsys):
    root, ckpt, text = workspace
    assert cli(["prune", "--load", ckpt, "--scores", text, "--target", "hidden_size=32",
                "--output", str(root / "bad_scores_prune")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--scores {text} is not a scores file" in err[0], err
    assert "Memo" not in err[0] and "pickle" not in err[0]


def test_prune_bad_target_is_one_line(workspace, capsys):
    root, ckpt, text = workspace
    scores = str(root / "scores_for_bad.pt")
    from megatron_minitron.importance import random_scores, save_scores

    save_scores(random_scores(io.load_config(ckpt)), scores)
    assert cli(["prune", "--load", ckpt, "--scores", scores, "--target", "hidden_size=128",
                "--output", str(root / "bad_prune")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "larger than the source's 64" in err[0]
    assert not os.path.exists(str(root / "bad_prune"))


def test_iterative_pruning_in_rounds(workspace):
    root, ckpt, text = workspace
    from megatron_minitron.importance import random_scores, save_scores
    from megatron_minitron.prune.iterative import round_targets

    source = io.load_config(ckpt)
    final = source.replace(num_layers=2, ffn_hidden_size=64, num_attention_heads=2,
                           num_query_groups=1)
    steps = round_targets(source, final, 2)
    assert steps[0] == {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 96,
                        "num_query_groups": 2, "num_attention_heads": 4}
    assert steps[-1]["num_layers"] == 2 and steps[-1]["num_attention_heads"] == 2
    scores = str(root / "scores_iter.pt")
    save_scores(random_scores(source), scores)
    out = str(root / "iterative")
    assert cli(["prune", "--load", ckpt, "--scores", scores, "--output", out,
                "--target", "num_layers=2,ffn_hidden_size=64,num_attention_heads=2,"
                "num_query_groups=1", "--iterations", "2", "--text-file", text,
                "--num-samples", "4", "--seq-length", str(SEQ)]) == 0
    assert io.load_config(out).ffn_hidden_size == 64 and io.load_config(out).num_layers == 2
    round1 = io.read_checkpoint_info(str(root / "iterative.rounds" / "round1"))
    assert round1["model"]["num_layers"] == 3
    final_info = io.read_checkpoint_info(out)
    assert final_info["meta"]["pruned_from"].endswith("round1")


def test_random_init_writes_the_target_afresh(workspace, capsys):
    root, ckpt, text = workspace
    out = str(root / "random_init")
    assert cli(["prune", "--load", ckpt, "--random-init", "--target",
                "ffn_hidden_size=64,num_layers=1", "--output", out]) == 0
    source, fresh = io.load_config(ckpt), io.load_config(out)
    assert (fresh.ffn_hidden_size, fresh.num_layers) == (64, 1)
    assert fresh.replace(extra={}) == source.replace(ffn_hidden_size=64, num_layers=1)
    assert io.read_checkpoint_info(out)["meta"]["random_init"] is True
    assert os.path.isdir(os.path.join(out, "tokenizer"))
    assert cli(["eval", "--load", out, "--text-file", text, "--seq-length", str(SEQ)]) == 0
    capsys.readouterr()
    assert cli(["prune", "--load", ckpt, "--target", "ffn_hidden_size=64",
                "--output", str(root / "no_scores")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scores is required" in err[0], err
