"""The CPU allocator tuning: large blocks come from the heap and stay in the process when freed,
and the user's own malloc settings win. Each case runs in a fresh interpreter (the tuning is
process-wide); glibc's ``mallinfo2`` shows where a 64 MiB tensor lives."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, json
from megatron_minitron.compat.cpu import tune_allocator
tuned = tune_allocator()
import torch

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
x = torch.ones(16 << 20)  # 64 MiB
mapped = mallinfo2().hblkhd  # bytes in blocks mmapped on their own
del x
kept = mallinfo2().fordblks  # free bytes the heap keeps
print(json.dumps({"tuned": tuned, "mapped": mapped, "kept": kept}))
"""


def _probe(**env):
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("MALLOC_") and k != "MINITRON_CPU_ALLOCATOR"}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=environment, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_freed_tensors_stay_in_the_heap():
    tuned = _probe()
    system = _probe(MINITRON_CPU_ALLOCATOR="system")
    assert tuned["tuned"] and not system["tuned"]
    size = 64 << 20
    assert system["mapped"] >= size and system["kept"] < size  # own mapping, unmapped on free
    assert tuned["mapped"] < size and tuned["kept"] >= size  # from the heap, kept for reuse


def test_user_malloc_settings_win():
    assert not _probe(MALLOC_ARENA_MAX="2")["tuned"]
