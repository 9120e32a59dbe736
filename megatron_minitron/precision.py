"""Weight precision of a run (``--precision``) and the GPU features a run may switch on.

    dtype = params_dtype("auto")        # bf16 on a CUDA machine, fp32 on CPU

Weights are held in the chosen dtype; every score, loss and count is still accumulated in
fp32/fp64 by the code that computes it. This module imports no Megatron-Core, so commands call
it while checking their arguments, before any heavy work.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from megatron_minitron.compat.cpu import cpu_mode
from megatron_minitron.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Names accepted by ``--precision`` of the inference commands (importance, eval, prune)."""
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
"""Names accepted for training (fp16 would need loss scaling, which the trainer does not do)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str) -> str:
    """``auto`` → ``bf16`` on a CUDA machine, ``fp32`` on CPU; other names unchanged."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp32" if cpu_mode() else "bf16"
    return precision


def params_dtype(precision: str) -> torch.dtype:
    """The torch dtype the weights are built and loaded in for ``--precision``."""
    return DTYPES[resolve(precision)]


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (alias ``--dtype``) of the commands that load a checkpoint to read it."""
    parser.add_argument("--precision", "--dtype", dest="precision", default="auto",
                        choices=PRECISIONS,
                        help="dtype the weights are loaded in: auto (bf16 on GPU, fp32 on CPU), "
                             "fp32, bf16 or fp16; scores and losses accumulate in fp32/fp64 "
                             "either way (default auto)")


def gpu_fields(cfg, params_dtype: torch.dtype, training: bool = False, dp: int = 1, **flags):
    """``(TransformerConfig fields, DDP config fields)`` for a model of architecture ``cfg`` on
    this machine: :func:`megatron_minitron.adapter.gpu_features` with the kernels that import
    here and the run's ``flags`` (sequence_parallel, recompute, overlap_*). Empty on CPU."""
    from megatron_minitron import adapter

    return adapter.gpu_features(
        cfg, gpu=not cpu_mode(), te=adapter.te_available(), apex=apex_importable(),
        flash_attn=flash_attn_importable(), params_dtype=params_dtype, training=training,
        distributed_optimizer=dp > 1, **flags)


def apex_importable() -> bool:
    """True when NVIDIA apex's CUDA extensions import (the fused weight-gradient GEMM and the
    persistent LayerNorm kernels). The unrelated ``apex`` package of the Python package index
    has neither."""
    if cpu_mode():
        return False
    return all(importlib.util.find_spec(name) is not None
               for name in ("fused_weight_gradient_mlp_cuda", "fast_layer_norm"))


def flash_attn_importable() -> bool:
    return not cpu_mode() and importlib.util.find_spec("flash_attn") is not None
