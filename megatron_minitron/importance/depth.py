"""Depth importance: LM perplexity with one layer skipped, and Block Importance of every window.

Block Importance of the n layers starting at i is ``BI = 1 − E[cos(H_i, H_{i+n})]`` where ``H_j`` is
the residual stream entering layer j (``H_L`` leaves the last layer) and E runs over every token
of every calibration sample. Under pipeline parallelism a window may span stages, so each
micro-batch's boundary states are gathered over the pipeline group before the cosines are taken.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Optional

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.evaluation.lm import lm_loss
from megatron_minitron.model.forward import pipeline_forward


@contextlib.contextmanager
def skip_layer(model, global_index: int):
    """Inside the block, layer ``global_index`` passes its input through unchanged."""
    handles = []
    for layer in adapter.decoder_layers(model):
        if adapter.layer_global_index(layer) == global_index:
            def hook(module, args, kwargs, output):
                return adapter.replace_layer_output(output, adapter.layer_hidden_input(args, kwargs))
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_perplexity(model, num_layers: int, micro_batches: List[Dict[str, torch.Tensor]],
                     progress: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """[L] perplexity of the calibration LM loss with each single layer removed."""
    ppl = torch.zeros(num_layers, dtype=torch.float64)
    for index in range(num_layers):
        with skip_layer(model, index):
            loss = lm_loss(model, micro_batches)["loss"]
        ppl[index] = math.exp(min(loss, 700.0))
        if progress:
            progress()
    return ppl


class BoundaryCapture:
    """Records this stage's residual-stream boundaries of one forward pass.

    After a forward, :meth:`flush` gathers every stage's boundaries ([L+1, s, b, h] in layer
    order) and adds the token cosines of every pair (i, j) to a running [L+1, L+1] sum.
    """

    def __init__(self, model, num_layers: int):
        self.model = model
        self.num_layers = num_layers
        self.layers = adapter.decoder_layers(model)
        self.states: Dict[int, torch.Tensor] = {}
        self.cos_sum = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        self.tokens = 0
        self._handles = []

    def __enter__(self):
        for layer in self.layers:
            index = adapter.layer_global_index(layer)

            def pre_hook(module, args, kwargs, index=index):
                self.states[index] = adapter.layer_hidden_input(args, kwargs).detach().float()

            self._handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        last = self.layers[-1]
        last_index = adapter.layer_global_index(last)

        def post_hook(module, args, output):
            self.states[last_index + 1] = adapter.layer_hidden_output(output).detach().float()

        self._handles.append(last.register_forward_hook(post_hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _gathered(self) -> torch.Tensor:
        """[L+1, s, b, h] boundaries of the whole model (collective over the PP group)."""
        local_ids = sorted(self.states)
        local = torch.stack([self.states[i] for i in local_ids])
        group = adapter.get_pp_group()
        stages = parallel.group_size(group)
        if stages == 1:
            return local
        per_stage = self.num_layers // stages
        padded = torch.zeros((per_stage + 1,) + local.shape[1:], dtype=local.dtype,
                             device=local.device)
        padded[: local.shape[0]] = local
        parts = parallel.all_gather(padded, group)
        rows = [part[:per_stage] for part in parts]
        rows.append(parts[-1][per_stage:per_stage + 1])  # output of the very last layer
        return torch.cat(rows, dim=0)

    def flush(self) -> None:
        states = self._gathered()  # [L+1, s, b, h]
        self.states.clear()
        unit = torch.nn.functional.normalize(states.flatten(1, 2), dim=-1)  # [L+1, T, h]
        unit = unit.transpose(0, 1).double()  # [T, L+1, h]
        self.cos_sum += torch.bmm(unit, unit.transpose(1, 2)).sum(0).cpu()  # [L+1, L+1]
        self.tokens += unit.shape[0]

    def result(self) -> Dict[int, torch.Tensor]:
        """{n: [L − n + 1]} block importance, reduced over data parallel ranks."""
        totals = torch.cat([self.cos_sum.flatten(), torch.tensor([float(self.tokens)],
                                                                 dtype=torch.float64)])
        parallel.all_reduce(totals, group=adapter.get_dp_group())
        size = self.num_layers + 1
        mean_cos = totals[:-1].view(size, size) / totals[-1].clamp_min(1)
        return {n: torch.stack([1.0 - mean_cos[i, i + n] for i in range(self.num_layers - n + 1)])
                for n in range(1, self.num_layers + 1)}


def block_importance(model, num_layers: int, micro_batches: Iterable[Dict[str, torch.Tensor]],
                     progress: Optional[Callable[[], None]] = None) -> Dict[int, torch.Tensor]:
    """Block Importance {n: [L − n + 1]} for every window size, one micro-batch at a time."""
    with BoundaryCapture(model, num_layers) as capture:
        for batch in micro_batches:
            pipeline_forward(model, [batch], lambda out, b: {})
            capture.flush()
            if progress:
                progress()
    return capture.result()
