"""Importance scores: equal to a plain re-implementation for all 9 aggregations, and identical at
every TP × PP × DP layout."""

import itertools
import math

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint.io import load_checkpoint, save_checkpoint
from megatron_minitron.errors import UsageError
from megatron_minitron.importance import ImportanceConfig, estimate_importance
from megatron_minitron.importance.aggregation import REDUCTIONS, Aggregation
from megatron_minitron.importance.collect import FiniteFlags, NonFiniteActivation
from megatron_minitron.testing import spawn, tiny_config
from plain_llama import plain_forward, plain_scores

SAMPLES, SEQ = 8, 16


def _samples():
    return torch.randint(0, 256, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(1))


def _micro_batches(samples, dp_rank=0, dp_size=1, mbs=2):
    mine = samples[dp_rank::dp_size]
    return [{"tokens": mine[i:i + mbs, :-1], "labels": mine[i:i + mbs, 1:]}
            for i in range(0, mine.shape[0], mbs)]


@pytest.fixture(scope="module")
def tiny_model():
    parallel.initialize(1, 1)
    cfg = tiny_config()
    model = adapter.build_gpt_model(cfg)
    yield model, cfg
    parallel.teardown()


def _close(actual, expected, rtol):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual - expected).abs() <= rtol * scale).all(), (actual - expected).abs().max() / scale


@pytest.mark.parametrize("batch_how,seq_how", list(itertools.product(REDUCTIONS, REDUCTIONS)))
def test_scores_equal_plain_reimplementation(tiny_model, batch_how, seq_how):
    model, cfg = tiny_model
    samples = _samples()
    icfg = ImportanceConfig(aggregation=f"{batch_how},{seq_how}", depth=False)
    scores = estimate_importance(model, cfg, _micro_batches(samples), icfg)
    state = {k: v.double() for k, v in model.state_dict().items() if torch.is_tensor(v)
             and not k.endswith("_extra_state")}
    expected = plain_scores(state, cfg.replace(), samples[:, :-1], batch_how, seq_how)
    for key in ("head", "query_group", "neuron", "channel", "layer_bi"):
        _close(scores[key], expected[key], 1e-4)
    assert scores["meta"]["num_samples"] == SAMPLES
    assert scores["meta"]["aggregation"] == f"{batch_how},{seq_how}"


def test_depth_scores_equal_plain_reimplementation(tiny_model):
    model, cfg = tiny_model
    samples = _samples()
    scores = estimate_importance(model, cfg, _micro_batches(samples), ImportanceConfig())
    state = {k: v.double() for k, v in model.state_dict().items() if torch.is_tensor(v)
             and not k.endswith("_extra_state")}
    for layer in range(cfg.num_layers):  # perplexity with the layer removed, by hand
        kept = [i for i in range(cfg.num_layers) if i != layer]
        skipped = {k: v for k, v in state.items() if ".layers." not in k}
        for new, old in enumerate(kept):
            skipped.update({k.replace(f".layers.{old}.", f".layers.{new}."): v
                            for k, v in state.items() if f".layers.{old}." in k})
        losses = []
        for sample in samples:
            logits, _ = plain_forward(skipped, cfg.replace(num_layers=cfg.num_layers - 1),
                                      sample[:-1])
            losses.append(torch.nn.functional.cross_entropy(logits, sample[1:], reduction="sum"))
        expected = math.exp(float(torch.stack(losses).sum()) / (SAMPLES * SEQ))
        assert abs(scores["layer_ppl"][layer] - expected) <= 1e-4 * expected
    _close(scores["block_bi"][1], scores["layer_bi"], 1e-6)
    assert sorted(scores["block_bi"]) == list(range(1, cfg.num_layers + 1))
    for n, values in scores["block_bi"].items():
        assert values.shape == (cfg.num_layers - n + 1,)
    # a whole-model block: cosine between the embedding output and the last layer's output
    _, record = plain_forward(state, cfg, samples[0, :-1])
    assert 0 < float(scores["block_bi"][cfg.num_layers][0]) <= 2


def _single_rank_scores(ckpt, out):
    parallel.initialize(1, 1)
    cfg = tiny_config()
    model = adapter.build_gpt_model(cfg)
    save_checkpoint(model, cfg, ckpt)
    torch.save(estimate_importance(model, cfg, _micro_batches(_samples())), out)


def _layout_scores(ckpt, expected_path, tp, pp):
    layout = parallel.initialize(tp, pp)
    model, cfg = load_checkpoint(ckpt)
    from megatron.core import parallel_state

    batches = _micro_batches(_samples(), parallel_state.get_data_parallel_rank(), layout.dp)
    scores = estimate_importance(model, cfg, batches)
    expected = torch.load(expected_path, weights_only=False)
    for key in ("head", "query_group", "neuron", "channel", "layer_bi", "layer_ppl"):
        _close(scores[key], expected[key], 1e-4)
        _same_ranking(scores[key], expected[key])
    for n in expected["block_bi"]:
        _close(scores["block_bi"][n], expected["block_bi"][n], 1e-4)
    assert scores["meta"]["num_samples"] == SAMPLES
    assert scores["meta"]["num_tokens"] == SAMPLES * SEQ


def _same_ranking(actual, expected):
    """Orderings agree except between values equal within the tolerance."""
    actual, expected = actual.flatten().double(), expected.flatten().double()
    order = torch.argsort(expected)
    tol = 1e-4 * expected.abs().max()
    ranked = actual[order]
    assert (ranked[1:] - ranked[:-1] >= -2 * tol).all()


@pytest.fixture(scope="module")
def single_rank_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance")
    spawn(_single_rank_scores, 1, str(root / "ckpt"), str(root / "scores.pt"))
    return str(root / "ckpt"), str(root / "scores.pt")


@pytest.mark.parametrize("tp,pp,dp", [(tp, pp, dp) for tp, pp, dp
                                      in itertools.product((1, 2), (1, 2), (1, 2))
                                      if (tp, pp, dp) != (1, 1, 1)])
def test_scores_identical_at_every_layout(single_rank_scores, tp, pp, dp):
    ckpt, expected = single_rank_scores
    spawn(_layout_scores, tp * pp * dp, ckpt, expected, tp, pp)


def test_unknown_aggregation_is_refused():
    with pytest.raises(UsageError, match="unknown batch aggregation 'median'"):
        Aggregation.parse("median,mean")
    with pytest.raises(UsageError, match="must be BATCH,SEQ"):
        Aggregation.parse("l2")


def test_non_finite_activation_names_the_layer(tiny_model):
    model, cfg = tiny_model
    layer = adapter.decoder_layers(model)[2]
    weight = adapter.mlp_fc1(layer).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(UsageError, match="in layer 2"):
            estimate_importance(model, cfg, _micro_batches(_samples()),
                                ImportanceConfig(depth=False))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_finite_flags_name_the_first_layer_and_read_the_host_once():
    flags = FiniteFlags([4, 5, 6], "cpu")
    flags.record(torch.ones(2, 3), 4, "norm")
    flags.check()
    flags.record(torch.tensor([1.0, float("inf")]), 6, "norm")
    flags.record(torch.tensor([float("nan")]), 5, "MLP")
    with pytest.raises(NonFiniteActivation, match="non-finite .NaN/Inf. MLP activations in "
                                                  "layer 5;"):
        flags.check()
    on_device = FiniteFlags([0], "meta")  # no host reads possible there
    on_device.record(torch.empty(8, 2, device="meta"), 0, "attention head")  # hooks: none
    with pytest.raises(Exception):
        on_device.check()  # the one host read per batch
