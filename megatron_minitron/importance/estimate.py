"""Importance estimation end to end: width scores, layer PPL, BI and block BI; the SCORES file.

SCORES (``torch.load``-able dict)::

    head [L, H]  query_group [L, G]  neuron [L, F]  channel [hidden]
    layer_ppl [L]  layer_bi [L]  block_bi {n: [L − n + 1]}
    meta {model, aggregation, neuron_source, num_samples, num_tokens, data_fingerprint, ...}

and for a mixture-of-experts model (definitions in ``moe.py``; dense models' files hold none)::

    expert [L, E]  expert_tokens [L, E]  expert_neuron [L, E, F_moe]  shared_neuron [L, F_shared]

Dense layers of a mixed stack hold zeros in the MoE keys, MoE layers zeros in ``neuron``
(``shared_neuron`` is [L, 0] without a shared expert).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_minitron import parallel, progress
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.importance.aggregation import Aggregation
from megatron_minitron.importance.collect import ScoreCollector
from megatron_minitron.importance.depth import block_importance, layer_perplexity, skip_layer
from megatron_minitron.importance.moe import moe_score_shapes
from megatron_minitron.model.forward import pipeline_forward

SCORE_KEYS = ("head", "query_group", "neuron", "channel", "layer_ppl", "layer_bi", "block_bi")
"""Keys of every SCORES file; a mixture-of-experts model's also hold ``moe.MOE_SCORE_KEYS``."""


@dataclass
class ImportanceConfig:
    """What to measure and how to aggregate it."""

    aggregation: str = "l2,mean"
    """BATCH,SEQ reductions, each of mean, l2, var (paper default: l2 over batch of seq mean)."""
    neuron_source: str = "fc2_input"
    """Per-neuron activation: fc2_input (default), fc1 (gate half for gated MLPs) or up."""
    depth: bool = True
    """Also compute layer_ppl (one pass per layer) and block_bi."""
    depth_samples: Optional[int] = None
    """Samples used by the depth metrics (default: all calibration samples)."""

    def __post_init__(self):
        self.agg = Aggregation.parse(self.aggregation)


def _progress(total: int, desc: str):
    return progress.bar(total=total, desc=desc, unit="batch")


