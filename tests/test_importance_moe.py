"""Mixture-of-experts importance: expert, routed-token, expert-neuron and shared-neuron scores equal
a plain re-implementation for all 9 aggregations, respond to routing and weights as they must,
and are identical at every TP / PP / DP / EP layout; the command runs end to end on a MoE
checkpoint."""

import functools
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint.io import load_checkpoint, save_checkpoint
from megatron_minitron.errors import UsageError
from megatron_minitron.importance import ImportanceConfig, estimate_importance, load_scores
from megatron_minitron.importance.aggregation import REDUCTIONS, reduce_routed
from megatron_minitron.importance.moe import MOE_SCORE_KEYS
from megatron_minitron.testing import spawn, tiny_config, tiny_moe_config
from megatron_minitron.testing.models import spread_weights
from test_importance import SAMPLES, SEQ, _micro_batches, _same_ranking, _samples

DENSE_KEYS = ("head", "query_group", "neuron", "channel", "layer_bi")


def _close(actual, expected, rtol):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual - expected).abs()
    assert (error <= rtol * scale).all(), error.max() / scale


@pytest.fixture(scope="module")
def moe_model():
    parallel.initialize(1, 1)
    cfg = tiny_moe_config()
    model = adapter.build_gpt_model(cfg)
    spread_weights(model, cfg)
    yield model, cfg
    parallel.teardown()


def _reduce(values, how):
    """[n, c] → [c] over the first dimension (population variance)."""
    if how == "mean":
        return values.mean(0)
    if how == "l2":
        return values.square().sum(0).sqrt()
    return values.var(0, unbiased=False)


def _capture_moe_inputs(model):
    """Hooks recording each MoE layer's input [s, b, h] and router output per forward."""
    record, handles = {}, []
    for layer in adapter.decoder_layers(model):
        if not adapter.is_moe_layer(layer):
            continue
        index = adapter.layer_global_index(layer)
        record[index] = []

        def hook(module, args, output, index=index):
            record[index].append((args[0].detach().double(), output[0].detach().double(),
                                  output[1].detach()))
        handles.append(adapter.moe_router(layer).register_forward_hook(hook))
    return record, handles


def _neuron_values(gate, up, probs, source):
    """A (shared) expert's per-token neuron values for ``source`` ([n, f])."""
    if source == "fc1":
        return gate
    if source == "up":
        return up
    return F.silu(gate) * up * probs  # the fc2 input, router probability applied


def _expected_moe(model, cfg, record, batch_how, seq_how, source="fc2_input"):
    """The MoE scores by hand from the weights and each MoE layer's input and routing."""
    out = {key: torch.zeros(shape, dtype=torch.float64) for key, shape in (
        ("expert", (cfg.num_layers, cfg.num_moe_experts)),
        ("expert_tokens", (cfg.num_layers, cfg.num_moe_experts)),
        ("expert_neuron", (cfg.num_layers, cfg.num_moe_experts, cfg.moe_ffn_hidden_size)),
        ("shared_neuron", (cfg.num_layers, cfg.moe_shared_expert_intermediate_size)))}
    layers = {adapter.layer_global_index(layer): layer for layer in adapter.decoder_layers(model)}
    for index, batches in record.items():
        layer = layers[index]
        experts = adapter.local_experts(layer)
        shared = adapter.shared_expert(layer)
        expert_samples, neuron_samples, shared_samples = [], [[] for _ in experts], []
        for hidden, probs, routing_map in batches:
            seq, batch = hidden.shape[:2]
            for b in range(batch):
                x = hidden[:, b]  # [s, h]
                rows = torch.arange(seq) * batch + b  # the routing map's rows of this sample
                sh = F.linear(x, shared.linear_fc1.weight.double()).chunk(2, dim=-1)
                shared_samples.append(_reduce(_neuron_values(*sh, 1.0, source).abs(), seq_how))
                per_expert = torch.zeros(len(experts), dtype=torch.float64)
                for e, expert in enumerate(experts):
                    routed = routing_map[rows, e]
                    out["expert_tokens"][index, e] += float(routed.sum())
                    gate, up = F.linear(x, expert.linear_fc1.weight.double()).chunk(2, dim=-1)
                    act = F.silu(gate) * up * probs[rows, e].unsqueeze(1)  # fc2 input
                    y = F.linear(act, expert.linear_fc2.weight.double())
                    contribution = torch.where(routed, y.norm(dim=-1), 0.0)  # 0: not routed
                    per_expert[e] = _reduce(contribution.unsqueeze(1), seq_how)[0]
                    if routed.any():
                        values = _neuron_values(gate, up, probs[rows, e].unsqueeze(1), source)
                        neuron_samples[e].append(_reduce(values[routed].abs(), seq_how))
                expert_samples.append(per_expert)
        out["expert"][index] = _reduce(torch.stack(expert_samples), batch_how)
        out["shared_neuron"][index] = _reduce(torch.stack(shared_samples), batch_how)
        for e, samples in enumerate(neuron_samples):
            if samples:
                out["expert_neuron"][index, e] = _reduce(torch.stack(samples), batch_how)
    return out


