"""Process groups: initialisation from torchrun's environment (or one process), rank helpers
and the package's collectives.

All rank branching of the package goes through this module, and so does every
``torch.distributed`` collective: :func:`all_reduce`, :func:`all_gather`,
:func:`all_gather_into_tensor`, :func:`broadcast` and :func:`broadcast_object` take their process
group explicitly, run on the device the group's backend takes (:func:`backend_device`: CUDA for
NCCL, CPU for gloo) and give the result back on the caller's device.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode
from megatron_minitron.errors import UsageError

logger = logging.getLogger("megatron_minitron")
_ADDED_ENV: list = []  # environment variables initialize() set for a single process
_HOLD = [0]  # > 0 while held_process_group() keeps the default group across stages


@dataclass(frozen=True)
class Layout:
    """Parallel layout: tensor, pipeline and data parallel sizes, and the expert parallel size
    (mixture-of-experts layers split their experts over ``ep`` of the data parallel ranks)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}" + (f" EP={self.ep}" if self.ep > 1 else "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_layout(tp: int, pp: int, world_size: int, ep: int = 1) -> None:
    if tp < 1 or pp < 1 or ep < 1:
        raise UsageError(f"--tensor-model-parallel-size={tp}, --pipeline-model-parallel-size={pp}"
                         f" and --expert-model-parallel-size={ep} must be >= 1")
    if world_size % (tp * pp):
        raise UsageError(
            f"TP×PP={tp}×{pp} does not divide the world size {world_size}; launch a multiple of "
            f"{tp * pp} ranks with torchrun --nproc-per-node"
        )
    if (world_size // (tp * pp)) % ep:
        raise UsageError(
            f"--expert-model-parallel-size={ep} does not divide the data parallel size "
            f"{world_size // (tp * pp)} (world {world_size} / TP×PP {tp * pp}); launch a "
            f"multiple of {tp * pp * ep} ranks or lower EP")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1) -> Layout:
    """Initialises torch.distributed (gloo on CPU, NCCL on GPU) and mcore's model parallel groups.

    Works under torchrun (reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) or in a plain single
    process (a one-rank group on a free local port).
    """
    apply_cpu_patches()
    from megatron.core import parallel_state, tensor_parallel

    world_size = world_size_from_env() if not dist.is_initialized() else dist.get_world_size()
    check_layout(tp, pp, world_size, ep)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single process: a one-rank group on a free port
            single = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            os.environ.update(single)
            _ADDED_ENV.extend(single)
        backend = "gloo" if cpu_mode() else "nccl"
        if not cpu_mode():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(ps.get_tensor_model_parallel_world_size(),
                  ps.get_pipeline_model_parallel_world_size(),
                  ps.get_data_parallel_world_size(),
                  ps.get_expert_model_parallel_world_size())


def teardown() -> None:
    """Destroys mcore's groups and the default process group (kept inside
    :func:`held_process_group`, where only the model parallel groups go)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _HOLD[0]:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in _ADDED_ENV:  # child processes must not inherit a stale rendezvous
        os.environ.pop(key, None)
    _ADDED_ENV.clear()


@contextlib.contextmanager
def parallel_context(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1):
    """``with parallel_context(tp, pp) as layout:`` initialises and always tears down."""
    layout = initialize(tp, pp, seed, ep)
    try:
        yield layout
    finally:
        teardown()


@contextlib.contextmanager
def held_process_group():
    """Runs several stages (each initialising and tearing down its own layout) on one default
    process group, so ranks can meet between stages: ``with held_process_group(): ...``.

    The group is created on entry (from torchrun's environment, or a one-rank group) and
    destroyed on exit; a stage's teardown() inside only drops mcore's model parallel groups.
    """
    outer = dist.is_initialized()
    if not outer:
        initialize(1, 1)
    _HOLD[0] += 1
    try:
        yield
    finally:
        _HOLD[0] -= 1
        if not outer:
            teardown()


def rank() -> int:
    """The global rank; before the process group exists, the launcher's RANK (torchrun sets it),
    so that rank-0-only work done before ``initialize`` stays on one process."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log_rank0(msg: str, level: int = logging.INFO) -> None:
    if is_rank0():
        logger.log(level, msg)


def device() -> torch.device:
    return torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())


# ----------------------------------------------------------------------------- collectives
# ``group=None`` is the default group. Every helper is a no-op on a one-rank group (or without
# torch.distributed), so callers need no ``is_initialized()`` checks of their own.

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_size(group=None) -> int:
    """Ranks in ``group``; 1 without torch.distributed."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group=None) -> int:
    """This process's rank within ``group``; 0 without torch.distributed."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def global_rank(group, rank_in_group: int) -> int:
    """The global rank of ``group``'s member ``rank_in_group``."""
    if not dist.is_initialized() or group is None:
        return rank_in_group
    return dist.get_global_rank(group, rank_in_group)


def backend_device(group=None) -> torch.device:
    """The device ``group``'s backend takes tensors on: the current CUDA device for NCCL (which
    refuses CPU tensors), the CPU otherwise (gloo)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_backend(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` itself when the backend takes it as it is, else a contiguous copy there."""
    target = backend_device(group)
    if tensor.device == target and tensor.is_contiguous():
        return tensor
    return tensor.to(target, memory_format=torch.contiguous_format)


def _give_back(tensor: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduces ``tensor`` in place over ``group`` (``op``: sum, max or min); returns it."""
    if group_size(group) == 1:
        return tensor
    work = _on_backend(tensor, group)
    dist.all_reduce(work, op=_REDUCE_OPS[op], group=group)
    return _give_back(tensor, work)


def all_gather(tensor: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape on each), in group rank order, on its device."""
    size = group_size(group)
    if size == 1:
        return [tensor]
    work = _on_backend(tensor, group)
    parts = [torch.empty_like(work) for _ in range(size)]
    dist.all_gather(parts, work, group=group)
    return [part.to(tensor.device) for part in parts]


def all_gather_into_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``tensor`` [n, ...] stacked along dim 0 in group rank order:
    [size * n, ...] on ``tensor``'s device (one collective, no list of parts)."""
    size = group_size(group)
    if size == 1:
        return tensor
    work = _on_backend(tensor, group)
    out = torch.empty((size * work.shape[0],) + tuple(work.shape[1:]), dtype=work.dtype,
                      device=work.device)
    dist.all_gather_into_tensor(out, work, group=group)
    return out.to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrites ``tensor`` in place with global rank ``src``'s; returns it."""
    if group_size(group) == 1:
        return tensor
    work = _on_backend(tensor, group)
    dist.broadcast(work, src=src, group=group)
    return _give_back(tensor, work)


def broadcast_object(obj, src: int = 0, group=None):
    """Broadcasts a picklable object from global rank ``src`` to every rank of ``group``."""
    if not dist.is_initialized() and world_size_from_env() > 1:
        raise RuntimeError("broadcast_object called before the process group exists; "
                           "call it inside parallel.initialize()/held_process_group()")
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