def estimate_importance(model, cfg: ModelConfig, micro_batches: List[Dict[str, torch.Tensor]],
                        icfg: Optional[ImportanceConfig] = None,
                        meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Scores ``model`` on this DP rank's calibration ``micro_batches`` (collective).

    Each micro-batch holds ``tokens`` and ``labels`` [b, s]. Every rank returns the full scores.
    """
    icfg = icfg or ImportanceConfig()
    collector = ScoreCollector(model, cfg, icfg.agg, icfg.neuron_source)
    bar = _progress(len(micro_batches), "importance")
    with collector:
        for batch in micro_batches:  # one at a time so the bar moves; hooks keep no activations
            pipeline_forward(model, [batch], lambda out, b: {})
            collector.check_finite()  # one host sync per micro-batch, not one per hook
            bar.update()
    bar.close()
    scores = collector.results()
    if icfg.depth:
        depth_batches = micro_batches
        if icfg.depth_samples is not None:
            per_batch = micro_batches[0]["tokens"].shape[0]
            depth_batches = micro_batches[: max(1, icfg.depth_samples // max(per_batch, 1))]
        bar = _progress(cfg.num_layers + len(depth_batches), "depth")
        scores["layer_ppl"] = layer_perplexity(model, cfg.num_layers, depth_batches, bar.update)
        scores["block_bi"] = block_importance(model, cfg.num_layers, depth_batches, bar.update)
        bar.close()
    tokens = sum(int(b["tokens"].numel()) for b in micro_batches)
    total_tokens = parallel_sum(tokens)
    scores["meta"] = dict(meta or {}, model=cfg.to_dict(), aggregation=str(icfg.agg),
                          neuron_source=icfg.neuron_source, num_samples=scores.pop("samples"),
                          num_tokens=total_tokens)
    return scores


def parallel_sum(value: int) -> int:
    """Sum of an integer over data parallel ranks."""
    from megatron_minitron import adapter

    group = adapter.get_dp_group()
    if parallel.group_size(group) == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)  # on the host: the helper places it
    return int(parallel.all_reduce(total, group=group).item())


def importance_with_forward_loop(model, cfg: ModelConfig,
                                 forward_loop: Callable[[Any], Optional[float]],
                                 icfg: Optional[ImportanceConfig] = None) -> Dict[str, Any]:
    """The same scores on an in-memory model driven by the user's own forward loop.

    ``forward_loop(model)`` runs forward passes over the calibration data (any way it likes)
    and may return its mean LM loss; when it does, ``layer_ppl`` is computed too (the loop runs
    once more per layer with that layer skipped). ``block_bi`` needs the micro-batch API.
    """
    icfg = icfg or ImportanceConfig()
    collector = ScoreCollector(model, cfg, icfg.agg, icfg.neuron_source)
    model.eval()
    with torch.no_grad(), collector:
        base_loss = forward_loop(model)
    scores = collector.results()
    if icfg.depth and base_loss is not None:
        ppl = torch.zeros(cfg.num_layers, dtype=torch.float64)
        for index in range(cfg.num_layers):
            with torch.no_grad(), skip_layer(model, index):
                ppl[index] = float(torch.tensor(forward_loop(model)).exp())
        scores["layer_ppl"] = ppl
    scores["meta"] = dict(model=cfg.to_dict(), aggregation=str(icfg.agg),
                          neuron_source=icfg.neuron_source, num_samples=scores.pop("samples"))
    return scores


def save_scores(scores: Dict[str, Any], path: str) -> None:
    """Writes SCORES atomically (rank 0 only)."""
    if not parallel.is_rank0():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(scores, tmp)
    os.replace(tmp, path)


def load_scores(path: str, cfg: Optional[ModelConfig] = None) -> Dict[str, Any]:
    """Reads SCORES; with ``cfg``, refuses scores computed on a different architecture."""
    if not os.path.isfile(path):
        raise UsageError(f"--scores {path} does not exist; run `minitron importance` first")
    try:
        scores = torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"--scores {path} is not a scores file (write one with `minitron "
                         "importance --output SCORES`)") from err
    if not isinstance(scores, dict) or "meta" not in scores or "head" not in scores:
        raise UsageError(f"--scores {path} is not a megatron_minitron scores file")
    if cfg is not None:
        source = ModelConfig.from_dict(scores["meta"]["model"])
        fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "kv_channels", "vocab_size", "num_moe_experts",
                  "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
        diff = [f"{f}={getattr(source, f)} vs {getattr(cfg, f)}" for f in fields
                if getattr(source, f) != getattr(cfg, f)]
        if source.moe_layers() != cfg.moe_layers():
            diff.append(f"MoE layers {_layer_list(source)} vs {_layer_list(cfg)}")
        if diff:
            raise UsageError(f"--scores {path} were computed on a different model "
                             f"({', '.join(diff)}); recompute them on this checkpoint")
        _check_moe_shapes(scores, cfg, path)
    return scores


def _layer_list(cfg: ModelConfig) -> List[int]:
    return [i for i, moe in enumerate(cfg.moe_layers()) if moe]


def _check_moe_shapes(scores: Dict[str, Any], cfg: ModelConfig, path: str) -> None:
    """Every MoE key present with its shape for ``cfg`` (none needed for a dense model)."""
    for key, shape in moe_score_shapes(cfg).items():
        if key not in scores:
            raise UsageError(f"--scores {path} hold no {key!r} scores of this mixture-of-experts "
                             "model; recompute them with `minitron importance`")
        got = tuple(scores[key].shape)
        if got != shape:
            raise UsageError(f"--scores {path}: {key} has shape {list(got)}, this model needs "
                             f"{list(shape)}; recompute them on this checkpoint")


def random_scores(cfg: ModelConfig, seed: int = 0) -> Dict[str, Any]:
    """Scores drawn at random (a baseline: pruning by them picks random components).

    A mixture-of-experts model also gets ``expert`` [L, E], ``expert_tokens`` [L, E],
    ``expert_neuron`` [L, E, moe_ffn_hidden_size] and, with a shared expert, ``shared_neuron``
    [L, shared]; dense layers hold zeros in those, MoE layers zeros in ``neuron``.
    """
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    layers = cfg.num_layers
    scores = {
        "head": rand(layers, cfg.num_attention_heads),
        "query_group": rand(layers, cfg.num_query_groups),
        "neuron": rand(layers, cfg.ffn_hidden_size),
        "channel": rand(cfg.hidden_size),
        "layer_ppl": rand(layers),
        "layer_bi": rand(layers),
        "block_bi": {n: rand(layers - n + 1) for n in range(1, layers + 1)},
        "meta": {"model": cfg.to_dict(), "aggregation": "random", "seed": seed},
    }
    if cfg.is_moe:  # drawn after the dense scores, which stay those of the same seed
        moe = torch.tensor(cfg.moe_layers(), dtype=torch.float64).view(-1, 1)
        experts = cfg.num_moe_experts
        scores["neuron"] *= 1 - moe
        scores["expert"] = rand(layers, experts) * moe
        scores["expert_tokens"] = torch.floor(rand(layers, experts) * 1000) * moe
        scores["expert_neuron"] = (rand(layers, experts, cfg.moe_ffn_hidden_size)
                                   * moe.view(-1, 1, 1))
        if cfg.moe_shared_expert_intermediate_size is not None:
            scores["shared_neuron"] = rand(layers, cfg.moe_shared_expert_intermediate_size) * moe
    return scores
