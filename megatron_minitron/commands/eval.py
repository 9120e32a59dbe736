"""``minitron eval``: mean token loss and perplexity of a checkpoint on text.

    minitron eval --load CKPT --text-file held_out.txt --seq-length 512 --json eval.json
    torchrun --nproc-per-node 4 -m megatron_minitron eval --load CKPT --data-prefix P \
        --seq-length 512 --tp 2
"""

from __future__ import annotations

import json
import os

from megatron_minitron import parallel
from megatron_minitron.cli import add_layout_arguments
from megatron_minitron.commands.common import (
    add_data_arguments,
    check_data_arguments,
    checkpoint_config,
    fingerprint,
    load_samples,
)


def add_arguments(parser, name):
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_data_arguments(parser, num_samples=None)
    add_layout_arguments(parser)


def evaluate_checkpoint(args) -> dict:
    from megatron_minitron.checkpoint.io import load_checkpoint
    from megatron_minitron.data import micro_batches
    from megatron_minitron.evaluation import lm_loss
    from megatron.core import parallel_state

    cfg = checkpoint_config(args.load)
    check_data_arguments(args, cfg)
    layout = parallel.initialize(args.tp, args.pp, args.seed)
    cfg.check_layout(layout.tp, layout.pp)
    samples = load_samples(args, args.load, cfg)
    model, _ = load_checkpoint(args.load)
    batches = micro_batches(samples, args.micro_batch_size,
                            parallel_state.get_data_parallel_rank(), layout.dp, pad_remainder=True)
    result = lm_loss(model, batches)
    result.update(checkpoint=os.path.abspath(args.load), samples=int(samples.shape[0]),
                  seq_length=args.seq_length, data_fingerprint=fingerprint(samples),
                  layout=str(layout))
    return result


def main(args) -> int:
    if args.json and os.path.isdir(args.json):
        from megatron_minitron.errors import UsageError

        raise UsageError(f"--json {args.json} is a directory; pass a file name")
    try:
        result = evaluate_checkpoint(args)
        if parallel.is_rank0():
            print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  tokens {result['tokens']}"
                  f"  ({result['layout']})")
            if args.json:
                tmp = args.json + ".tmp"
                with open(tmp, "w") as handle:
                    json.dump(result, handle, indent=2)
                os.replace(tmp, args.json)
    finally:
        parallel.teardown()
    return 0
