"""Makes Megatron-Core run on CPU (gloo) when CUDA is absent; does nothing otherwise.

This is the only module of the package that changes mcore behaviour. Every patch is guarded by
``torch.cuda.is_available()`` and applied once by :func:`apply_cpu_patches`.

What it does on a CUDA-less machine:

* replaces mcore 0.19's one triton-importing MoE module when triton is absent;
* ``torch.cuda.current_device`` returns ``"cpu"``; ``current_stream``/``synchronize``, and the
  streams and events the MoE token dispatchers make, are no-ops, so mcore's ``device=torch.cuda.current_device()`` allocations land on the CPU;
* the CUDA RNG tracker (``megatron.core.tensor_parallel.random``) is backed by CPU generator states;
* ``get_default_causal_mask`` (which hard-codes ``device="cuda"``) builds its mask on the CPU;
* mcore's unfused RoPE computes cos and sin once per frequency tensor, not per layer, and
  skips concatenating an empty pass-through part (a copy of the queries and keys);
* mcore 0.16's MoE router finds ``te_general_gemm`` (None: its torch path) without TE, and the
  all-to-all token dispatcher gets its split sizes as numpy arrays (mcore converts CUDA
  tensors only);
* :func:`cuda_to_cpu` is a ``TorchFunctionMode`` that maps literal ``device="cuda"`` and
  ``.cuda()`` calls (mcore's DDP, optimizer and pipeline schedules) onto the CPU, and makes
  ``tensor.type()`` name CPU tensors as their CUDA kind (``"torch.cuda.FloatTensor"``), which
  mcore's optimizers and gradient clipping assert.

Separately, :func:`tune_allocator` (called by the ``minitron`` command and the benchmarks, not at
import) keeps freed memory in the process on CPU runs instead of handing it back to the system.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import importlib.machinery
import importlib.util
import sys
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def cpu_mode() -> bool:
    """True when the patches act (no CUDA device)."""
    return not torch.cuda.is_available()


def _stub_paged_stash() -> None:
    """mcore 0.19 imports ``triton`` in one MoE module at package import; triton is absent on CPU
    builds and the module (paged activation stashing for MoE on GPU) is unused by dense models,
    so a stand-in that names its exports is registered first. Harmless where it does not exist."""
    if importlib.util.find_spec("triton") is not None:
        return
    name = "megatron.core.transformer.moe.ops.paged_stash"

    def _needs_gpu(*args, **kwargs):
        raise RuntimeError("paged stash kernels need triton and a GPU")

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.GLOBAL_BLOCK_SIZE = 1024
    module.paged_stash_copy_kernel = _needs_gpu
    module.paged_stash_pop_kernel = _needs_gpu
    module.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules.setdefault(name, module)


class CpuRNGStatesTracker:
    """CPU stand-in for mcore's ``CudaRNGStatesTracker``: named CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _map_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):
        return "cpu"
    return device


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_map_device(a) for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


@contextlib.contextmanager
def model_compute():
    """Inside :func:`cuda_to_cpu`, runs the block (a model's own forward, which makes no CUDA
    calls) without the mode: its Python hook on every op costs about 4% of a CPU forward.
    A no-op anywhere else."""
    if not isinstance(torch.overrides._get_current_function_mode(), _CudaToCpu):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


