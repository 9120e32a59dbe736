"""Mixture-of-experts pruning: dropped experts equal the source with their router logits at −inf,
trimmed expert and shared-expert neurons equal zeroed ones, exact total and active counts, the
same output from checkpoints saved at any TP/EP layout, output that loads at other layouts, and
bad requests that fail before any work."""

import contextlib
import os

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint import io
from megatron_minitron.config import count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.importance import random_scores
from megatron_minitron.importance.depth import skip_layer
from megatron_minitron.model.forward import full_logits
from megatron_minitron.prune import parse_target, prune_checkpoint, prune_state_dict
from megatron_minitron.prune.apply import head_columns
from megatron_minitron.prune.plan import target_config
from megatron_minitron.testing import spawn, tiny_config, tiny_moe_config
from megatron_minitron.testing.models import spread_weights

TOKENS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(11))
VARIANTS = {
    "mixed": {},  # MoE, dense, MoE, MoE: stored one layer at a time
    "stacked": {"moe_layer_freq": 1},  # every layer MoE: stored stacked [L, E, ...]
    "pre_softmax": {"moe_router_pre_softmax": True, "moe_router_topk": 3},
    "biases": {"add_bias_linear": True, "activation": "gelu", "moe_layer_freq": 2,
               "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False},
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``get(variant)`` → (root, checkpoint, model, cfg, scores), built once per variant."""
    root = tmp_path_factory.mktemp("prune_moe")
    parallel.initialize(1, 1)
    built = {}

    def get(variant="mixed"):
        if variant not in built:
            cfg = tiny_moe_config(**VARIANTS[variant])
            model = adapter.build_gpt_model(cfg)
            spread_weights(model, cfg, seed=1)
            ckpt = str(root / f"source_{variant}")
            io.save_checkpoint(model, cfg, ckpt)
            built[variant] = (root, ckpt, model, cfg, random_scores(cfg, seed=5))
        return built[variant]

    yield get
    parallel.teardown()


def _route_around(router, dropped):
    """The router's logits of ``dropped`` experts become −inf (they are never chosen)."""
    gating = router.gating
    mask = torch.zeros(router.weight.shape[0])
    mask[dropped] = float("-inf")
    router.gating = lambda x: gating(x) + mask.to(x.device)
    return lambda: delattr(router, "gating")


@contextlib.contextmanager
def _masked(model, cfg, plan):
    """The source with what ``plan`` drops masked out: dropped experts' router logits at −inf,
    pruned heads' and neurons' (dense, expert, shared) output columns zeroed."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    undo = []
    with torch.no_grad():
        for layer, keep in zip(adapter.decoder_layers(model), plan.layers):
            proj = adapter.attention_output_projection(layer).weight
            proj[:, head_columns(plan, [h for h in range(cfg.num_attention_heads)
                                        if h not in keep.heads])] = 0
            if not keep.moe:
                adapter.mlp_fc2(layer).weight[:, [n for n in range(cfg.ffn_hidden_size)
                                                  if n not in keep.neurons]] = 0
                continue
            undo.append(_route_around(adapter.moe_router(layer),
                                      [e for e in range(cfg.num_moe_experts)
                                       if e not in keep.experts]))
            for position, expert in enumerate(keep.experts):
                fc2 = adapter.local_experts(layer)[expert].linear_fc2.weight
                fc2[:, [n for n in range(cfg.moe_ffn_hidden_size)
                        if n not in keep.expert_neurons[position]]] = 0
            if adapter.shared_expert(layer) is not None:
                fc2 = adapter.shared_expert(layer).linear_fc2.weight
                fc2[:, [n for n in range(cfg.moe_shared_expert_intermediate_size)
                        if n not in keep.shared_neurons]] = 0
    try:
        yield
    finally:
        for restore in undo:
            restore()
        model.load_state_dict(saved, strict=False)


def _active_parameters(model, cfg):
    """Parameters one token passes through, counted on the model (top-k experts per layer)."""
    total = sum(p.numel() for p in model.parameters())
    for layer in adapter.decoder_layers(model):
        if adapter.is_moe_layer(layer):
            per_expert = sum(p.numel() for p in adapter.local_experts(layer)[0].parameters())
            total -= (cfg.num_moe_experts - cfg.moe_router_topk) * per_expert
    return total


def _check_counts(model, cfg):
    counts = count_parameters(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert _active_parameters(model, cfg) == counts["active"]


@pytest.mark.parametrize("variant,target", [
    ("mixed", {"num_moe_experts": 3}),
    ("mixed", {"moe_ffn_hidden_size": 20}),
    ("mixed", {"moe_shared_expert_intermediate_size": 24}),
    ("mixed", {"ffn_hidden_size": 64}),
    ("mixed", {"num_moe_experts": 4, "moe_ffn_hidden_size": 16, "ffn_hidden_size": 48,
               "moe_shared_expert_intermediate_size": 16, "num_attention_heads": 2,
               "num_query_groups": 2}),
    ("stacked", {"num_moe_experts": 2, "moe_ffn_hidden_size": 24}),
    ("pre_softmax", {"num_moe_experts": 4, "moe_shared_expert_intermediate_size": 32}),
    ("biases", {"num_moe_experts": 3, "moe_ffn_hidden_size": 20, "ffn_hidden_size": 64}),
], ids=["experts", "expert_neurons", "shared_neurons", "dense_ffn", "all", "stacked",
        "pre_softmax", "biases"])
def test_pruned_moe_equals_masked_source(sources, variant, target):
    root, ckpt, model, cfg, scores = sources(variant)
    out = str(root / (variant + "_" + "_".join(f"{k}{v}" for k, v in target.items())))
    plan = prune_checkpoint(ckpt, scores, target, out)
    pruned, pruned_cfg = io.load_checkpoint(out)
    for key, value in target.items():
        assert getattr(pruned_cfg, key) == value
    _check_counts(pruned, pruned_cfg)
    with _masked(model, cfg, plan):
        expected = full_logits(model, TOKENS, 2)
    assert expected.std() > 0.5
    assert (full_logits(model, TOKENS, 2) - expected).abs().max() > 1e-2  # the mask matters
    torch.testing.assert_close(full_logits(pruned, TOKENS, 2), expected, rtol=0, atol=1e-5)
    for keep, layer in zip(plan.layers, adapter.decoder_layers(pruned)):
        assert keep.moe == adapter.is_moe_layer(layer)
        if keep.moe:  # kept experts in source order, each trimmed to its own neurons
            assert keep.experts == sorted(keep.experts)
            assert len(keep.experts) == len(adapter.local_experts(layer))
            assert all(n == sorted(n) for n in keep.expert_neurons)
            experts = torch.tensor(keep.experts)
            source_router = adapter.moe_router(adapter.decoder_layers(model)[keep.source_layer])
            torch.testing.assert_close(adapter.moe_router(layer).weight,
                                       source_router.weight[experts], rtol=0, atol=0)
            if cfg.add_bias_linear:
                torch.testing.assert_close(adapter.moe_router(layer).bias,
                                           source_router.bias[experts], rtol=0, atol=0)


def test_experts_chosen_by_score(sources):
    root, ckpt, model, cfg, scores = sources()
    scores = dict(scores, expert=scores["expert"].clone())
    scores["expert"][0] = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7, 0.3], dtype=torch.float64)
    from megatron_minitron.prune import plan_pruning

    plan = plan_pruning(cfg, scores, {"num_moe_experts": 3})
    assert plan.layers[0].experts == [1, 3, 4]
    assert not plan.layers[1].moe and plan.layers[1].experts == []


@pytest.mark.parametrize("variant,drop,pattern", [("mixed", [1], [1, 1, 1]),
                                                  ("mixed", [2], [1, 0, 1]),
                                                  ("stacked", [0], [1, 1, 1])])
def test_dropped_layers_keep_their_moe_pattern(sources, variant, drop, pattern):
    root, ckpt, model, cfg, scores = sources(variant)
    out = str(root / f"drop_{variant}_{drop[0]}")
    plan = prune_checkpoint(ckpt, scores, {"num_moe_experts": 4}, out, drop_layers=drop)
    pruned, pruned_cfg = io.load_checkpoint(out)
    assert pruned_cfg.moe_layer_freq == pattern and pruned_cfg.num_layers == 3
    _check_counts(pruned, pruned_cfg)
    with _masked(model, cfg, _with_all_layers(plan, cfg)), skip_layer(model, drop[0]):
        expected = full_logits(model, TOKENS, 2)
    torch.testing.assert_close(full_logits(pruned, TOKENS, 2), expected, rtol=0, atol=1e-5)


def _with_all_layers(plan, cfg):
    """``plan`` with the dropped layers back in, whole (for masking the source)."""
    import dataclasses

    from megatron_minitron.prune.plan import LayerPlan

    kept = {layer.source_layer: layer for layer in plan.layers}
    whole = cfg.moe_layers()
    layers = [kept.get(i) or LayerPlan(
        i, list(range(cfg.num_query_groups)), list(range(cfg.num_attention_heads)),
        list(range(cfg.ffn_hidden_size)), [], whole[i], list(range(cfg.num_moe_experts)),
        [list(range(cfg.moe_ffn_hidden_size))] * cfg.num_moe_experts,
        list(range(cfg.moe_shared_expert_intermediate_size))) for i in range(cfg.num_layers)]
    return dataclasses.replace(plan, layers=layers)


def test_in_memory_state_dict_matches_streamed(sources):
    root, ckpt, model, cfg, scores = sources()
    target = {"num_moe_experts": 4, "moe_ffn_hidden_size": 16, "hidden_size": 48}
    out = str(root / "in_memory")
    plan = prune_checkpoint(ckpt, scores, target, out)
    streamed, pruned_cfg = io.load_checkpoint(out)
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    fresh = adapter.build_gpt_model(pruned_cfg)
    missing, unexpected = fresh.load_state_dict(prune_state_dict(state, plan), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")]
    torch.testing.assert_close(full_logits(fresh, TOKENS, 2), full_logits(streamed, TOKENS, 2),
                               rtol=0, atol=0)


def _save_at_layout(ckpt, out, tp, ep):
    parallel.initialize(tp, 1, ep=ep)
    model, cfg = io.load_checkpoint(ckpt)
    io.save_checkpoint(model, cfg, out)


def _load_at_layout(path, expected_path, tp, pp, ep):
    parallel.initialize(tp, pp, ep=ep)
    model, _ = io.load_checkpoint(path)
    torch.testing.assert_close(full_logits(model, TOKENS, 2), torch.load(expected_path),
                               rtol=0, atol=1e-5)


def test_source_at_any_layout_prunes_the_same_and_output_loads_anywhere(sources):
    root, ckpt, model, cfg, scores = sources()
    target = {"num_moe_experts": 4, "moe_ffn_hidden_size": 16, "hidden_size": 48,
              "moe_shared_expert_intermediate_size": 24, "ffn_hidden_size": 64,
              "num_layers": 3}
    outputs = {}
    for name, tp, ep, world in (("tp1", 1, 1, 1), ("ep2", 1, 2, 2), ("tp2ep2", 2, 2, 4)):
        source = ckpt
        if world > 1:
            source = str(root / f"source_{name}")
            spawn(_save_at_layout, world, ckpt, source, tp, ep)
        outputs[name] = str(root / f"layout_from_{name}")
        plan = prune_checkpoint(source, scores, target, outputs[name], target_tp=2)
        assert len(plan.kept_layers) == 3
    reference, pruned_cfg = io.load_checkpoint(outputs["tp1"])
    _check_counts(reference, pruned_cfg)
    for name in ("ep2", "tp2ep2"):
        other, _ = io.load_checkpoint(outputs[name])
        for (key, x), (_, y) in zip(reference.state_dict().items(), other.state_dict().items()):
            if torch.is_tensor(x):
                assert torch.equal(x, y), (name, key)
    expected = str(root / "layout_logits.pt")
    torch.save(full_logits(reference, TOKENS, 2), expected)
    spawn(_load_at_layout, 2, outputs["tp1"], expected, 1, 1, 2)
    spawn(_load_at_layout, 4, outputs["tp1"], expected, 2, 1, 2)


@pytest.mark.parametrize("target,kwargs,message", [
    ({"num_moe_experts": 1}, {}, "num_moe_experts=1 is fewer than moe_router_topk=2.*keep at "
                                 "least num_moe_experts=2"),
    ({"num_moe_experts": 7}, {}, "larger than the source"),
    ({"moe_ffn_hidden_size": 15}, {"target_tp": 2}, "does not divide moe_ffn_hidden_size=15"),
    ({"moe_shared_expert_intermediate_size": 0}, {}, "must be >= 1"),
    ({"num_experts": 2}, {}, "key 'num_experts' is unknown.*num_moe_experts"),
    ({"num_moe_experts": 4}, {"output_format": "megatron"}, "--output-format megatron"),
])
def test_bad_moe_requests_fail_before_work(sources, target, kwargs, message):
    root, ckpt, model, cfg, scores = sources()
    out = str(root / "never")
    with pytest.raises(UsageError, match=message):
        prune_checkpoint(ckpt, scores, target, out, **kwargs)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_moe_keys_need_a_moe_source_and_their_scores(sources):
    with pytest.raises(UsageError, match="num_moe_experts=2: the source is a dense model"):
        target_config(tiny_config(), {"num_moe_experts": 2})
    plain = tiny_moe_config(moe_shared_expert_intermediate_size=None,
                            moe_shared_expert_gate=False)
    with pytest.raises(UsageError, match="the source has no shared expert"):
        target_config(plain, {"moe_shared_expert_intermediate_size": 8})
    root, ckpt, model, cfg, scores = sources()
    old = {k: v for k, v in scores.items() if k not in ("expert", "expert_neuron")}
    with pytest.raises(UsageError, match="scores lack 'expert'"):
        prune_checkpoint(ckpt, old, {"num_moe_experts": 4}, str(root / "never"))
    plan = prune_checkpoint(ckpt, old, {"moe_shared_expert_intermediate_size": 24},
                            str(root / "old_scores"))  # experts kept whole: no score needed
    assert plan.layers[0].experts == list(range(6))


def test_random_scores_and_target_parsing():
    cfg = tiny_moe_config()
    scores = random_scores(cfg, seed=2)
    assert scores["expert"].shape == scores["expert_tokens"].shape == (4, 6)
    assert scores["expert_neuron"].shape == (4, 6, 32)
    assert scores["shared_neuron"].shape == (4, 48)
    moe = torch.tensor(cfg.moe_layers())
    assert (scores["expert"][~moe] == 0).all() and (scores["expert"][moe] > 0).all()
    assert (scores["shared_neuron"][~moe] == 0).all()
    assert (scores["neuron"][moe] == 0).all() and (scores["neuron"][~moe] > 0).all()
    dense = random_scores(tiny_config(), seed=2)
    assert "expert" not in dense
    assert torch.equal(dense["channel"], random_scores(tiny_config(), seed=2)["channel"])
    assert parse_target("num_moe_experts=4,moe_ffn_hidden_size=16,"
                        "moe_shared_expert_intermediate_size=8") == {
        "num_moe_experts": 4, "moe_ffn_hidden_size": 16,
        "moe_shared_expert_intermediate_size": 8}
    pruned = target_config(cfg, {"num_layers": 2})  # depth unknown yet: the first layers
    assert pruned.moe_layer_freq == [1, 0]


def test_prune_help_lists_the_moe_keys(capsys):
    from megatron_minitron.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        assert key in text


def test_search_space_enumerates_moe_axes_by_total_or_active_count():
    from megatron_minitron.search import enumerate_candidates
    from megatron_minitron.search.space import check_space

    source = tiny_moe_config()
    space = check_space({"num_moe_experts": [2, 4, 6], "moe_ffn_hidden_size": [16, 32],
                         "moe_shared_expert_intermediate_size": [24, 48]}, source)
    everything = {}
    for budget in ("total", "active"):
        counts = sorted(count_parameters(target_config(source, {
            "num_moe_experts": e, "moe_ffn_hidden_size": f,
            "moe_shared_expert_intermediate_size": s}))[budget]
            for e in (2, 4, 6) for f in (16, 32) for s in (24, 48))
        middle = counts[len(counts) // 2]
        candidates, stats = enumerate_candidates(source, space, middle, 0.03, budget=budget)
        assert stats["combinations"] == 12 and candidates
        for candidate in candidates:
            assert candidate.params == count_parameters(candidate.config)[budget]
            assert abs(candidate.params - middle) <= 0.03 * middle
            assert candidate.name.startswith("L4-H64-F96-A4-G2-E")
            assert set(candidate.architecture()) >= {"num_moe_experts", "moe_ffn_hidden_size"}
        everything[budget] = {c.name for c in candidates}
    # routed experts beyond the top k are not active: the budgets pick other candidates
    assert everything["total"] != everything["active"]
    with pytest.raises(UsageError, match="field 'num_moe_experts' needs a mixture-of-experts"):
        check_space({"num_moe_experts": [2]}, tiny_config())
    with pytest.raises(UsageError, match="outside 1..6"):
        check_space({"num_moe_experts": [8]}, source)


def test_search_counts_the_moe_pattern_of_the_layers_it_keeps():
    from megatron_minitron.search import enumerate_candidates

    source = tiny_moe_config()  # MoE, dense, MoE, MoE
    space = {"num_layers": [3]}
    dense_kept = count_parameters(target_config(source, {"num_layers": 3},
                                                kept_layers=[0, 1, 2]))["total"]
    moe_kept = count_parameters(target_config(source, {"num_layers": 3},
                                              kept_layers=[0, 2, 3]))["total"]
    assert dense_kept < moe_kept
    found, _ = enumerate_candidates(source, space, moe_kept, 0.0,
                                    kept_layers=lambda n: [0, 2, 3])
    assert [c.params for c in found] == [moe_kept]
    assert found[0].config.moe_layer_freq == [1, 1, 1]


def test_search_flags_and_tables(tmp_path):
    from megatron_minitron.commands import search as command
    from megatron_minitron.search.runner import SearchSettings, write_summary

    parser = cli_parser("search")
    base = ["search", "--load", "l", "--scores", "s", "--space", "x", "--output", "o"]
    args = parser.parse_args(base + ["--active-params", "1.5M"])
    settings = command._settings(args)
    assert settings.params == 1_500_000 and settings.budget == "active"
    args = parser.parse_args(base + ["--params", "2M"])
    assert command._settings(args).budget == "total"
    with pytest.raises(SystemExit):  # one budget or the other
        parser.parse_args(base + ["--params", "2M", "--active-params", "1M"])
    with pytest.raises(UsageError, match="--active-params 'lots'"):
        command._settings(parser.parse_args(base + ["--active-params", "lots"]))
    arch = {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96,
            "num_attention_heads": 4, "num_query_groups": 2, "num_moe_experts": 4,
            "moe_ffn_hidden_size": 16, "moe_shared_expert_intermediate_size": 24}
    results = [{"name": f"c{i}", "params": 1000 + i, "active_params": 500 + i,
                "architecture": arch, "zero_shot": {"ce": 2.0 - i, "kd": 1.0},
                "checkpoint": str(tmp_path)} for i in range(2)]
    out = tmp_path / "search"
    out.mkdir()
    settings = SearchSettings(load="l", scores="s", params=500, space="x", output=str(out),
                              retrain=False, budget="active")
    summary = write_summary(settings, "500 active ±5%", results)
    assert summary["best"] == "c1"
    header = (out / "search.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("num_query_groups") + 1:][:4] == [
        "active_params", "num_moe_experts", "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size"]
    assert "active_params" in (out / "search.md").read_text()


def cli_parser(name):
    from megatron_minitron.cli import build_parser

    return build_parser(only=name)


def test_iterative_rounds_shrink_the_moe_axes(sources):
    from megatron_minitron.prune.iterative import iterative_prune, round_targets

    root, ckpt, model, cfg, scores = sources()
    target = {"num_moe_experts": 2, "moe_ffn_hidden_size": 16,
              "moe_shared_expert_intermediate_size": 24}
    steps = round_targets(cfg, target_config(cfg, target), 2)
    assert [(s["num_moe_experts"], s["moe_ffn_hidden_size"],
             s["moe_shared_expert_intermediate_size"]) for s in steps] == [(4, 24, 36),
                                                                           (2, 16, 24)]
    out = str(root / "iterative")
    paths = iterative_prune(ckpt, target, out, 2,
                            estimate=lambda path: random_scores(io.load_config(path), seed=9),
                            first_scores=scores)
    assert io.load_config(paths[0]).num_moe_experts == 4
    pruned, pruned_cfg = io.load_checkpoint(out)
    assert {k: getattr(pruned_cfg, k) for k in target} == target
    _check_counts(pruned, pruned_cfg)


def test_moe_scores_of_another_model_are_refused(sources):
    root, ckpt, model, cfg, scores = sources()
    other = random_scores(tiny_moe_config(num_moe_experts=8), seed=1)
    with pytest.raises(UsageError, match=r"'expert' have shape \[4, 8\], not \[4, 6\]"):
        prune_checkpoint(ckpt, dict(scores, expert=other["expert"]), {"num_moe_experts": 4},
                         str(root / "never"))


def test_prune_command_takes_the_moe_keys(sources, capsys):
    from megatron_minitron.cli import main

    root, ckpt, model, cfg, scores = sources()
    path, out = str(root / "scores.pt"), str(root / "cli")
    torch.save(scores, path)
    assert main(["prune", "--load", ckpt, "--scores", path, "--output", out, "--target",
                 "num_moe_experts=4,moe_ffn_hidden_size=16,"
                 "moe_shared_expert_intermediate_size=24"]) == 0
    printed = capsys.readouterr().out
    assert "experts=4 (top-2) expert_ffn=16 shared_ffn=24" in printed and "active" in printed
    pruned_cfg = io.load_config(out)
    assert (pruned_cfg.num_moe_experts, pruned_cfg.moe_ffn_hidden_size,
            pruned_cfg.moe_shared_expert_intermediate_size) == (4, 16, 24)
    assert main(["prune", "--load", ckpt, "--scores", path, "--output", str(root / "never"),
                 "--target", "num_moe_experts=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_moe_experts=1 is fewer than moe_router_topk=2" in err
    assert len(err.splitlines()) == 1 and not os.path.exists(str(root / "never"))
