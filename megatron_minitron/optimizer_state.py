"""Optimizer state in checkpoints: the optimizer half of :mod:`megatron_minitron.adapter`
(the one other module that reaches into mcore's optimizer internals).

Optimizer state is saved in mcore's per-parameter ("model space") key layout: each state tensor
(``exp_avg``, ``exp_avg_sq``, the fp32 main copy ``fp32_param`` of a 16-bit parameter) is a
sharded tensor keyed ``optimizer.state.<state>.<parameter key>``, sharded like its parameter,
each rank writing the part it updates. mcore's own ``sharded_state_dict`` cannot be used as
is in 0.16 and 0.19: its model-space format for the distributed optimizer describes each data
parallel slice with ``flattened_range``, which their ShardedTensor refuses; its other formats
gather every data parallel rank's state into whole-buffer copies ("fully_reshardable") or
reload only at the same TP/PP ("dp_reshardable"); and the bf16 plain optimizer's fails on a
model with fp32 parameters (the local spec's norms). So each parameter's slice is described
here as the few contiguous boxes it covers: views of the state, no copy, no communication,
reloadable at any TP/PP/DP layout with either optimizer.
"""

from __future__ import annotations

from typing import Dict, List

import torch

_PREFIX = "optimizer.state."


def chained_optimizers(optimizer) -> List:
    """The per-dtype Megatron optimizers inside mcore's ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    return [sub.optimizer for sub in chained_optimizers(optimizer) if sub.optimizer is not None]


def _keeps_step_per_param(inner) -> bool:
    """torch's Adam keeps ``step`` per parameter; TE's and apex's fused Adam per group."""
    return type(inner).__module__.startswith("torch.optim")