@pytest.mark.parametrize("batch_how,seq_how", list(itertools.product(REDUCTIONS, REDUCTIONS)))
def test_moe_scores_equal_plain_reimplementation(moe_model, batch_how, seq_how):
    model, cfg = moe_model
    record, handles = _capture_moe_inputs(model)
    try:
        scores = estimate_importance(model, cfg, _micro_batches(_samples()),
                                     ImportanceConfig(f"{batch_how},{seq_how}", depth=False))
    finally:
        for handle in handles:
            handle.remove()
    expected = _expected_moe(model, cfg, record, batch_how, seq_how)
    for key in MOE_SCORE_KEYS:
        assert scores[key].shape == expected[key].shape, key
        _close(scores[key], expected[key], 1e-5)
    routed = SAMPLES * SEQ * cfg.moe_router_topk
    assert scores["expert_tokens"].sum(1).tolist() == [routed, 0, routed, routed]
    dense, moe = 1, [0, 2, 3]
    assert (scores["neuron"][moe] == 0).all() and (scores["neuron"][dense] > 0).all()
    for key in MOE_SCORE_KEYS:
        assert (scores[key][dense] == 0).all()
    assert (scores["expert"][moe] > 0).all() and (scores["expert_neuron"][moe] > 0).all()
    assert scores["meta"]["num_samples"] == SAMPLES


@pytest.mark.parametrize("source", ["fc1", "up"])
def test_moe_neuron_sources_equal_plain_reimplementation(moe_model, source):
    model, cfg = moe_model
    record, handles = _capture_moe_inputs(model)
    try:
        scores = estimate_importance(model, cfg, _micro_batches(_samples()),
                                     ImportanceConfig("l2,mean", source, depth=False))
    finally:
        for handle in handles:
            handle.remove()
    expected = _expected_moe(model, cfg, record, "l2", "mean", source)
    for key in MOE_SCORE_KEYS:
        _close(scores[key], expected[key], 1e-5)


def test_moe_without_shared_expert_with_biases(moe_model, tmp_path):
    cfg = tiny_moe_config(add_bias_linear=True, activation="gelu", moe_layer_freq=2,
                          moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False)
    model = adapter.build_gpt_model(cfg)
    for source in ("fc2_input", "fc1"):
        scores = estimate_importance(model, cfg, _micro_batches(_samples())[:2],
                                     ImportanceConfig(neuron_source=source, depth=False))
        assert scores["shared_neuron"].shape == (4, 0)
        assert scores["expert_neuron"].shape == (4, 6, 32)
        assert (scores["expert"][[0, 2]] > 0).all() and (scores["expert"][[1, 3]] == 0).all()
        assert (scores["expert_neuron"][[0, 2]] > 0).any(dim=-1).all()
        assert (scores["neuron"][[0, 2]] == 0).all() and (scores["neuron"][[1, 3]] > 0).all()
    path = str(tmp_path / "scores.pt")
    torch.save(scores, path)
    assert load_scores(path, cfg)["shared_neuron"].shape == (4, 0)


def test_reduce_routed_matches_a_loop():
    values = torch.randn(11, 3, generator=torch.Generator().manual_seed(0))
    sample = torch.tensor([0, 2, 2, 0, 3, 3, 3, 0, 2, 3, 0])
    for how in REDUCTIONS:
        routed, tokens = reduce_routed(values, sample, 5, how, magnitude=True)
        padded, _ = reduce_routed(values, sample, 5, how, magnitude=True, seq_length=6)
        assert tokens.tolist() == [4, 0, 3, 4, 0]
        for i in range(5):
            mine = values[sample == i].abs().double()
            if len(mine):
                _close(routed[i], _reduce(mine, how), 1e-6)
            full = torch.cat([mine, torch.zeros(6 - len(mine), 3, dtype=torch.float64)])
            _close(padded[i], _reduce(full, how), 1e-6)


