"""Exact peak of live tensor memory on any device, for tests and benchmarks on CPU.

    with LiveTensorBytes() as tracker:
        loss = logits_loss(...); loss.total.backward()
    tracker.peak  # bytes of storages allocated inside the block and alive at the worst moment

A ``TorchDispatchMode`` records every storage an operator creates and drops it when the storage
is freed, so the count is the allocator-independent "extra memory" of the code in the block
(tensors that existed before the block are not counted).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of storages created inside the block: ``current`` and ``peak``."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live = {}

    def _release(self, key) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self._live:  # views and in-place results
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out
