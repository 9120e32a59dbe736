"""Run directories and training checkpoints: exact resume, at the same or another layout.

A run directory ``OUT`` holds::

    OUT/run.json                        # what the run is (models, data, objective, schedule)
    OUT/log.jsonl                       # one line per step and per validation (rank 0)
    OUT/checkpoints/iter_0000100/       # a student checkpoint (loadable by every command)
        + optimizer state and projections as extra sharded tensors, extra_state.pt
    OUT/checkpoints/latest              # step of the newest complete checkpoint
    OUT/final/                          # the trained model (weights and tokenizer)

Optimizer state is saved per parameter, sharded like the parameter itself (its mcore sharded
tensor with an ``optimizer.<state>.`` key), so it reloads at any TP/PP/DP layout; with the
distributed optimizer each data parallel rank's slice is gathered first. Checkpoints are written
atomically (``checkpoint.io``); only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint.io import is_checkpoint, load_extra_state, load_sharded
from megatron_minitron.errors import UsageError

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
_ITER = re.compile(r"^iter_(\d{7})$")


def iteration_dir(output: str, step: int) -> str:
    return os.path.join(output, CHECKPOINTS, f"iter_{step:07d}")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def complete_steps(output: str) -> List[int]:
    """Steps of the complete checkpoints in ``output``, ascending."""
    folder = os.path.join(output, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        match = _ITER.match(name)
        if match and is_checkpoint(os.path.join(folder, name)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(output: str) -> Optional[int]:
    """The newest complete checkpoint's step (the ``latest`` file, checked), or None."""
    pointer = os.path.join(output, CHECKPOINTS, LATEST)
    if os.path.isfile(pointer):
        try:
            step = int(open(pointer).read().strip())
            if is_checkpoint(iteration_dir(output, step)):
                return step
        except ValueError:
            pass
    steps = complete_steps(output)
    return steps[-1] if steps else None


def _differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def check_output(output: str, identity: Dict[str, Any], resume: Optional[str]) -> Optional[int]:
    """Decides, before any heavy work, whether the run starts fresh or resumes.

    Returns the step to resume from (None: fresh start). Raises UsageError when ``output``
    holds something else, another run, or a run while ``resume`` is not asked for.
    """
    if os.path.isfile(output):
        raise UsageError(f"--output {output} is a file; pass a run directory")
    if not os.path.isdir(output) or not os.listdir(output):
        return None
    run_file = os.path.join(output, RUN_FILE)
    if not os.path.isfile(run_file):
        raise UsageError(f"--output {output} exists and is not a run directory (no {RUN_FILE}); "
                         "choose a new or empty directory")
    if resume != "auto":
        raise UsageError(f"--output {output} already holds a run; pass --resume auto to continue "
                         "it or choose a new directory")
    try:
        saved = json.load(open(run_file))["identity"]
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--resume: {run_file} is unreadable ({err})") from err
    differences = _differences(saved, json.loads(json.dumps(identity)))
    if differences:
        raise UsageError(f"--resume: {output} holds another run ({'; '.join(differences[:4])}); "
                         "re-run its own command or choose a new --output")
    return latest_step(output)


def start_run(output: str, identity: Dict[str, Any], config: Dict[str, Any],
              resume_step: Optional[int]) -> None:
    """Rank 0: writes ``run.json`` on a fresh start; drops log lines after ``resume_step``."""
    if not parallel.is_rank0():
        return
    os.makedirs(os.path.join(output, CHECKPOINTS), exist_ok=True)
    run_file = os.path.join(output, RUN_FILE)
    if not os.path.isfile(run_file):
        _write_atomic(run_file, json.dumps({"identity": identity, "config": config}, indent=2,
                                           sort_keys=True))
    log = os.path.join(output, LOG_FILE)
    if os.path.isfile(log):
        last = resume_step or 0
        kept = []
        for line in open(log):
            try:
                if json.loads(line)["step"] <= last:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by a killed job
                pass
        _write_atomic(log, "".join(kept))


# ----------------------------------------------------------------------------- sharded state


def _sharded_by_tensor(sharded: Dict[str, Any]) -> Dict[tuple, Any]:
    """(data_ptr, shape) of each sharded tensor's data → (its state dict key, itself)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    found = {}
    for key, value in sharded.items():
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and value.data is not None:
            found[(value.data.data_ptr(), tuple(value.data.shape))] = (key, value)
    return found


def projection_sharded(model) -> Dict[str, Any]:
    """The intermediate-state projections as sharded tensors (replicated over TP and DP)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    replica = (0, parallel_state.get_tensor_model_parallel_rank(),
               parallel_state.get_data_parallel_rank())
    return {f"distill.projection.{name}.weight": ShardedTensor.from_rank_offsets(
        f"distill.projection.{name}.weight", module.weight, replica_id=replica)
        for name, module in model.projections.items()}