def _mean_moe_input(model, cfg, layer_index):
    record, handles = _capture_moe_inputs(model)
    try:
        estimate_importance(model, cfg, _micro_batches(_samples())[:1],
                            ImportanceConfig(depth=False))
    finally:
        for handle in handles:
            handle.remove()
    return record[layer_index][0][0].flatten(0, 1).mean(0)


def test_routing_and_weights_move_the_scores(moe_model):
    model, cfg = moe_model
    layer = adapter.decoder_layers(model)[2]  # a MoE layer
    router = adapter.moe_router(layer)
    expert = adapter.local_experts(layer)[4]
    saved = {"router": router.weight.detach().clone(),
             "fc1": expert.linear_fc1.weight.detach().clone()}
    favoured, never, neuron = 1, 3, 7
    direction = _mean_moe_input(model, cfg, 2).to(router.weight.dtype)
    original_gating = router.gating

    def gating(hidden):  # expert `never` is never among the top-k
        logits = original_gating(hidden).clone()
        logits[..., never] = -1e4
        return logits

    try:
        with torch.no_grad():  # the favoured expert's row points along the mean input
            router.weight[favoured] = 20 * direction / direction.norm()
            ffn = cfg.moe_ffn_hidden_size  # the neuron's gate and up rows
            expert.linear_fc1.weight[neuron] = 0
            expert.linear_fc1.weight[ffn + neuron] = 0
        router.gating = gating
        scores = estimate_importance(model, cfg, _micro_batches(_samples()),
                                     ImportanceConfig(depth=False))
    finally:
        router.__dict__.pop("gating", None)
        with torch.no_grad():
            router.weight.copy_(saved["router"])
            expert.linear_fc1.weight.copy_(saved["fc1"])
    tokens = scores["expert_tokens"][2]
    assert int(tokens.argmax()) == favoured and tokens[favoured] > 0.5 * SAMPLES * SEQ
    assert tokens[never] == 0 and tokens.sum() == SAMPLES * SEQ * 2
    assert scores["expert"][2, never] == 0 and (scores["expert_neuron"][2, never] == 0).all()
    others = [e for e in range(cfg.num_moe_experts) if e != never]
    assert (scores["expert"][2, others] > 0).all()
    assert scores["expert_neuron"][2, 4, neuron] == 0
    assert (scores["expert_neuron"][2, 4].nonzero().flatten() != neuron).all()
    assert int((scores["expert_neuron"][2, 4] > 0).sum()) == cfg.moe_ffn_hidden_size - 1


def _dense_score_keys():
    with parallel.parallel_context(1, 1):
        cfg = tiny_config()
        model = adapter.build_gpt_model(cfg)
        scores = estimate_importance(model, cfg, _micro_batches(_samples())[:1],
                                     ImportanceConfig(depth=False))
    assert set(scores) == {"head", "query_group", "neuron", "channel", "layer_bi", "meta"}


def test_dense_scores_have_no_moe_keys():
    spawn(_dense_score_keys, 1)  # its own process: the module's model keeps its groups


def test_load_scores_checks_the_moe_shapes(moe_model, tmp_path):
    model, cfg = moe_model
    scores = estimate_importance(model, cfg, _micro_batches(_samples())[:1],
                                 ImportanceConfig(depth=False))
    path = str(tmp_path / "scores.pt")
    torch.save(scores, path)
    assert load_scores(path, cfg)["expert_neuron"].shape == (4, 6, 32)
    with pytest.raises(UsageError, match="num_moe_experts=6 vs None"):
        load_scores(path, tiny_moe_config(num_moe_experts=None, moe_ffn_hidden_size=None,
                                          moe_shared_expert_intermediate_size=None,
                                          moe_shared_expert_gate=False))
    with pytest.raises(UsageError, match=r"MoE layers \[0, 2, 3\] vs \[0, 1, 2, 3\]"):
        load_scores(path, tiny_moe_config(moe_layer_freq=1))
    broken = dict(scores, expert_neuron=scores["expert_neuron"][:, :, :16])
    torch.save(broken, path)
    with pytest.raises(UsageError, match=r"expert_neuron has shape \[4, 6, 16\], this model "
                                         r"needs \[4, 6, 32\]"):
        load_scores(path, cfg)
    torch.save({k: v for k, v in scores.items() if k != "expert_tokens"}, path)
    with pytest.raises(UsageError, match="hold no 'expert_tokens' scores"):
        load_scores(path, cfg)


