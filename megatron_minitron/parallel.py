"""Process groups: initialisation from torchrun's environment (or one process), rank helpers.

All rank branching of the package goes through this module.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode

logger = logging.getLogger("megatron_minitron")
_ADDED_ENV: list = []  # environment variables initialize() set for a single process
_HOLD = [0]  # > 0 while held_process_group() keeps the default group across stages


@dataclass(frozen=True)
class Layout:
    """Parallel layout: tensor, pipeline and data parallel sizes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_layout(tp: int, pp: int, world_size: int) -> None:
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size={tp} and --pipeline-model-parallel-size={pp}"
                         " must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"TP×PP={tp}×{pp} does not divide the world size {world_size}; launch a multiple of "
            f"{tp * pp} ranks with torchrun --nproc-per-node"
        )


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234) -> Layout:
    """Initialises torch.distributed (gloo on CPU, NCCL on GPU) and mcore's model parallel groups.

    Works under torchrun (reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) or in a plain single
    process (a one-rank group on a free local port).
    """
    apply_cpu_patches()
    from megatron.core import parallel_state, tensor_parallel

    world_size = world_size_from_env() if not dist.is_initialized() else dist.get_world_size()
    check_layout(tp, pp, world_size)
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
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(ps.get_tensor_model_parallel_world_size(),
                  ps.get_pipeline_model_parallel_world_size(),
                  ps.get_data_parallel_world_size())


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
def parallel_context(tp: int = 1, pp: int = 1, seed: int = 1234):
    """``with parallel_context(tp, pp) as layout:`` initialises and always tears down."""
    layout = initialize(tp, pp, seed)
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
    return dist.get_rank() if dist.is_initialized() else 0


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


def broadcast_object(obj, src: int = 0):
    """Broadcasts a picklable object from ``src`` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def device() -> torch.device:
    return torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())