@contextlib.contextmanager
def cuda_to_cpu():
    """Maps ``device="cuda"``/``.cuda()`` inside the block to the CPU (no-op when CUDA exists)."""
    if not cpu_mode():
        yield
        return
    with _CudaToCpu():
        yield


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None

    class _InOrder:
        """A CUDA stream or event on the CPU, where work runs in order: every call is a no-op."""

        def __init__(self, *a, **k):
            pass

        def _nothing(self, *a, **k):
            return None

        wait_stream = wait_event = synchronize = record = wait = _nothing

        def record_event(self, *a, **k):
            return _InOrder()

        def query(self):
            return True

    # the MoE token dispatchers make side streams and events; on the CPU work is in order
    torch.cuda.current_stream = lambda *a, **k: _InOrder()
    torch.cuda.Stream = torch.cuda.Event = _InOrder
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            transpose: bool = False) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin``, ``rotate_half(t) = cat(-t2, t1)`` of the halves of
    the last dimension: one new tensor and a half-size scratch, no concatenation; bit for bit
    the unfused formula (each element is one product, then one sum or difference).
    ``transpose``: the transposed map (the backward's), ``[t1 c1 + t2 s2, t2 c2 - t1 s1]``."""
    half = t.shape[-1] // 2
    first, second = t[..., :half], t[..., half:]
    sin_first, sin_second = sin[..., :half], sin[..., half:]
    out = t * cos
    if not transpose:
        scratch = torch.mul(second, sin_first)
        out[..., :half].sub_(scratch)
        torch.mul(first, sin_second, out=scratch)
        out[..., half:].add_(scratch)
    else:
        scratch = torch.mul(second, sin_second)
        out[..., :half].add_(scratch)
        torch.mul(first, sin_first, out=scratch)
        out[..., half:].sub_(scratch)
    return out


class _Rope(torch.autograd.Function):
    """RoPE's rotation with a backward that rotates the gradient back (the transpose), keeping
    nothing but cos and sin: autograd of the unfused formula keeps a copy of its input for each
    product and joins the halves' gradients with a concatenation."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.cos_sin = (cos, sin)
        return _rotate(t, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.cos_sin
        return _rotate(grad, cos, sin, transpose=True), None, None


def _rope_once(original):
    """mcore's unfused RoPE with cos and sin computed once per frequency tensor.

    ``_apply_rotary_pos_emb_bshd`` recomputes both for every query and key of every layer from
    the same frequencies, and concatenates an empty pass-through part onto the result (a copy of
    the queries and keys); its rotation concatenates the halves, and autograd keeps copies of
    the inputs and concatenates the gradients' halves. On the CPU that is a few percent of a
    training step. The same arithmetic without them (:class:`_Rope`), for full rotary dimensions
    and the default (non-interleaved) rotation; other calls take mcore's function.
    """
    cached = [None]  # (freqs, its version, mscale, dtype, cos, sin) of the last call

    @functools.wraps(original)
    def rope(t, freqs, rotary_interleaved=False, *args, mscale=1.0, **kwargs):
        if (args or any(kwargs.values()) or rotary_interleaved or freqs.requires_grad
                or freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2):
            return original(t, freqs, rotary_interleaved, *args, mscale=mscale, **kwargs)
        entry = cached[0]
        if (entry is None or entry[0] is not freqs or entry[1] != freqs._version
                or entry[2] != mscale or entry[3] != t.dtype):
            entry = cached[0] = (freqs, freqs._version, mscale, t.dtype,
                                 (torch.cos(freqs) * mscale).to(t.dtype),
                                 (torch.sin(freqs) * mscale).to(t.dtype))
        if torch.is_grad_enabled() and t.requires_grad:
            return _Rope.apply(t, entry[4], entry[5])
        return _rotate(t, entry[4], entry[5])

    return rope


def _patch_mcore() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.fusions import fused_softmax

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # mcore 0.16's router reads it, defined
        moe_utils.te_general_gemm = None  # only when Transformer Engine imports
    from megatron.core.transformer.moe import token_dispatcher

    original_to_cpu = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original_to_cpu)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # mcore converts only CUDA tensors to numpy; the all-to-all split sizes must be numpy
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    for module in (moe_utils, token_dispatcher):
        if hasattr(module, "maybe_move_tensor_to_cpu"):
            module.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    from megatron.core.models.common.embeddings import rope_utils

    rope_utils._apply_rotary_pos_emb_bshd = _rope_once(rope_utils._apply_rotary_pos_emb_bshd)

    original_init = mcore_random.initialize_rng_tracker

    @functools.wraps(original_init)
    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED and not force_reset:
            return
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mcore_random.initialize_rng_tracker = initialize_rng_tracker
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, a lazy no-op without CUDA.


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """On a CPU run under glibc, keeps freed memory for reuse; returns whether it acted.

    glibc serves each allocation above its mmap threshold (activations, logits, gradients: most
    of a step's memory) with a fresh ``mmap`` and unmaps it when freed, so every micro-batch
    touches its memory anew: about half a million page faults in one 2,048-token training step
    of SmolLM2-135M, some 10% of its time. Here every allocation comes from the heap, which
    keeps freed memory (up to 2 GiB free at its top) and grows 512 MiB at a time; the process
    holds on to its peak, as a caching allocator does.

    Does nothing with CUDA (tensors live on the device), off glibc, when the user set any
    ``MALLOC_*`` variable (their tuning wins), or with ``MINITRON_CPU_ALLOCATOR=system``.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if (not cpu_mode() or os.environ.get("MINITRON_CPU_ALLOCATOR") == "system"
            or any(name.startswith("MALLOC_") for name in os.environ)):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    _ALLOCATOR_TUNED = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 512 << 20)))
    return _ALLOCATOR_TUNED


def apply_cpu_patches() -> bool:
    """Applies every CPU patch once; returns whether they are active."""
    global _APPLIED
    if not cpu_mode():
        return False
    if _APPLIED:
        return True
    # mcore warns at import that TE/apex are absent; on a CPU machine that is expected.
    for message in (r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed",
                    r".*full scope is deprecated", r".*CUDA_DEVICE_MAX_CONNECTIONS",
                    r".*deprecating ShardedTensor", r".*`load_state_dict` is deprecated",
                    r".*absl.logging is not installed"):
        warnings.filterwarnings("ignore", message=message)
    _stub_paged_stash()
    _patch_torch_cuda()
    _patch_mcore()
    _APPLIED = True
    return True
