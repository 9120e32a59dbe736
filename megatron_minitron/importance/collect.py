"""Forward hooks that score heads, query groups, MLP neurons, embedding channels and layers (BI).

Hooks reduce each activation to per-sample statistics at once and keep no activations. They are
registered by :class:`ScoreCollector` as a context manager and always removed on exit.

Per-token values scored (before aggregation, see ``aggregation.py``):

* head: L2 norm over the head's ``kv_channels`` of its attention output (the input of the
  attention output projection), [s, b, heads];
* query group: L2 norm over all channels of the group's heads (= sqrt of the sum of its heads'
  squared norms), [s, b, groups];
* neuron (``neuron_source``): ``fc2_input`` (default) — magnitude of the input of the second MLP
  linear, i.e. act(x·W_gateᵀ)·(x·W_upᵀ) for SwiGLU and act(x·W1ᵀ) otherwise; ``fc1`` — magnitude of
  the first linear's output row x·W1ᵀ (for gated MLPs the gate half x·W_gateᵀ, the paper's X·W1ᵀ);
  ``up`` — magnitude of the up half x·W_upᵀ (gated only);
* channel: magnitude of every LayerNorm/RMSNorm output (input, pre-MLP and final norms), whose
  aggregated scores are summed over norms;
* layer BI: per-token cosine between a layer's input and output residual streams.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.importance.aggregation import Aggregation, StreamingStat
from megatron_minitron.importance.moe import ExpertCollector

NEURON_SOURCES = ("fc2_input", "fc1", "up")
ACTIVATION_KINDS = ("norm", "attention head", "MLP", "residual stream")  # in forward order


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity over the last dimension (``F.cosine_similarity``'s definition, each
    norm clamped at ``eps``), in half its CPU time."""
    norms = (torch.linalg.vector_norm(a, dim=-1).clamp_min(eps)
             * torch.linalg.vector_norm(b, dim=-1).clamp_min(eps))
    return torch.linalg.vecdot(a, b, dim=-1) / norms


class NonFiniteActivation(UsageError):
    """NaN/Inf met in an activation during calibration."""


class FiniteFlags:
    """Whether every activation seen so far was finite, per (layer, kind), kept on the device:
    hooks only ``and`` into it, and :meth:`check` reads it (one host sync) once per batch."""

    def __init__(self, layers: List[int], device):
        self.layers = list(layers)
        self.row = {layer: row for row, layer in enumerate(self.layers)}
        self.flags = torch.ones((len(self.layers), len(ACTIVATION_KINDS)), dtype=torch.bool,
                                device=device)

    def record(self, values: torch.Tensor, layer: int, kind: str) -> None:
        self.flags[self.row[layer], ACTIVATION_KINDS.index(kind)].logical_and_(
            torch.isfinite(values).all())

    def check(self) -> None:
        """Raises :class:`NonFiniteActivation` naming the first (layer, kind) that met NaN/Inf."""
        if bool(self.flags.all()):
            return
        row, kind = (~self.flags).nonzero()[0].tolist()
        raise NonFiniteActivation(
            f"non-finite (NaN/Inf) {ACTIVATION_KINDS[kind]} activations in layer "
            f"{self.layers[row]}; check the checkpoint weights and calibration data "
            "(or run in fp32)")


