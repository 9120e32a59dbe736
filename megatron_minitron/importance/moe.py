"""Mixture-of-experts scores: experts, their neurons and the shared expert's neurons.

Scores (aggregated as every other score: a reduction over each sample, then over samples, see
``aggregation.py``):

* ``expert_tokens`` [L, E]: tokens routed to each expert over the calibration set (each token
  counts once per expert among its top-k);
* ``expert`` [L, E]: the expert's router-probability-weighted output norm. Token t's value is
  ``p(t, e) · ‖E_e(x_t)‖₂`` (the norm of what the expert adds to the token's MoE output; mcore
  applies the probability to the expert's ``linear_fc2`` input, so this is the norm of the
  expert's output as mcore computes it), and 0 on tokens not routed to the expert (it adds
  nothing to them). Each sample is reduced over all its tokens, so a busier expert scores
  higher and an expert never routed to scores exactly 0;
* ``expert_neuron`` [L, E, F_moe]: magnitude of the neuron's activation at the expert's
  ``linear_fc2`` input (``neuron_source`` fc2_input: act(x·W_gateᵀ)·(x·W_upᵀ)·p(t, e), the
  router probability included as mcore applies it; fc1 / up: that half of the expert's first
  linear output, without it), over the tokens routed to the expert only: each sample is
  reduced over its own routed tokens, and samples that route none to the expert are left out
  of its reduction over samples (an expert never routed to scores 0);
* ``shared_neuron`` [L, F_shared]: the shared expert's neurons, as a dense MLP's (every token;
  the shared expert's gate acts after ``linear_fc2`` and is not part of it).

Dense layers of a mixed stack hold zeros in these keys (and MoE layers hold zeros in the dense
``neuron`` key).

Routed tokens reach the experts permuted (sorted by expert, across ranks). Their sample ids are
recovered exactly: the router's probabilities and routing map (original token order) are
gathered over the expert parallel group, and the dispatcher lays each local expert's tokens out
as chunks, one per (expert tensor parallel rank, expert parallel rank) that sent them, each in
ascending token order (``adapter.moe_token_sources``); the probabilities that arrive with the
tokens are checked against the gathered ones. Without sequence parallelism the tensor parallel
ranks hold the same tokens, which reach an expert once per expert tensor parallel rank; only the
first copy is scored. The per-sample reductions are therefore the same at every layout.

Under expert parallelism (EP > 1) mcore's all-to-all token dispatcher moves the tokens (it runs
on gloo too); at EP = 1 its all-gather dispatcher does. An expert's statistics cover the samples
of every rank of its expert parallel group (they are data parallel ranks with different data);
they are merged over the expert data parallel group (ranks holding the same experts, seeing the
other samples) and gathered over the expert parallel group, so every rank ends with every
expert. Expert outputs are partial sums over the expert tensor parallel group until mcore's
combine step; they are summed over it before their norm is taken. Token counts come from each
rank's own routing map and are summed over the data parallel group.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.importance.aggregation import Aggregation, StreamingStat, reduce_routed

MOE_SCORE_KEYS = ("expert", "expert_tokens", "expert_neuron", "shared_neuron")


def moe_score_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """Shape of each MoE key of a SCORES file for ``cfg`` ({} for a dense model)."""
    if not cfg.is_moe:
        return {}
    layers, experts = cfg.num_layers, cfg.num_moe_experts
    return {"expert": (layers, experts), "expert_tokens": (layers, experts),
            "expert_neuron": (layers, experts, cfg.moe_ffn_hidden_size),
            "shared_neuron": (layers, cfg.moe_shared_expert_intermediate_size or 0)}


class TokenOrderError(RuntimeError):
    """The dispatched tokens are not in the order ``adapter.moe_token_sources`` describes."""


class ExpertCollector:
    """This rank's MoE statistics; used by :class:`ScoreCollector` (which owns the hooks'
    life time and the finite checks)."""

    def __init__(self, cfg: ModelConfig, agg: Aggregation, neuron_source: str, device,
                 record: Callable[[torch.Tensor, int, str], None]):
        self.cfg, self.agg, self.neuron_source, self.device = cfg, agg, neuron_source, device
        self.record = record
        self.ep = parallel.group_size(adapter.expert_parallel_group())
        self.etp = parallel.group_size(adapter.expert_tensor_parallel_group())
        self.tp = adapter.parallel_state.get_tensor_model_parallel_world_size()
        self.local_count = cfg.num_moe_experts // self.ep
        self.ffn_local = cfg.moe_ffn_hidden_size // self.etp
        self.shared_local = (cfg.moe_shared_expert_intermediate_size or 0) // self.tp
        self.tokens: Dict[int, torch.Tensor] = {}
        self.expert: Dict[int, StreamingStat] = {}
        self.neuron: Dict[int, List[StreamingStat]] = {}
        self.shared: Dict[int, StreamingStat] = {}
        self._routing: Dict[int, tuple] = {}
        self._rows: Dict[int, Dict[int, torch.Tensor]] = {}

    # ------------------------------------------------------------------ hooks

    def register(self, layer, index: int, add: Callable) -> Optional[torch.nn.Module]:
        """Registers the hooks of MoE ``layer`` (global ``index``) through ``add(handle)``;
        returns the shared expert (or None) for the caller to hook as a dense MLP."""
        stat = lambda n: StreamingStat(n, self.agg, self.device)  # noqa: E731
        self.tokens[index] = torch.zeros(self.cfg.num_moe_experts, dtype=torch.float64,
                                         device=self.device)
        self.expert[index] = stat(self.local_count)
        self.neuron[index] = [stat(self.ffn_local) for _ in range(self.local_count)]
        self._rows[index] = {}
        add(adapter.moe_router(layer).register_forward_hook(self._router_hook(index)))
        for local, expert in enumerate(adapter.local_experts(layer)):
            if self.neuron_source == "fc2_input":
                add(expert.linear_fc2.register_forward_pre_hook(self._fc2_rows_hook(index, local)))
            else:
                add(expert.linear_fc1.register_forward_hook(self._fc1_rows_hook(index, local)))
        add(adapter.routed_experts(layer).register_forward_hook(self._experts_hook(layer, index)))
        shared = adapter.shared_expert(layer)
        if shared is not None:
            self.shared[index] = stat(self.shared_local)
        return shared

    def _router_hook(self, index):
        def hook(module, args, output):
            hidden = args[0]  # [s, b, h]: token t of the routing map is (t // b, t % b)
            probs, routing_map = (t.detach() for t in output[:2])  # [s*b, E] each
            self.tokens[index] += routing_map.sum(dim=0).double()
            group = adapter.expert_parallel_group()
            if self.ep > 1:
                shape = torch.tensor([float(hidden.shape[0]), float(hidden.shape[1])],
                                     dtype=torch.float64, device=probs.device)
                if any(not torch.equal(s, shape) for s in parallel.all_gather(shape, group)):
                    raise UsageError("expert parallel ranks ran micro-batches of different "
                                     "shapes; give every data parallel rank the same micro-batch "
                                     "size and sequence length")
            packed = torch.cat([probs.float(), routing_map.float()], dim=1)
            parts = torch.stack(parallel.all_gather(packed, group))  # [ep, s*b, 2E]
            experts = probs.shape[1]
            self._routing[index] = (hidden.shape[0], hidden.shape[1], parts[..., :experts],
                                    parts[..., experts:] > 0.5)
        return hook

    def _fc2_rows_hook(self, index, local):
        def hook(module, args):
            self._rows[index][local] = args[0].detach()  # [n, ffn_local], probabilities applied
        return hook

    def _fc1_rows_hook(self, index, local):
        half = 0 if self.neuron_source == "fc1" else 1

        def hook(module, args, output):
            values = adapter.linear_output(output).detach()
            if self.cfg.gated:
                values = values.chunk(2, dim=-1)[half]
            self._rows[index][local] = values
        return hook

    def _experts_hook(self, layer, index):
        sources = adapter.moe_token_sources(layer)

        def hook(module, args, output):
            per_expert = [int(n) for n in args[1].tolist()]  # tokens of each local expert
            arrived_probs = args[2].detach()
            out = adapter.linear_output(output).detach().float()
            if self.etp > 1:  # partial sums over the expert tensor parallel group until combine
                out = parallel.all_reduce(out.clone(), group=adapter.expert_tensor_parallel_group())
            self.record(out, index, "MLP")
            norms = torch.linalg.vector_norm(out, dim=-1)  # [N] = p · ‖E(x)‖
            seq, batch, probs, routing_map = self._routing.pop(index)
            num_samples = self.ep * batch
            rows = self._rows[index]
            expert_samples = torch.zeros(num_samples, self.local_count, dtype=torch.float64,
                                         device=out.device)
            start = 0
            for local in range(self.local_count):
                expert_id = adapter.expert_parallel_rank() * self.local_count + local
                keep, sample = self._first_copy(sources, routing_map, probs, arrived_probs,
                                                expert_id, start, per_expert[local], batch)
                reduced, _ = reduce_routed(norms[keep], sample, num_samples, self.agg.seq,
                                           seq_length=seq)
                expert_samples[:, local] = reduced[:, 0]
                acts = rows.pop(local, None)
                if acts is not None and keep.numel():
                    self.record(acts, index, "MLP")
                    reduced, tokens = reduce_routed(acts[keep - start], sample, num_samples,
                                                    self.agg.seq, magnitude=True)
                    self.neuron[index][local].update_samples(reduced[tokens > 0])
                start += per_expert[local]
            rows.clear()
            self.expert[index].update_samples(expert_samples)
        return hook

    @staticmethod
    def _first_copy(sources, routing_map, probs, arrived_probs, expert_id, start, count, batch):
        """Rows (absolute positions) of the first copy of each routed token of ``expert_id``
        among its ``count`` dispatched rows from ``start``, and each one's sample id
        (source expert parallel rank × batch + its column in the micro-batch)."""
        keep, sample, expected = [], [], []
        position, seen = start, set()
        for source in sources:
            tokens = routing_map[source, :, expert_id].nonzero().squeeze(1)  # ascending
            if source not in seen:
                seen.add(source)
                keep.append(torch.arange(position, position + tokens.numel(),
                                         device=tokens.device))
                sample.append(source * batch + tokens % batch)
                expected.append(probs[source, tokens, expert_id])
            position += tokens.numel()
        if position != start + count:
            raise TokenOrderError(f"expert {expert_id} received {count} tokens; the routing maps "
                                  f"route {position - start} to it")
        keep, sample, expected = torch.cat(keep), torch.cat(sample), torch.cat(expected)
        expected = expected.to(arrived_probs.dtype).float()  # as the dispatcher sent them
        if not torch.allclose(arrived_probs[keep].float(), expected, rtol=1e-6, atol=1e-7):
            raise TokenOrderError(f"expert {expert_id}: the dispatched tokens are not in the "
                                  "order adapter.moe_token_sources describes")
        return keep, sample

    # ------------------------------------------------------------------ results

    def results(self, indices: List[int], shared_rows: Optional[torch.Tensor]) -> Dict:
        """This stage's rows [L_local, ...] of every MoE key (collective); ``shared_rows``:
        the shared expert's merged and TP-gathered neuron scores [L_local, F_shared]."""
        edp = adapter.expert_data_parallel_group()
        experts, neurons = [], []
        for index in indices:
            if index not in self.expert:
                experts.append(torch.zeros(self.local_count, dtype=torch.float64,
                                           device=self.device))
                neurons.append(torch.zeros(self.local_count, self.ffn_local, dtype=torch.float64,
                                           device=self.device))
                continue
            self.expert[index].all_merge(edp)
            experts.append(self.expert[index].result())
            for stat in self.neuron[index]:
                stat.all_merge(edp)
            neurons.append(torch.stack([stat.result() for stat in self.neuron[index]]))
        ep_group = adapter.expert_parallel_group()
        expert = torch.cat(parallel.all_gather(torch.stack(experts), ep_group), dim=1)
        neuron = torch.cat(parallel.all_gather(torch.stack(neurons), ep_group), dim=1)
        neuron = torch.cat(parallel.all_gather(neuron, adapter.expert_tensor_parallel_group()),
                           dim=2)
        tokens = torch.stack([self.tokens.get(i, torch.zeros(self.cfg.num_moe_experts,
                                                             dtype=torch.float64,
                                                             device=self.device))
                              for i in indices])
        parallel.all_reduce(tokens, group=adapter.get_dp_group())
        return {"expert": expert, "expert_tokens": tokens, "expert_neuron": neuron,
                "shared_neuron": shared_rows}
