"""Runs a function on N spawned CPU ranks (gloo), the way torchrun would."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from megatron_minitron.parallel import free_port


PRELOAD = ["torch", "megatron_minitron.adapter", "megatron_minitron.distill.trainer",
           "megatron_minitron.importance.estimate"]
"""Imported once by the fork server; each rank starts as a fork of it (seconds saved per rank)."""


def _context():
    """The fork server context with the package preloaded (spawn where there is no fork)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _entry(local_rank, world_size, port, fn, args, error_queue, environ):
    os.environ.clear()  # the fork server's environment is the one it started with: use ours
    os.environ.update(environ)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        error_queue.put(f"rank {local_rank}:\n{traceback.format_exc()}")
        raise
    finally:
        from megatron_minitron import parallel

        parallel.teardown()


def spawn(fn, world_size: int, *args) -> None:
    """Calls ``fn(*args)`` on ``world_size`` processes; re-raises the first rank's failure.

    ``fn`` must be importable (module level). Each process gets torchrun-style environment
    variables, so ``megatron_minitron.parallel.initialize`` joins the group.
    """
    ctx = _context()
    errors = ctx.SimpleQueue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors, environ))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=600)
    if not errors.empty():
        raise RuntimeError(errors.get())
    for rank, proc in enumerate(procs):
        if proc.exitcode != 0:
            raise RuntimeError(f"rank {rank} exited with code {proc.exitcode}")
