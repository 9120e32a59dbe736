"""Shared helpers of the benchmarks: a ~20M-parameter model, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

from megatron_minitron.compat.cpu import tune_allocator  # noqa: E402

tune_allocator()  # as the minitron command does, so that stages are timed as users run them

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def model_20m():
    """6 layers, hidden 512, 8 heads / 4 groups, SwiGLU 1408, vocab 8192: ~22M parameters."""
    from megatron_minitron.config import ModelConfig

    return ModelConfig(num_layers=6, hidden_size=512, ffn_hidden_size=1408,
                       num_attention_heads=8, num_query_groups=4, vocab_size=8192,
                       max_position_embeddings=1024)


def best_of(fn: Callable[[], None], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_times(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, List[float]]:
    """Wall times of each fn over ``repeats`` rounds (after one warm-up call each), the calls
    interleaved round-robin so machine noise hits all alike, in reversed order every other
    round so that none always runs after the same other."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        for name in (list(fns) if round_ % 2 == 0 else list(reversed(fns))):
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int,
                stat: Callable[[List[float]], float] = min) -> Dict[str, float]:
    """``stat`` (default the minimum) of each fn's interleaved times."""
    return {name: stat(values) for name, values in interleaved_times(fns, repeats).items()}


def matmul_flops_per_s(dtype: torch.dtype = torch.float32, size: int = 2048,
                       repeats: int = 5) -> float:
    """This machine's dense matrix-multiply rate (FLOP/s, best of ``repeats``) at the current
    thread count: the ceiling the model stages are set against."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = best_of(lambda: torch.mm(a, b), repeats)
    return 2 * size ** 3 / seconds


def matmul_weights(cfg) -> int:
    """Parameters that multiply every token (all but an untied input embedding table, a lookup):
    a forward costs 2 FLOPs per token for each, a forward + backward 6."""
    from megatron_minitron.config import count_parameters

    total = count_parameters(cfg)["total"]
    return total - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def ceiling_shares(result: Dict, flops_per_token: Dict[str, float],
                   flops_per_s: float) -> None:
    """Adds ``<name>_of_ceiling`` to ``result`` for each ``<name>_tokens_per_s`` figure named in
    ``flops_per_token``: the share of ``flops_per_s`` (this machine's measured matrix-multiply
    rate, :func:`matmul_flops_per_s`) that the stage's model FLOPs reach."""
    for name, flops in flops_per_token.items():
        result[f"{name}_of_ceiling"] = result[f"{name}_tokens_per_s"] * flops / flops_per_s


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(args: List[str]) -> Dict:
    """Runs ``python -m <args>`` and parses the JSON printed on its last line."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> Dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available()
            else f"cpu ({os.cpu_count()} cores)"}


def write_result(name: str, result: Dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(dict(result, environment=environment()), handle, indent=2)
    os.replace(path + ".tmp", path)
    return path


def print_table(rows: List[Dict], columns: List[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


class RssSampler:
    """Samples this process's resident memory every ``interval`` s in a thread; ``peak_mb`` is
    the highest value seen inside the ``with`` block and ``start_mb`` the value on entry."""

    def __init__(self, interval: float = 0.002):
        import threading

        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss())
            self._stop.wait(self._interval)

    def __enter__(self):
        self.start_mb = self.peak_mb = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        return False
