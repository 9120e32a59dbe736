"""Pruning cost: peak memory and wall time of a streamed prune vs reading+writing the checkpoint.

    python bench/prune.py                        # a ~22M model saved to a temp checkpoint
    python bench/prune.py --load SMOLLM2_CKPT    # a real checkpoint

Goals (issue "Pruning to a target architecture"): peak RSS above the process baseline ≤ 2× the
largest layer (embedding included) plus the scores; prune time ≤ 2× the time to read and write
the checkpoint once (a streamed identity copy). Each measurement runs in its own child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RssSampler, model_20m, print_table, run_child, write_result  # noqa: E402


def _target(cfg):
    return {"hidden_size": cfg.hidden_size * 3 // 4, "ffn_hidden_size": cfg.ffn_hidden_size // 2,
            "num_layers": cfg.num_layers - cfg.num_layers // 4}


def child(args):
    from megatron_minitron.checkpoint import io
    from megatron_minitron.importance import random_scores

    import torch.distributed.checkpoint  # noqa: F401 - imports stay outside the measurement

    from megatron_minitron.checkpoint import stream  # noqa: F401
    from megatron_minitron.prune import prune_checkpoint  # noqa: F401

    cfg = io.load_config(args.load)
    scores = random_scores(cfg)
    with RssSampler() as rss:
        seconds = _work(args, cfg, scores)
    print(json.dumps({"seconds": seconds, "baseline_mb": rss.start_mb, "peak_mb": rss.peak_mb}))


def _work(args, cfg, scores):
    from megatron_minitron.checkpoint.stream import (
        CheckpointReader, TensorSpec, write_streaming_checkpoint)
    from megatron_minitron.prune import prune_checkpoint

    start = time.perf_counter()
    if args.child == "prune":
        prune_checkpoint(args.load, scores, _target(cfg), args.output, depth_metric="bi")
    else:  # read every tensor and write it back, one layer slice at a time
        reader = CheckpointReader(args.load)
        specs = []
        for key in reader.layer_keys():
            shape = tuple(reader.shapes[key])
            chunks = [((i,) + (0,) * (len(shape) - 1), (1,) + shape[1:],
                       (lambda i=i, key=key: reader.read([key], i)[key].unsqueeze(0)))
                      for i in range(shape[0])]
            specs.append(TensorSpec(key, shape, reader.dtypes[key], chunks))
        for key in reader.global_keys():
            shape = tuple(reader.shapes[key])
            specs.append(TensorSpec(key, shape, reader.dtypes[key], [
                ((0,) * len(shape), shape, lambda key=key: reader.read([key])[key])]))
        write_streaming_checkpoint(specs, cfg, args.output)
    return time.perf_counter() - start


def _largest_layer_mb(cfg):
    from megatron_minitron.config import count_parameters

    per_layer = (count_parameters(cfg.replace(num_layers=1))["non_embedding"]
                 - cfg.hidden_size)  # minus the final norm
    embedding = cfg.vocab_size * cfg.hidden_size
    return max(per_layer, embedding) * 4 / 2**20


def _make_checkpoint(path):
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io

    with parallel.parallel_context(1, 1):
        cfg = model_20m()
        io.save_checkpoint(adapter.build_gpt_model(cfg), cfg, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="checkpoint to prune (default: a fresh ~22M model)")
    parser.add_argument("--name", default=None, help="result file suffix")
    parser.add_argument("--child", choices=("prune", "copy"), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from megatron_minitron.checkpoint import io
    from megatron_minitron.config import count_parameters

    work = tempfile.mkdtemp(prefix="bench_prune_")
    try:
        load = args.load or os.path.join(work, "source")
        if not args.load:
            _make_checkpoint(load)
        cfg = io.load_config(load)
        runs = {}
        for mode in ("copy", "prune"):
            runs[mode] = run_child([os.path.abspath(__file__), "--child", mode, "--load", load,
                                    "--output", os.path.join(work, mode)])
        scores_mb = sum(cfg.num_layers * n for n in (cfg.num_attention_heads, cfg.num_query_groups,
                                                     cfg.ffn_hidden_size)) * 8 / 2**20
        largest = _largest_layer_mb(cfg)
        prune_extra = runs["prune"]["peak_mb"] - runs["prune"]["baseline_mb"]
        result = {
            "model": "checkpoint " + args.load if args.load else "22M",
            "parameters": count_parameters(cfg)["total"],
            "target": _target(cfg),
            "copy_s": runs["copy"]["seconds"], "prune_s": runs["prune"]["seconds"],
            "time_ratio": runs["prune"]["seconds"] / runs["copy"]["seconds"],
            "largest_layer_mb": largest, "scores_mb": scores_mb,
            "prune_extra_rss_mb": prune_extra,
            "copy_extra_rss_mb": runs["copy"]["peak_mb"] - runs["copy"]["baseline_mb"],
            "memory_ratio": prune_extra / (largest + scores_mb),
            "model_fp32_mb": count_parameters(cfg)["total"] * 4 / 2**20,
            "goal": "time_ratio <= 2; prune_extra_rss_mb <= 2 x largest layer + scores",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in result.items()}],
                ["model", "parameters", "copy_s", "prune_s", "time_ratio", "largest_layer_mb",
                 "prune_extra_rss_mb", "copy_extra_rss_mb", "memory_ratio", "model_fp32_mb"])
    print("wrote", write_result("prune" + (f"_{args.name}" if args.name else ""), result))


if __name__ == "__main__":
    main()
