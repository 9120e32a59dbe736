"""Run directories and training checkpoints: exact resume, at the same or another layout.

A run directory ``OUT`` holds::

    OUT/run.json                        # what the run is (models, data, objective, schedule)
    OUT/log.jsonl                       # one line per step and per validation (rank 0)
    OUT/checkpoints/iter_0000100/       # a student checkpoint (loadable by every command)
        + optimizer state and projections as extra sharded tensors, extra_state.pt
    OUT/checkpoints/latest              # step of the newest complete checkpoint
    OUT/final/                          # the trained model (weights and tokenizer)

Optimizer state is in mcore's per-parameter layout (see ``adapter``): each state tensor is
sharded like its parameter under an ``optimizer.state.<state>.`` key, each rank writes its own
part (with the distributed optimizer, its data parallel slice) without gathering or copying, and
it reloads at any TP/PP/DP layout with either optimizer. Checkpoints are written atomically
(``checkpoint.io``); only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import torch

from megatron_minitron import optimizer_state, parallel
from megatron_minitron.checkpoint.io import is_checkpoint, load_extra_state, load_sharded
from megatron_minitron.errors import UsageError

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
_ITER = re.compile(r"^iter_(\d{7})$")
OPTIMIZER_FORMAT = 2
"""``extra_state["optimizer_format"]`` of checkpoints holding mcore's sharded optimizer state;
earlier checkpoints have none and resume from their weights only."""


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
    step = latest_step(output)
    if step is not None:
        _check_optimizer_format(iteration_dir(output, step))
        return step
    return finished_step(output)


def finished_step(output: str) -> Optional[int]:
    """The step of the run's final model (a finished run whose training checkpoints were
    dropped), or None."""
    from megatron_minitron.checkpoint.io import is_checkpoint, read_checkpoint_info

    final = os.path.join(output, FINAL)
    if not is_checkpoint(final):
        return None
    step = read_checkpoint_info(final).get("meta", {}).get("step")
    return int(step) if step else None


def drop_training_checkpoints(output: str) -> None:
    """Rank 0, after the final model is written: deletes OUTPUT/checkpoints (weights and
    optimizer state of the last steps)."""
    if parallel.is_rank0():
        shutil.rmtree(os.path.join(output, CHECKPOINTS), ignore_errors=True)


def _check_optimizer_format(path: str) -> None:
    extra = load_extra_state(path)
    if extra is not None and extra.get("optimizer_format") != OPTIMIZER_FORMAT:
        raise UsageError(f"--resume: {path} holds optimizer state in an earlier format that "
                         "cannot be resumed; resume from its model weights only: start a new "
                         f"run with --student {path} and another --output")


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


def projection_sharded(model) -> Dict[str, Any]:
    """The intermediate-state projections as sharded tensors (replicated over TP and DP)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    replica = (0, parallel_state.get_tensor_model_parallel_rank(),
               parallel_state.get_data_parallel_rank())
    return {f"distill.projection.{name}.weight": ShardedTensor.from_rank_offsets(
        f"distill.projection.{name}.weight", module.weight, replica_id=replica)
        for name, module in model.projections.items()}


def optimizer_sharded(optimizer, model_sharded: Dict[str, Any]):
    """(sharded tensors of the optimizer state, optimizer step) for saving.

    ``model_sharded``: the sharded state dict of everything trained (student and projections).
    """
    return (optimizer_state.optimizer_state_sharded(optimizer, model_sharded),
            optimizer_state.optimizer_step(optimizer))


def restore_optimizer(optimizer, model_sharded: Dict[str, Any], path: str, step: int) -> None:
    """Loads the optimizer state saved by :func:`optimizer_sharded` (any layout, either
    optimizer) and sets its ``step``."""
    optimizer_state.load_optimizer_state(optimizer, model_sharded,
                                 lambda request: load_sharded(path, request), step)


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
