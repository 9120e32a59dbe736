"""Importance overhead: the hooked calibration pass vs a plain forward over the same batches.

    python bench/importance.py                       # ~20M model, random tokens
    python bench/importance.py --load SMOLLM2_CKPT   # a real checkpoint

Prints a table and writes bench/results/importance[_NAME].json. Time ratios come from one
process with the two passes interleaved; peak memory from two child processes (plain, hooked),
each building the same model and running the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import interleaved, model_20m, peak_rss_mb, print_table, run_child, write_result  # noqa: E402,E501


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


def child(args):
    model, cfg, batches = _setup(args.load, args.samples, args.seq_length, args.micro_batch_size)
    plain, hooked = _passes(model, cfg, batches)
    before = peak_rss_mb()
    (hooked if args.child == "hooked" else plain)()
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="checkpoint to measure (default: a ~20M model)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default=None, help="result file suffix")
    parser.add_argument("--child", choices=("plain", "hooked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from megatron_minitron.config import count_parameters

    model, cfg, batches = _setup(args.load, args.samples, args.seq_length, args.micro_batch_size)
    plain, hooked = _passes(model, cfg, batches)
    times = interleaved({"plain": plain, "hooked": hooked}, args.repeats)
    base = [os.path.abspath(__file__), "--samples", str(args.samples), "--seq-length",
            str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size)]
    base += ["--load", args.load] if args.load else []
    memory = {mode: run_child(base + ["--child", mode]) for mode in ("plain", "hooked")}
    layers = cfg.num_layers
    score_floats = (layers * (cfg.num_attention_heads + cfg.num_query_groups + cfg.ffn_hidden_size)
                    * 2 + (2 * layers + 1) * cfg.hidden_size * 2)  # mean and M2, float64
    result = {
        "model": "checkpoint " + args.load if args.load else "20M",
        "parameters": count_parameters(cfg)["total"],
        "tokens_per_pass": args.samples * args.seq_length,
        "plain_forward_s": times["plain"], "importance_pass_s": times["hooked"],
        "time_ratio": times["hooked"] / times["plain"],
        "plain_peak_rss_mb": memory["plain"]["peak_rss_mb"],
        "importance_peak_rss_mb": memory["hooked"]["peak_rss_mb"],
        "score_buffers_mb": score_floats * 8 / 2**20,
        "extra_memory_mb": memory["hooked"]["peak_rss_mb"] - memory["plain"]["peak_rss_mb"],
        "goal": "time_ratio <= 1.05; extra memory <= score buffers",
    }
    print_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()}],
                ["model", "parameters", "tokens_per_pass", "plain_forward_s",
                 "importance_pass_s", "time_ratio", "extra_memory_mb", "score_buffers_mb"])
    print("wrote", write_result("importance" + (f"_{args.name}" if args.name else ""), result))


if __name__ == "__main__":
    main()