class ScoreCollector:
    """Collects this rank's width scores and layer BI over every forward run inside ``with``."""

    def __init__(self, model, cfg: ModelConfig, agg: Aggregation,
                 neuron_source: str = "fc2_input"):
        if neuron_source not in NEURON_SOURCES:
            raise UsageError(f"unknown neuron source {neuron_source!r}; use one of "
                             f"{', '.join(NEURON_SOURCES)}")
        if neuron_source == "up" and not cfg.gated:
            raise UsageError("neuron source 'up' needs a gated MLP (activation=swiglu)")
        tp = adapter.parallel_state.get_tensor_model_parallel_world_size()
        self.model, self.cfg, self.agg, self.neuron_source = model, cfg, agg, neuron_source
        self.heads_local = cfg.num_attention_heads // tp
        self.groups_local = cfg.num_query_groups // tp
        self.ffn_local = cfg.ffn_hidden_size // tp
        self.layers = adapter.decoder_layers(model)
        self.indices = [adapter.layer_global_index(layer) for layer in self.layers]
        self.device = device = next(model.parameters()).device
        stat = lambda n: StreamingStat(n, agg, device)  # noqa: E731
        self.head = {i: stat(self.heads_local) for i in self.indices}
        self.group = {i: stat(self.groups_local) for i in self.indices}
        self.neuron = {i: stat(self.ffn_local) for i in self.indices}
        self.norm_stats: List[StreamingStat] = []
        self.bi_sum = {i: torch.zeros((), dtype=torch.float64, device=device) for i in self.indices}
        self.bi_count = {i: 0 for i in self.indices}
        self.finite = FiniteFlags(self.indices + [cfg.num_layers], device)  # + the final norm
        self.moe = (ExpertCollector(cfg, agg, neuron_source, device, self.finite.record)
                    if cfg.is_moe else None)
        self._handles = []

    # ------------------------------------------------------------------ hooks

    def _attention_hook(self, index):
        d = self.cfg.kv_channels

        def hook(module, args):
            out = args[0].detach()  # [s, b, heads_local * d]
            s, b = out.shape[:2]
            norms = torch.linalg.vector_norm(out.view(s, b, self.heads_local, d).float(),
                                             dim=-1)  # [s, b, heads_local]
            self.finite.record(self.head[index].update(norms), index, "attention head")
            grouped = torch.linalg.vector_norm(norms.view(s, b, self.groups_local, -1),
                                               dim=-1)  # [s, b, groups_local]
            self.group[index].update(grouped)
        return hook

    def _fc2_input_hook(self, stat, index):
        def hook(module, args):
            values = args[0].detach()  # [s, b, ffn_local]
            self.finite.record(stat.update(values, magnitude=True), index, "MLP")
        return hook

    def _fc1_output_hook(self, stat, index):
        half = 0 if self.neuron_source == "fc1" else 1

        def hook(module, args, output):
            values = adapter.linear_output(output).detach()  # [s, b, (2×) ffn_local]
            if self.cfg.gated:
                values = values.chunk(2, dim=-1)[half]  # mcore fc1 shard = [gate_local; up_local]
            self.finite.record(stat.update(values, magnitude=True), index, "MLP")
        return hook

    def _mlp_hook(self, fc1, fc2, stat, index):
        """Hooks the MLP with linears ``fc1``, ``fc2`` (dense, or a shared expert) into
        ``stat``; returns the handle."""
        if self.neuron_source == "fc2_input":
            return fc2.register_forward_pre_hook(self._fc2_input_hook(stat, index))
        return fc1.register_forward_hook(self._fc1_output_hook(stat, index))

    def _norm_hook(self, index):
        stat = StreamingStat(self.cfg.hidden_size, self.agg, self.device)
        self.norm_stats.append(stat)

        def hook(module, args, output):
            values = output.detach()  # [s, b, h]
            self.finite.record(stat.update(values, magnitude=True), index, "norm")
        return hook

    def _layer_hook(self, index):
        def hook(module, args, kwargs, output):
            x_in = adapter.layer_hidden_input(args, kwargs).detach()  # [s, b, h]
            x_out = adapter.layer_hidden_output(output).detach()
            cos = cosine(x_in.float(), x_out.float())
            self.finite.record(cos, index, "residual stream")
            self.bi_sum[index] += cos.double().sum()
            self.bi_count[index] += cos.numel()
        return hook

    def __enter__(self):
        for layer, index in zip(self.layers, self.indices):
            add = self._handles.append
            add(adapter.attention_output_projection(layer).register_forward_pre_hook(
                self._attention_hook(index)))
            if self.moe is not None and adapter.is_moe_layer(layer):
                shared = self.moe.register(layer, index, add)
                if shared is not None:
                    add(self._mlp_hook(shared.linear_fc1, shared.linear_fc2,
                                       self.moe.shared[index], index))
            else:
                add(self._mlp_hook(adapter.mlp_fc1(layer), adapter.mlp_fc2(layer),
                                   self.neuron[index], index))
            for norm in adapter.layer_norms(layer):  # standalone or fused into the next linear
                add(norm.register_output_hook(self._norm_hook(index)))
            add(layer.register_forward_hook(self._layer_hook(index), with_kwargs=True))
        final = adapter.final_norm(self.model)
        if final is not None:
            self._handles.append(final.register_output_hook(self._norm_hook(self.cfg.num_layers)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    # ------------------------------------------------------------------ results

    def check_finite(self) -> None:
        """Raises :class:`NonFiniteActivation` if any hooked activation so far held NaN/Inf
        (one host sync: call it once per batch, not per hook)."""
        self.finite.check()

    def results(self) -> Dict[str, torch.Tensor]:
        """Merges over DP, gathers over TP and PP; returns full-model scores on every rank.

        Keys: head [L, H], query_group [L, G], neuron [L, F], channel [h], layer_bi [L],
        and ``samples`` (number of calibration samples seen, over all DP ranks); for a
        mixture-of-experts model also expert [L, E], expert_tokens [L, E], expert_neuron
        [L, E, F_moe] and shared_neuron [L, F_shared] (see ``moe.py``).
        """
        self.check_finite()
        dp_group = adapter.get_dp_group()
        rows = {}
        for name, stats in (("head", self.head), ("query_group", self.group),
                            ("neuron", self.neuron)):
            for stat in stats.values():
                stat.all_merge(dp_group)
            local = torch.stack([stats[i].result() for i in self.indices])  # [L_local, c_local]
            rows[name] = _gather_tp(local)
        for stat in self.norm_stats:
            stat.all_merge(dp_group)
        channel = torch.zeros(self.cfg.hidden_size, dtype=torch.float64,
                              device=self.device)
        for stat in self.norm_stats:
            channel += stat.result()
        bi = torch.stack([torch.stack([self.bi_sum[i], torch.tensor(
            float(self.bi_count[i]), dtype=torch.float64, device=channel.device)])
            for i in self.indices])  # [L_local, 2]
        samples = torch.tensor(float(self.head[self.indices[0]].count), dtype=torch.float64,
                               device=channel.device)
        parallel.all_reduce(bi, group=dp_group)
        parallel.all_reduce(channel, group=adapter.get_pp_group())
        rows["layer_bi"] = 1.0 - bi[:, 0] / bi[:, 1].clamp_min(1)
        if self.moe is not None:
            shared = []
            for i in self.indices:
                stat = self.moe.shared.get(i)
                if stat is None:
                    shared.append(torch.zeros(self.moe.shared_local, dtype=torch.float64,
                                              device=self.device))
                else:
                    stat.all_merge(dp_group)
                    shared.append(stat.result())
            shared = torch.stack(shared)  # [L_local, F_shared / tp]
            rows.update(self.moe.results(self.indices,
                                         _gather_tp(shared) if shared.shape[1] else shared))
        out = {name: _gather_pp(tensor) for name, tensor in rows.items()}
        out["channel"] = channel.cpu()
        out["samples"] = int(samples.item())
        return out


def _gather_tp(local: torch.Tensor) -> torch.Tensor:
    """[L_local, c/tp] on each TP rank → [L_local, c] (TP ranks hold contiguous slices)."""
    group = adapter.get_tp_group()
    if parallel.group_size(group) == 1:
        return local
    return torch.cat(parallel.all_gather(local, group), dim=-1)


def _gather_pp(local: torch.Tensor) -> torch.Tensor:
    """[L_local, ...] on each stage → [L, ...] in stage order (stages hold equal layer counts)."""
    return torch.cat(parallel.all_gather(local, adapter.get_pp_group()), dim=0).cpu()
