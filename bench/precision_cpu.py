"""bf16 against fp32 on the CPU: speed of each forward stage, and whether the results hold.

    python bench/precision_cpu.py --load TEACHER --text-file CALIB --eval-text-file HELDOUT \
        --name smollm2

Runs ``minitron importance`` (width scores and layer Block Importance, no layer perplexity) and
``minitron eval`` (held-out loss) once with ``--precision fp32`` and once with ``--precision
bf16``, in this process, timing each command. Reports tokens/s per stage and precision, the
Spearman rank correlation of every score kind between the two precisions, and the eval loss
difference, and each stage's model FLOPs (2 per weight and token) as a share of this machine's
measured matrix-multiply rate in its precision. Goal (the bar for offering bf16 on the CPU): Spearman >= 0.99 for every kind and
|eval loss difference| <= 0.01. Training speed in bf16 is in bench/forward_vs_hf.py --dtype bf16.
Prints a table and writes bench/results/precision_cpu[_NAME].json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (ceiling_shares, matmul_flops_per_s, matmul_weights,  # noqa: E402
                    print_table, write_result)

PRECISIONS = ("fp32", "bf16")


def _timed(argv):
    from megatron_minitron import cli

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"minitron {' '.join(argv)} exited with {code}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint (e.g. SmolLM2-135M)")
    parser.add_argument("--text-file", required=True, help="calibration text")
    parser.add_argument("--eval-text-file", required=True, help="held-out text")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--name", default=None, help="result file suffix")
    args = parser.parse_args()

    from megatron_minitron.testing.ranks import score_agreement

    common = ["--load", args.load, "--seq-length", str(args.seq_length),
              "--micro-batch-size", str(args.micro_batch_size)]
    stages, scores, losses = {}, {}, {}
    with tempfile.TemporaryDirectory() as work:
        for precision in PRECISIONS:
            out = os.path.join(work, f"scores_{precision}.pt")
            seconds = _timed(["importance", *common, "--text-file", args.text_file,
                              "--num-samples", str(args.samples), "--no-depth", "--no-plot",
                              "--precision", precision, "--output", out])
            stages[f"importance_{precision}_tokens_per_s"] = (
                args.samples * args.seq_length / seconds)
            scores[precision] = torch.load(out, weights_only=False)
            report = os.path.join(work, f"eval_{precision}.json")
            seconds = _timed(["eval", *common, "--text-file", args.eval_text_file,
                              "--num-samples", str(args.eval_samples), "--precision", precision,
                              "--json", report])
            stages[f"eval_{precision}_tokens_per_s"] = (
                args.eval_samples * args.seq_length / seconds)
            losses[precision] = json.load(open(report))["loss"]
    agreement = score_agreement(scores["bf16"], scores["fp32"])
    result = {
        "model": "checkpoint " + args.load, "samples": args.samples,
        "eval_samples": args.eval_samples, "seq_length": args.seq_length,
        "spearman": agreement, "spearman_min": min(agreement.values()),
        "eval_loss_fp32": losses["fp32"], "eval_loss_bf16": losses["bf16"],
        "eval_loss_abs_diff": abs(losses["bf16"] - losses["fp32"]),
        **stages,
        "importance_speedup_ratio": (stages["importance_bf16_tokens_per_s"]
                                     / stages["importance_fp32_tokens_per_s"]),
        "eval_speedup_ratio": (stages["eval_bf16_tokens_per_s"]
                               / stages["eval_fp32_tokens_per_s"]),
        "goal": "spearman_min >= 0.99; eval_loss_abs_diff <= 0.01",
    }
    from megatron_minitron.checkpoint.io import load_config

    forward_flops = 2 * matmul_weights(load_config(args.load))
    for precision, dtype in zip(PRECISIONS, (torch.float32, torch.bfloat16)):
        rate = matmul_flops_per_s(dtype)  # each precision against its own matmul rate
        result[f"matmul_gflops_{precision}"] = rate / 1e9
        ceiling_shares(result, {f"{stage}_{precision}": forward_flops
                                for stage in ("importance", "eval")}, rate)
    rows = [{"stage": stage,
             "fp32 tok/s": f"{stages[f'{stage}_fp32_tokens_per_s']:.0f}",
             "bf16 tok/s": f"{stages[f'{stage}_bf16_tokens_per_s']:.0f}",
             "bf16 speed-up": f"{result[f'{stage}_speedup_ratio']:.2f}x",
             "of matmul ceiling (fp32, bf16)": "{:.0%}, {:.0%}".format(
                 result[f"{stage}_fp32_of_ceiling"], result[f"{stage}_bf16_of_ceiling"])}
            for stage in ("importance", "eval")]
    print_table(rows, list(rows[0]))
    print("Spearman bf16 vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in agreement.items()))
    print(f"held-out loss fp32 {losses['fp32']:.4f}, bf16 {losses['bf16']:.4f}")
    print("wrote", write_result("precision_cpu" + (f"_{args.name}" if args.name else ""),
                                result))


if __name__ == "__main__":
    main()
