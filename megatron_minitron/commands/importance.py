"""``minitron importance``: activation importance of every axis, written to one SCORES file.

    minitron importance --load CKPT --text-file corpus/ --num-samples 1024 --seq-length 512 \
        --aggregation l2,mean --output scores.pt
    torchrun --nproc-per-node 8 -m megatron_minitron importance --tp 2 --pp 2 ...

On a mixture-of-experts checkpoint SCORES also hold expert, expert_tokens, expert_neuron and
shared_neuron (``importance/moe.py``).
"""

from __future__ import annotations

import os

from megatron_minitron import parallel
from megatron_minitron.cli import add_layout_arguments
from megatron_minitron.commands.common import (
    ModelLookup,
    add_data_arguments,
    check_data_arguments,
    checkpoint_config,
    existing_model,
    fingerprint,
    load_samples,
)
from megatron_minitron.errors import UsageError
from megatron_minitron.precision import add_precision_argument, params_dtype


def add_arguments(parser, name):
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--output", required=True, help="SCORES file to write (torch.load-able)")
    parser.add_argument("--aggregation", default="l2,mean",
                        help="BATCH,SEQ reductions, each of mean, l2, var (default l2,mean)")
    parser.add_argument("--neuron-source", default="fc2_input",
                        choices=("fc2_input", "fc1", "up"),
                        help="MLP neuron activation scored (default fc2_input)")
    parser.add_argument("--no-depth", dest="depth", action="store_false",
                        help="skip layer perplexity and block importance")
    parser.add_argument("--depth-samples", type=int, default=None,
                        help="samples for the depth metrics (default: all)")
    parser.add_argument("--no-plot", dest="plot", action="store_false",
                        help="do not write the PNG summary next to SCORES")
    add_data_arguments(parser, num_samples=1024)
    add_precision_argument(parser)
    add_layout_arguments(parser)


def validate(args, model_config: ModelLookup = existing_model):
    """Every check before any model is built (``minitron run`` runs it for each step up
    front); returns the ImportanceConfig."""
    from megatron_minitron.importance import ImportanceConfig

    icfg = ImportanceConfig(aggregation=args.aggregation, neuron_source=args.neuron_source,
                            depth=args.depth, depth_samples=args.depth_samples)
    check_data_arguments(args, model_config(args.load))
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is a directory; pass a file name")
    return icfg


def main(args) -> int:
    cfg = checkpoint_config(args.load)
    icfg = validate(args, lambda path: cfg)
    try:
        # expert parallel size: the layout's --expert-model-parallel-size where it is offered
        layout = parallel.initialize(args.tp, args.pp, args.seed, ep=args.ep)
        cfg.check_layout(layout.tp, layout.pp, layout.ep)
        run(args, cfg, icfg, layout)
    finally:
        parallel.teardown()
    return 0


def run(args, cfg, icfg, layout):
    from megatron_minitron.importance import save_scores
    from megatron_minitron.importance.plot import plot_scores

    samples = load_samples(args, args.load, cfg)
    scores = compute_scores(args.load, samples, args, icfg, layout)
    save_scores(scores, args.output)
    if parallel.is_rank0():
        if args.plot:
            plot_scores(scores, os.path.splitext(args.output)[0] + ".png")
        print(f"wrote {args.output}: {scores['meta']['num_samples']} samples, "
              f"{scores['meta']['num_tokens']} tokens, aggregation {scores['meta']['aggregation']}")
        if "expert_tokens" in scores:
            print(expert_summary(scores))


def expert_summary(scores) -> str:
    """One line on routing: experts scored, and the least and most used expert's share of its
    layer's routed tokens."""
    tokens = scores["expert_tokens"].double()
    used = tokens[tokens.sum(dim=1) > 0]  # MoE layers
    if not used.numel():
        return "experts: no tokens routed"
    share = used / used.sum(dim=1, keepdim=True)
    return (f"experts: {used.shape[0]} MoE layers × {tokens.shape[1]} experts; routed-token "
            f"share per expert {float(share.min()):.1%} to {float(share.max()):.1%}")


def compute_scores(load, samples, args, icfg, layout):
    """Scores of checkpoint ``load`` on ``samples`` at the current layout (collective)."""
    from megatron.core import parallel_state

    from megatron_minitron.checkpoint.io import load_checkpoint
    from megatron_minitron.data import micro_batches
    from megatron_minitron.importance import estimate_importance

    batches = micro_batches(samples, args.micro_batch_size,
                            parallel_state.get_data_parallel_rank(), layout.dp)
    model, cfg = load_checkpoint(load, params_dtype(getattr(args, "precision", "auto")))
    source = args.data_prefix or ",".join(args.text_file)
    return estimate_importance(model, cfg, batches, icfg, meta={
        "checkpoint": os.path.abspath(load), "data_source": source,
        "data_fingerprint": fingerprint(samples), "seq_length": args.seq_length,
        "seed": args.seed, "layout": str(layout),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", "")})
