"""``minitron prune``: trim a checkpoint to a target architecture using cached scores.

    minitron prune --load CKPT --scores scores.pt \
        --target num_layers=16,hidden_size=384,ffn_hidden_size=1024 --depth-metric ppl \
        --output PRUNED
    minitron prune --load CKPT --scores scores.pt --drop-layers 20,21,22,23 --output PRUNED

    minitron prune --load MOE --scores scores.pt \
        --target num_moe_experts=32,moe_ffn_hidden_size=512 --output PRUNED

Any target key may be omitted (kept as is). The output is a normal checkpoint: it loads at any
TP/PP (``--target-tp/--target-pp`` check that its shape divides the layout you will use) and
exports to Hugging Face.
"""

from __future__ import annotations

import logging
import os

from megatron_minitron import parallel
from megatron_minitron.cli import add_layout_arguments
from megatron_minitron.commands.common import (
    ModelLookup,
    add_data_arguments,
    add_head_add_back_arguments,
    add_output_format_argument,
    check_data_arguments,
    existing_model,
    load_samples,
)
from megatron_minitron.errors import UsageError
from megatron_minitron.precision import add_precision_argument

logger = logging.getLogger("megatron_minitron")


def add_arguments(parser, name):
    parser.add_argument("--load", required=True, help="source checkpoint directory")
    parser.add_argument("--scores", help="SCORES file from `minitron importance` (required "
                        "unless --random-init)")
    parser.add_argument("--random-init", action="store_true",
                        help="write the target architecture with freshly initialised weights "
                             "(mcore's initialisation, --seed) instead of pruned ones: the "
                             "from-scratch baseline a pruned student is compared with")
    parser.add_argument("--target", default="",
                        help="KEY=VALUE,... of num_layers, hidden_size, ffn_hidden_size, "
                             "num_attention_heads, num_query_groups and, for mixture-of-experts "
                             "models, num_moe_experts, moe_ffn_hidden_size, "
                             "moe_shared_expert_intermediate_size (ffn_hidden_size trims only "
                             "their dense layers)")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--depth-metric", choices=("ppl", "bi", "block_bi"), default="ppl",
                       help="how layers are chosen when num_layers shrinks (default ppl)")
    depth.add_argument("--drop-layers", help="comma-separated source layers to drop (0-based)")
    add_head_add_back_arguments(parser)
    parser.add_argument("--target-tp", "--target-tensor-model-parallel-size", dest="target_tp",
                        type=int, default=1, help="TP the output must divide into (default 1)")
    parser.add_argument("--target-pp", "--target-pipeline-model-parallel-size", dest="target_pp",
                        type=int, default=1, help="PP the output must divide into (default 1)")
    parser.add_argument("--output", required=True, help="pruned checkpoint directory")
    add_output_format_argument(parser)
    iterative = parser.add_argument_group(
        "iterative pruning", "--iterations T > 1 prunes in T steps, re-estimating importance on "
        "each intermediate model from the data below (--scores serves the first step)")
    iterative.add_argument("--iterations", type=int, default=1, help="pruning rounds (default 1)")
    iterative.add_argument("--aggregation", default="l2,mean", help="as in `minitron importance`")
    add_data_arguments(parser, num_samples=1024, required=False)
    add_precision_argument(iterative)
    add_layout_arguments(parser)


def parse_drop_layers(text):
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"--drop-layers {text!r} must be comma-separated integers") from None


def validate(args, model_config: ModelLookup = existing_model):
    """Every check before any weight is read (``minitron run`` runs it for each step up
    front); returns ``(target, drop_layers)``."""
    from megatron_minitron.prune import parse_target
    from megatron_minitron.prune.plan import head_add_back_mode, target_config

    head_add_back_mode(args.head_add_back)
    target = parse_target(args.target)
    drop = parse_drop_layers(args.drop_layers)
    source = model_config(args.load)
    if args.random_init and (drop is not None or args.iterations > 1):
        raise UsageError("--random-init writes the --target architecture afresh; it takes "
                         "no --drop-layers or --iterations")
    if not args.random_init and args.scores is None:
        raise UsageError("--scores is required (write it with `minitron importance`), unless "
                         "--random-init")
    if args.iterations > 1:
        if drop is not None:
            raise UsageError("--iterations needs a --depth-metric, not --drop-layers")
        if not (args.text_file or args.data_prefix) or args.seq_length is None:
            raise UsageError("--iterations > 1 re-estimates importance: pass --text-file or "
                             "--data-prefix and --seq-length")
        check_data_arguments(args, source)
    if source is not None and drop is None:
        target_config(source, target, args.target_tp, args.target_pp)
    return target, drop


