"""Importance overhead: the hooked calibration pass vs a plain forward over the same batches.

    python bench/importance.py                       # ~20M model, random tokens
    python bench/importance.py --load SMOLLM2_CKPT   # a real checkpoint

Prints a table and writes bench/results/importance[_NAME].json. Time: the two passes interleaved
round by round in one process, median of the rounds. Memory: each pass's own peak of tensor bytes
created inside it (``LiveTensorBytes``: activations, hook temporaries, score buffers), so the
hooks' extra memory is a difference of two measured peaks, not of process lifetime maxima.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (ceiling_shares, interleaved, matmul_flops_per_s,  # noqa: E402
                    matmul_weights, model_20m, print_table, write_result)


def _setup(load, samples, seq, mbs):
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint.io import load_checkpoint

    parallel.initialize(1, 1)
    if load:
        model, cfg = load_checkpoint(load)
    else:
        cfg = model_20m()
        model = adapter.build_gpt_model(cfg)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (samples, seq + 1), generator=generator)
    batches = [{"tokens": data[i:i + mbs, :-1], "labels": data[i:i + mbs, 1:]}
               for i in range(0, samples, mbs)]
    return model, cfg, batches


def _passes(model, cfg, batches):
    from megatron_minitron.importance import Aggregation
    from megatron_minitron.importance.collect import ScoreCollector
    from megatron_minitron.model.forward import pipeline_forward

    def plain():
        for batch in batches:
            pipeline_forward(model, [batch], lambda out, b: {})

    def hooked():
        with ScoreCollector(model, cfg, Aggregation()):
            plain()

    return plain, hooked


def _peak_bytes(fn) -> int:
    from megatron_minitron.distill.memory import LiveTensorBytes

    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="checkpoint to measure (default: a ~20M model)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default=None, help="result file suffix")
    args = parser.parse_args()

    from megatron_minitron.config import count_parameters

    model, cfg, batches = _setup(args.load, args.samples, args.seq_length, args.micro_batch_size)
    plain, hooked = _passes(model, cfg, batches)
    times = interleaved({"plain": plain, "hooked": hooked}, args.repeats, statistics.median)
    peaks = {"plain": _peak_bytes(plain), "hooked": _peak_bytes(hooked)}
    layers = cfg.num_layers
    score_floats = (layers * (cfg.num_attention_heads + cfg.num_query_groups + cfg.ffn_hidden_size)
                    * 2 + (2 * layers + 1) * cfg.hidden_size * 2)  # mean and M2, float64
    mb = 2 ** 20
    # one micro-batch's largest activation the hooks reduce: the MLP's [b, s, ffn] in fp32
    activation_mb = args.micro_batch_size * args.seq_length * cfg.ffn_hidden_size * 4 / mb
    result = {
        "model": "checkpoint " + args.load if args.load else "20M",
        "parameters": count_parameters(cfg)["total"],
        "tokens_per_pass": args.samples * args.seq_length, "rounds": args.repeats,
        "plain_forward_s": times["plain"], "importance_pass_s": times["hooked"],
        "time_ratio": times["hooked"] / times["plain"],
        "plain_peak_mb": peaks["plain"] / mb, "importance_peak_mb": peaks["hooked"] / mb,
        "score_buffers_mb": score_floats * 8 / mb,
        "extra_memory_mb": (peaks["hooked"] - peaks["plain"]) / mb,
        "mlp_activation_mb": activation_mb,
        "extra_memory_ratio": (peaks["hooked"] - peaks["plain"]) / mb / (
            score_floats * 8 / mb + activation_mb),
        "goal": "time_ratio <= 1.05; extra_memory_ratio <= 1.0",
    }
    tokens = args.samples * args.seq_length
    result["plain_tokens_per_s"] = tokens / times["plain"]
    result["importance_tokens_per_s"] = tokens / times["hooked"]
    ceiling = matmul_flops_per_s(torch.float32)
    result["matmul_gflops"] = ceiling / 1e9
    ceiling_shares(result, {name: 2 * matmul_weights(cfg) for name in ("plain", "importance")},
                   ceiling)
    print_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()}],
                ["model", "parameters", "tokens_per_pass", "plain_forward_s",
                 "importance_pass_s", "time_ratio", "importance_of_ceiling", "plain_peak_mb",
                 "extra_memory_mb", "score_buffers_mb", "mlp_activation_mb"])
    print("wrote", write_result("importance" + (f"_{args.name}" if args.name else ""), result))


if __name__ == "__main__":
    main()