# ---------------------------------------------------------------------- layouts


def _single_rank_scores(ckpt, out):
    with parallel.parallel_context(1, 1):
        cfg = tiny_moe_config()
        model = adapter.build_gpt_model(cfg)
        spread_weights(model, cfg)
        save_checkpoint(model, cfg, ckpt)
        torch.save(estimate_importance(model, cfg, _micro_batches(_samples())), out)


def _layout_scores(ckpt, expected_path, tp, pp, ep, depth):
    from megatron.core import parallel_state

    with parallel.parallel_context(tp, pp, ep=ep) as layout:
        model, cfg = load_checkpoint(ckpt)
        batches = _micro_batches(_samples(), parallel_state.get_data_parallel_rank(), layout.dp)
        scores = estimate_importance(model, cfg, batches, ImportanceConfig(depth=depth))
    expected = torch.load(expected_path, weights_only=False)
    for key in DENSE_KEYS + MOE_SCORE_KEYS + (("layer_ppl",) if depth else ()):
        assert scores[key].shape == expected[key].shape, key
        _close(scores[key], expected[key], 1e-4)
        _same_ranking(scores[key], expected[key])
    for layer in (0, 2, 3):  # each expert's neurons rank as at one rank
        for e in range(cfg.num_moe_experts):
            _same_ranking(scores["expert_neuron"][layer, e], expected["expert_neuron"][layer, e])
    assert torch.equal(scores["expert_tokens"], expected["expert_tokens"])
    assert scores["meta"]["num_samples"] == SAMPLES
    for n in expected["block_bi"] if depth else ():
        _close(scores["block_bi"][n], expected["block_bi"][n], 1e-4)


@pytest.fixture(scope="module")
def single_rank_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("importance_moe")
    spawn(_single_rank_scores, 1, str(root / "ckpt"), str(root / "scores.pt"))
    return str(root / "ckpt"), str(root / "scores.pt")


@pytest.mark.parametrize("tp,pp,ep,world", [(2, 1, 1, 2), (1, 1, 2, 2), (2, 1, 2, 4),
                                            (1, 2, 2, 4), (1, 1, 2, 4)],
                         ids=["tp2", "ep2", "tp2_ep2", "pp2_ep2", "ep2_dp4"])
def test_moe_scores_identical_at_every_layout(single_rank_scores, tp, pp, ep, world):
    ckpt, expected = single_rank_scores
    depth = (tp, pp, ep) == (1, 1, 2)  # layer PPL and block BI with experts split too
    spawn(_layout_scores, world, ckpt, expected, tp, pp, ep, depth)


# ---------------------------------------------------------------------- command line


def _save_moe_checkpoint(path, tokenizer_dir):
    with parallel.parallel_context(1, 1):
        cfg = tiny_moe_config(vocab_size=320)
        model = adapter.build_gpt_model(cfg)
        spread_weights(model, cfg)
        save_checkpoint(model, cfg, path, tokenizer_from=tokenizer_dir)


def test_importance_command_on_a_moe_checkpoint(tmp_path, tiny_tokenizer_dir, capsys):
    from conftest import tiny_text
    from megatron_minitron.cli import main as cli

    ckpt, text = str(tmp_path / "moe"), tmp_path / "corpus.txt"
    spawn(functools.partial(_save_moe_checkpoint, tokenizer_dir=tiny_tokenizer_dir), 1, ckpt)
    text.write_text(tiny_text(4000, seed=3))
    output = str(tmp_path / "scores.pt")
    assert cli(["importance", "--load", ckpt, "--text-file", str(text), "--num-samples", "4",
                "--seq-length", "32", "--micro-batch-size", "2", "--output", output]) == 0
    assert "experts: 3 MoE layers × 6 experts" in capsys.readouterr().out
    scores = load_scores(output, tiny_moe_config(vocab_size=320))
    assert scores["expert"].shape == (4, 6) and scores["shared_neuron"].shape == (4, 48)
    assert scores["expert_tokens"].sum() == 3 * 4 * 32 * 2
    assert scores["layer_ppl"].shape == (4,) and set(scores["block_bi"]) == {1, 2, 3, 4}
    assert os.path.getsize(str(tmp_path / "scores.png")) > 10_000
