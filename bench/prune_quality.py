"""Pruning quality on the real SmolLM2-135M: our importance vs random choices, zero-shot.

    python bench/prune_quality.py [--work outputs/prune_quality] [--calib-samples 64]

1. imports SmolLM2-135M (offline asset) and scores it on Linux-doc calibration text;
2. width: prunes to hidden 384, ffn 1024, 6 heads in 3 groups (~67M of 134.5M parameters) with
   our scores and with random scores (3 seeds), with and without head add-back;
3. depth: removes 15 of 30 layers by PPL, BI, block BI and at random (3 seeds);
4. evaluates every model's LM loss on held-out Linux-doc files (no retraining).

Writes bench/results/prune_quality_smollm2.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_result  # noqa: E402

WIDTH = {"hidden_size": 384, "ffn_hidden_size": 1024, "num_attention_heads": 6,
         "num_query_groups": 3}


def _files(root):
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if not n.startswith(".")]
    return sorted(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/prune_quality")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--depth-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args()

    import torch

    from megatron_minitron import assets, parallel
    from megatron_minitron.checkpoint import io
    from megatron_minitron.config import count_parameters
    from megatron_minitron.data import calibration_samples, load_tokenizer, micro_batches
    from megatron_minitron.evaluation import lm_loss
    from megatron_minitron.hf import import_hf
    from megatron_minitron.importance import (ImportanceConfig, estimate_importance,
                                              random_scores, save_scores)
    from megatron_minitron.importance.plot import plot_scores
    from megatron_minitron.prune import prune_checkpoint

    os.makedirs(args.work, exist_ok=True)
    source = os.path.join(args.work, "smollm2")
    if not io.is_checkpoint(source):
        directory, gguf = assets.smollm2()
        import_hf(directory, source, gguf_file=gguf)
    files = _files(assets.linux_doc())
    calib_files, eval_files = files[0::2][:300], files[1::2][:300]
    tokenizer = load_tokenizer(source)
    calib = calibration_samples(text_file=calib_files, tokenizer=tokenizer,
                                num_samples=args.calib_samples, seq_length=args.seq_length)
    held_out = calibration_samples(text_file=eval_files, tokenizer=tokenizer,
                                   num_samples=args.eval_samples, seq_length=args.seq_length,
                                   seed=7)
    rows, timings = [], {}

    with parallel.parallel_context(1, 1):
        model, cfg = io.load_checkpoint(source)
        scores_path = os.path.join(args.work, "scores.pt")
        if os.path.isfile(scores_path):
            scores = torch.load(scores_path, weights_only=False)
        else:
            start = time.perf_counter()
            scores = estimate_importance(model, cfg, micro_batches(calib, 4),
                                         ImportanceConfig(depth_samples=args.depth_samples))
            timings["importance_s"] = time.perf_counter() - start
            save_scores(scores, scores_path)
        plot_scores(scores, os.path.join(args.work, "scores.png"))

        def evaluate(path):
            pruned, pruned_cfg = io.load_checkpoint(path)
            loss = lm_loss(pruned, micro_batches(held_out, 4))["loss"]
            return loss, count_parameters(pruned_cfg)["total"]

        base_loss, base_params = evaluate(source)
        rows.append({"model": "SmolLM2-135M (unpruned)", "params": base_params,
                     "loss": base_loss})

        def prune_and_eval(name, score_dict, target, **kwargs):
            out = os.path.join(args.work, name)
            if not io.is_checkpoint(out):
                prune_checkpoint(source, score_dict, target, out, **kwargs)
            loss, params = evaluate(out)
            rows.append({"model": name, "params": params, "loss": loss})
            return loss

        width, width_random = {}, {}
        for add_back in (False, True):
            tag = "addback" if add_back else "no_addback"
            width[tag] = prune_and_eval(f"width_ours_{tag}", scores, WIDTH,
                                        head_add_back=add_back)
            width_random[tag] = statistics.mean(
                prune_and_eval(f"width_random{seed}_{tag}", random_scores(cfg, seed), WIDTH,
                               head_add_back=add_back) for seed in range(3))
        depth = {metric: prune_and_eval(f"depth_{metric}", scores, {"num_layers": 15},
                                        depth_metric=metric)
                 for metric in ("ppl", "bi", "block_bi")}
        depth_random = []
        for seed in range(3):
            drop = sorted(random.Random(seed).sample(range(cfg.num_layers), 15))
            depth_random.append(prune_and_eval(f"depth_random{seed}", scores, {},
                                               drop_layers=drop))

    result = {
        "calibration": f"{args.calib_samples} x {args.seq_length} tokens of Linux-doc "
                       f"(depth metrics on {args.depth_samples})",
        "held_out": f"{args.eval_samples} x {args.seq_length} tokens of other Linux-doc files",
        "rows": rows, "timings": timings,
        "width_ours_loss": width, "width_random_mean_loss": width_random,
        "depth_losses": depth, "depth_random_mean_loss": statistics.mean(depth_random),
        "scores_meta": {k: v for k, v in scores["meta"].items() if k != "model"},
    }
    print_table([{**r, "loss": f"{r['loss']:.4f}", "params": f"{r['params'] / 1e6:.1f}M"}
                 for r in rows], ["model", "params", "loss"])
    for tag in width:
        print(f"width ({tag}): ours {width[tag]:.4f} vs random mean {width_random[tag]:.4f}")
    print(f"depth: {', '.join(f'{k} {v:.4f}' for k, v in depth.items())} vs random mean "
          f"{result['depth_random_mean_loss']:.4f}")
    print("wrote", write_result("prune_quality_smollm2", result))
    del torch


if __name__ == "__main__":
    main()