def main(args) -> int:
    from megatron_minitron.checkpoint.io import load_config, read_checkpoint_info
    from megatron_minitron.prune import describe_counts

    read_checkpoint_info(args.load)
    source = load_config(args.load)
    target, drop = validate(args, lambda path: source)
    _warn_if_not_exportable(source, target, args)
    if args.random_init:
        plan_target = _random_init(args, source, target)
    elif args.iterations > 1:
        plan_target = _iterative(args, source, target)
    elif int(os.environ.get("RANK", "0")) != 0:  # streamed in one process; other ranks idle
        return 0
    else:
        from megatron_minitron.prune import prune_checkpoint

        plan_target = prune_checkpoint(
            args.load, args.scores, target, args.output,
            depth_metric=None if drop is not None else args.depth_metric, drop_layers=drop,
            head_add_back=args.head_add_back, target_tp=args.target_tp,
            target_pp=args.target_pp, output_format=args.output_format,
            tokenizer=args.tokenizer).target
    if parallel.is_rank0():
        print(f"source: {describe_counts(source)}")
        print(f"pruned: {describe_counts(plan_target)}")
        meta = read_checkpoint_info(args.output)["meta"]
        if meta.get("random_init"):
            print(f"weights: freshly initialised (seed {args.seed})")
        else:
            print(f"kept layers (of the last round's source): {meta.get('kept_layers')}")
        print(f"wrote {args.output}")
    return 0


def _random_init(args, source, target):
    """The target architecture with mcore's initialisation (every rank; a collective save)."""
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint.io import check_output_path, save_checkpoint
    from megatron_minitron.prune.plan import target_config

    cfg = target_config(source, target, args.target_tp, args.target_pp)
    check_output_path(args.output)
    with parallel.parallel_context(1, 1, seed=args.seed):
        save_checkpoint(adapter.build_gpt_model(cfg), cfg, args.output, tokenizer_from=args.load,
                        meta={"random_init": True, "seed": args.seed,
                              "source": os.path.abspath(args.load)})
    return cfg


def _warn_if_not_exportable(source, target, args) -> None:
    """Says before any work when the pruned model will not go back to Hugging Face."""
    from megatron_minitron.hf.mapping import hf_exportable
    from megatron_minitron.prune.plan import target_config

    if int(os.environ.get("RANK", "0")) != 0:
        return
    reason = hf_exportable(target_config(source, target, args.target_tp, args.target_pp))
    if reason:
        logger.warning("--target %s: the pruned model cannot be exported with export-hf (%s)",
                       args.target or "(unchanged)", reason)


def _iterative(args, source, target):
    from megatron_minitron.checkpoint.io import load_config
    from megatron_minitron.commands.importance import compute_scores
    from megatron_minitron.importance import ImportanceConfig, load_scores
    from megatron_minitron.prune.iterative import iterative_prune
    from megatron_minitron.prune.plan import target_config

    target_config(source, target, args.target_tp, args.target_pp)  # fail before any work
    first = load_scores(args.scores, source)
    icfg = ImportanceConfig(aggregation=args.aggregation)
    try:
        layout = parallel.initialize(args.tp, args.pp, args.seed, ep=args.ep)
        samples = load_samples(args, args.load, source)
        iterative_prune(args.load, target, args.output, args.iterations,
                        estimate=lambda ckpt: compute_scores(ckpt, samples, args, icfg, layout),
                        first_scores=first, depth_metric=args.depth_metric,
                        head_add_back=args.head_add_back, target_tp=args.target_tp,
                        target_pp=args.target_pp, output_format=args.output_format,
                        tokenizer=args.tokenizer)
    finally:
        parallel.teardown()
    return load_config(args.output)