def _full_optimizer_states(optimizer, params: List[torch.nn.Parameter]):
    """Each parameter's optimizer tensors as whole (this rank's TP/PP shard) tensors.

    Returns ``(names, {name: [tensor per param]}, step)``. With the distributed optimizer
    every data parallel rank contributes its slice (collective over DP).
    """
    entries = {id(p): (span, tensors) for p, span, tensors in adapter.optimizer_param_states(
        optimizer)}
    names = sorted({n for _, tensors in entries.values() for n in tensors if n != "step"})
    names = parallel.broadcast_object(names)
    distributed = any(span is not None for span, _ in entries.values())
    distributed = bool(_max_over_world(int(distributed)))
    step = max([int(t["step"].item()) for _, t in entries.values() if "step" in t] or [0])
    total = sum(p.numel() for p in params)
    full = {}
    for name in names:
        flat = torch.zeros(total, dtype=torch.float32, device=parallel.device())
        offset = 0
        for param in params:
            span, tensors = entries.get(id(param), (None, None))
            if tensors is not None and name in tensors:
                start, end = span if span is not None else (0, param.numel())
                flat[offset + start:offset + end] = tensors[name].detach().reshape(-1).float()
            offset += param.numel()
        if distributed:
            parallel.all_reduce(flat, group=adapter.get_dp_group())
        full[name] = list(torch.split(flat, [p.numel() for p in params]))
    return names, full, max(step, _max_over_world(step))


def _max_over_world(value: int) -> int:
    if parallel.world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=parallel.device())
    return int(parallel.all_reduce(box, "max").item())


def _params(ddp_model) -> List[torch.nn.Parameter]:
    return [p for p in ddp_model.parameters() if p.requires_grad]


def optimizer_sharded(optimizer, ddp_model, model_sharded: Dict[str, Any]):
    """(sharded tensors of the optimizer state, optimizer step) for saving."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    params = _params(ddp_model)
    names, full, step = _full_optimizer_states(optimizer, params)
    by_tensor = _sharded_by_tensor(model_sharded)
    out = {}
    for index, param in enumerate(params):
        found = by_tensor.get((param.data_ptr(), tuple(param.shape)))
        if found is None:
            raise RuntimeError(f"parameter of shape {tuple(param.shape)} has no sharded tensor")
        model_key, model_tensor = found
        for name in names:
            out[f"optimizer.{name}.{model_key}"] = make_sharded_optimizer_tensor(
                model_tensor, full[name][index].view(param.shape), f"optimizer.{name}")
    return out, step


def restore_optimizer(optimizer, ddp_model, model_sharded: Dict[str, Any], path: str,
                      step: int) -> None:
    """Loads the optimizer state saved by :func:`optimizer_sharded` (any layout)."""
    params = _params(ddp_model)
    entries = adapter.optimizer_param_states(optimizer)  # creates missing state tensors
    request, _ = optimizer_sharded(optimizer, ddp_model, model_sharded)
    for value in request.values():
        value.data = torch.empty_like(value.data)
    loaded = load_sharded(path, request)
    by_tensor = _sharded_by_tensor(model_sharded)
    for param, span, tensors in entries:
        model_key, _ = by_tensor[(param.data_ptr(), tuple(param.shape))]
        for name, target in tensors.items():
            if name == "step":
                target.fill_(step)
                continue
            full = loaded[f"optimizer.{name}.{model_key}"].reshape(-1)
            start, end = span if span is not None else (0, param.numel())
            target.copy_(full[start:end].view_as(target))
    for sub in adapter.chained_optimizers(optimizer):
        for group in getattr(sub.optimizer, "param_groups", []):
            if "step" in group:  # fused Adam keeps its step per group
                group["step"] = step
    del params


def restore_projections(model, path: str) -> None:
    request = projection_sharded(model)
    if not request:
        return
    for value in request.values():
        value.data = torch.empty_like(value.data)
    loaded = load_sharded(path, request)
    with torch.no_grad():
        for name, module in model.projections.items():
            module.weight.copy_(loaded[f"distill.projection.{name}.weight"])


def prune_checkpoints(output: str, keep: int) -> None:
    """Rank 0: deletes all but the newest ``keep`` complete checkpoints and stale temporaries."""
    if not parallel.is_rank0():
        return
    folder = os.path.join(output, CHECKPOINTS)
    for step in complete_steps(output)[:-keep]:
        shutil.rmtree(iteration_dir(output, step), ignore_errors=True)
    for name in os.listdir(folder):
        if name.endswith((".tmp", ".old")) and os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def mark_latest(output: str, step: int) -> None:
    if parallel.is_rank0():
        _write_atomic(os.path.join(output, CHECKPOINTS, LATEST), f"{step}\n")


def read_extra_state(path: str) -> Dict[str, Any]:
    state = load_extra_state(path)
    if state is None:
        raise UsageError(f"--resume: {path} has no extra_state.pt; it is not a training "
                         "checkpoint of this run")
    return state