def _init_optimizer_state(optimizer) -> None:
    """Creates Adam's state (zeros) where no step has made it yet."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for main in group["params"]:
                if len(inner.state[main]) == 0:
                    inner.state[main]["exp_avg"] = torch.zeros_like(main)
                    inner.state[main]["exp_avg_sq"] = torch.zeros_like(main)
                    if _keeps_step_per_param(inner):
                        inner.state[main]["step"] = torch.zeros((), dtype=torch.float32)


def optimizer_step(optimizer) -> int:
    """How many updates the optimizer has made (0 before the first)."""
    steps = [0]
    for inner in _inner_optimizers(optimizer):
        steps += [int(s["step"]) for s in inner.state.values() if "step" in s]
        steps += [int(g["step"]) for g in inner.param_groups if "step" in g]
    return max(steps)


def _set_optimizer_step(optimizer, step: int) -> None:
    for inner in _inner_optimizers(optimizer):
        if _keeps_step_per_param(inner):
            for main_state in inner.state.values():
                main_state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = step


def _is_distributed(sub) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(sub, DistributedOptimizer)


def _boxes(shape, start: int, end: int) -> List:
    """The flat range [start, end) of a row-major tensor of ``shape`` as contiguous boxes:
    ``(offset, box shape, flat start)`` each."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,) if shape else (), (end - start,) if shape else (), start)]
    inner = 1
    for size in shape[1:]:
        inner *= size
    row = start // inner
    if start % inner == 0 and end % inner == 0:
        return [((row,) + (0,) * (len(shape) - 1), (end // inner - row,) + tuple(shape[1:]),
                 start)]
    if row == (end - 1) // inner:
        return [((row,) + offset, (1,) + box, row * inner + flat)
                for offset, box, flat in _boxes(shape[1:], start - row * inner,
                                                 end - row * inner)]
    head, tail = -(-start // inner) * inner, end // inner * inner
    return _boxes(shape, start, head) + _boxes(shape, head, tail) + _boxes(shape, tail, end)


def _param_states(sub):
    """(model parameter, the flat range of it this rank updates, {state name: tensor}) for each
    parameter the Megatron optimizer ``sub`` updates; ``fp32_param`` is the fp32 main copy of a
    16-bit parameter."""
    inner = sub.optimizer
    if _is_distributed(sub):
        for model_param in sub.model_param_group_index_map:
            span = sub._get_model_param_range_map(model_param)["param"]
            states = dict(sub._get_main_param_and_optimizer_states(model_param))
            states["fp32_param"] = states.pop("param")
            yield model_param, (span.start, span.end), states
        return
    if hasattr(sub, "float16_groups"):
        pairs = [pair for model_groups, main_groups in (
            (sub.float16_groups, sub.fp32_from_float16_groups),
            (sub.fp32_from_fp32_groups, sub.fp32_from_fp32_groups))
            for model_group, main_group in zip(model_groups, main_groups)
            for pair in zip(model_group, main_group)]
    else:
        pairs = [(param, param) for group in inner.param_groups for param in group["params"]]
    for model_param, main in pairs:
        yield model_param, (0, model_param.numel()), dict(inner.state[main], fp32_param=main)


def _state_sharded(sub, model_sharded: Dict, prefix: str) -> Dict:
    """This rank's part of the optimizer state as sharded tensors (views of the state itself)
    by place: for each parameter the boxes of its flat range, keyed and sharded like it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    by_param = {id(value.data): value for value in model_sharded.values()
                if getattr(value, "data", None) is not None}
    found, distributed = {}, _is_distributed(sub)
    for number, (model_param, span, states) in enumerate(_param_states(sub)):
        sharded = by_param[id(model_param)]
        states = {name: tensor for name, tensor in states.items() if name != "step"}
        if model_param.dtype == torch.float32:
            del states["fp32_param"]  # the main copy is the parameter itself
        pieces = ([sharded] if isinstance(sharded, ShardedTensor)
                  else list(nested_values(sharded.build())))  # e.g. SwiGLU's two halves
        for index, piece in enumerate(pieces):
            if not piece.data.is_contiguous() or piece.data.untyped_storage().data_ptr() != \
                    model_param.untyped_storage().data_ptr():
                raise NotImplementedError(f"{piece.key}: its sharded tensor is not a contiguous "
                                          "part of the parameter")
            first = piece.data.storage_offset() - model_param.storage_offset()
            start = max(span[0], first) - first
            end = min(span[1], first + piece.data.numel()) - first
            prepend = piece.prepend_axis_num
            replica = piece.replica_id
            if distributed and isinstance(replica, tuple):  # each DP rank holds its own slice
                replica = (*replica[:2], 0)
            for box_index, (offset, box, flat) in enumerate(_boxes(piece.local_shape, start, end)):
                global_offset = piece.global_offset[:prepend] + tuple(
                    g + o for g, o in zip(piece.global_offset[prepend:], offset))
                begin = first + flat - span[0]
                # The stacked-layer axes become size-1 axes of the box: mcore's writer of
                # uneven shards takes the box's shape as the chunk's.
                shape = (1,) * prepend + tuple(box)
                numel = torch.Size(box).numel()
                for name, tensor in states.items():
                    data = tensor.view(-1)[begin:begin + numel].view(shape)
                    found[f"{prefix}{number}.{index}.{box_index}.{name}"] = ShardedTensor(
                        key=f"{_PREFIX}{name}.{piece.key}", data=data, dtype=data.dtype,
                        local_shape=shape, global_shape=piece.global_shape,
                        global_offset=global_offset, axis_fragmentations=None,
                        replica_id=replica)
    return found


def optimizer_state_sharded(optimizer, model_sharded: Dict) -> Dict:
    """The optimizer's state as mcore sharded tensors for saving (views of the state itself).

    ``model_sharded``: the trained modules' sharded state dict (its tensors are the
    parameters).
    """
    _init_optimizer_state(optimizer)
    out = {}
    for index, sub in enumerate(chained_optimizers(optimizer)):
        out.update(_state_sharded(sub, model_sharded, f"optimizer.{index}."))
    return out


def load_optimizer_state(optimizer, model_sharded: Dict, load, step: int) -> None:
    """Loads the state saved from :func:`optimizer_state_sharded` (at any layout).

    ``load(request)`` loads a dict of sharded tensors and returns their tensors by the same
    keys; ``step``: the optimizer's step at the save.
    """
    request = optimizer_state_sharded(optimizer, model_sharded)
    loaded = load(request)
    with torch.no_grad():
        for key, value in request.items():
            if loaded[key] is not value.data:
                value.data.copy_(loaded[key])
    _set_optimizer_step(optimizer, step)
