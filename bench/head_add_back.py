"""Head add-back modes compared: none, query and output, zero-shot and after distillation.

    python bench/head_add_back.py --quick        # tiny random model, a smoke test (< 2 min)

The full measurement on SmolLM2-135M (9 heads in 3 groups → 6 heads in 3 groups, nothing else
pruned; 3 modes × 3 data orders = 9 distillation runs of 49,152 tokens each):

    python -m megatron_minitron.assets smollm2 linux_doc
    minitron import-hf --hf-path ~/.cache/megatron_minitron/smollm2-135m \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --output outputs/head_add_back/teacher
    minitron importance --load outputs/head_add_back/teacher \
        --text-file ~/.cache/megatron_minitron/linux-doc-6.1/admin-guide --num-samples 64 \
        --seq-length 256 --no-depth --output outputs/head_add_back/scores.pt
    python bench/head_add_back.py --load outputs/head_add_back/teacher \
        --scores outputs/head_add_back/scores.pt \
        --text-file ~/.cache/megatron_minitron/linux-doc-6.1/admin-guide \
        --eval-text-file ~/.cache/megatron_minitron/linux-doc-6.1/filesystems \
        --train-tokens 49152 --seeds 3 --name smollm2 --work outputs/head_add_back

For every mode: (a) prune ``--load`` to ``--target`` with ``--scores`` (the same kept heads in
every mode; only the add-back differs) and measure the held-out LM loss; (b) distill the pruned
model from the unpruned ``--load`` on ``--train-tokens`` tokens of ``--text-file`` once per
data order (TrainConfig ``seed`` 0 … ``--seeds``−1), and measure the held-out loss of each
final model. Held-out: ``--eval-samples`` windows of ``--eval-text-file``, the same windows for
every model. Prints a table (mean, standard deviation, min and max over the data orders) and
writes bench/results/head_add_back_NAME.json. Finished runs under ``--work`` are reused on a
re-run with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_result  # noqa: E402

MODES = ("none", "query", "output")
SMOLLM2_HEADS = {"num_attention_heads": 6, "num_query_groups": 3}
QUICK_WORDS = ("the model prunes heads and channels then distills from its teacher while the "
               "data loader packs documents into windows of tokens for every rank").split()


def _quick_text(num_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    lines, line = [], []
    for index in range(num_words):
        line.append(rng.choice(QUICK_WORDS) + ("." if index % 13 == 12 else ""))
        if index % 61 == 60:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)])


def prepare_quick(work: str):
    """A random-init tiny teacher (6 heads in 2 groups, the uneven scales of a trained model:
    ``spread_weights``) with its own tokenizer, text and importance scores; returns (teacher,
    scores, train text, held-out text)."""
    from megatron_minitron import parallel
    from megatron_minitron.checkpoint import io
    from megatron_minitron.data import calibration_samples, load_tokenizer, micro_batches
    from megatron_minitron.importance import ImportanceConfig, estimate_importance, save_scores
    from megatron_minitron.testing.models import save_bpe_tokenizer, save_realistic_checkpoint

    os.makedirs(work, exist_ok=True)
    train_text, eval_text = os.path.join(work, "train.txt"), os.path.join(work, "eval.txt")
    for path, seed in ((train_text, 0), (eval_text, 99)):
        with open(path, "w") as handle:
            handle.write(_quick_text(6000, seed))
    tokenizer_dir = os.path.join(work, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        save_bpe_tokenizer(tokenizer_dir, files=[train_text])
    teacher = os.path.join(work, "teacher")
    if not io.is_checkpoint(teacher):
        save_realistic_checkpoint(teacher, tokenizer_dir, num_layers=2, hidden_size=48,
                                  ffn_hidden_size=96, num_attention_heads=6, num_query_groups=2,
                                  vocab_size=320, max_position_embeddings=64)
    scores = os.path.join(work, "scores.pt")
    if not os.path.isfile(scores):
        with parallel.parallel_context(1, 1):
            model, cfg = io.load_checkpoint(teacher)
            calib = calibration_samples(text_file=[train_text],
                                        tokenizer=load_tokenizer(teacher), num_samples=16,
                                        seq_length=32)
            save_scores(estimate_importance(model, cfg, micro_batches(calib, 4),
                                            ImportanceConfig(depth=False)), scores)
    return teacher, scores, [train_text], [eval_text]


def held_out_loss(path: str, batches) -> float:
    """LM loss of checkpoint ``path`` on the held-out micro-batches (one rank)."""
    from megatron_minitron import parallel
    from megatron_minitron.checkpoint import io
    from megatron_minitron.evaluation import lm_loss

    parallel.initialize(1, 1)
    try:
        model, _ = io.load_checkpoint(path)
        return lm_loss(model, batches)["loss"]
    finally:
        parallel.teardown()


def distill(args, student: str, output: str, seed: int):
    """Distills ``student`` from ``args.load`` (data order ``seed``); returns (the final
    model's folder, seconds spent)."""
    import gc

    from megatron_minitron import parallel
    from megatron_minitron.distill import TrainConfig, Trainer

    config = TrainConfig(student=student, teacher=args.load, output=output,
                         text_file=args.text_file, seq_length=args.seq_length,
                         train_tokens=args.train_tokens, global_batch_size=args.global_batch_size,
                         micro_batch_size=args.micro_batch_size, lr=args.lr, min_lr=args.min_lr,
                         lr_warmup_steps=args.lr_warmup_steps, log_interval=args.log_interval,
                         resume="auto", seed=seed, precision=args.precision)
    start = time.perf_counter()
    trainer = Trainer(config, mode="distill")
    try:
        trainer.run()
        final = trainer.final_dir()
    finally:
        del trainer
        parallel.teardown()  # inside held_process_group: mcore's groups only
        gc.collect()
    return final, time.perf_counter() - start


def _spread(values):
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a random-init tiny model with its own scores and text, 4 steps of "
                             "4 x 32 tokens per run (sets its own sizes and learning rate)")
    parser.add_argument("--load", help="teacher checkpoint (the unpruned model)")
    parser.add_argument("--scores", help="SCORES file of --load (`minitron importance`)")
    parser.add_argument("--target", default=None,
                        help="KEY=VALUE,... as `minitron prune --target` (default "
                             "num_attention_heads=6,num_query_groups=3: SmolLM2's 9 heads → 6)")
    parser.add_argument("--text-file", nargs="+", help="distillation text file(s) or folder(s)")
    parser.add_argument("--eval-text-file", nargs="+",
                        help="held-out text file(s) or folder(s), none of --text-file")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out windows")
    parser.add_argument("--train-tokens", type=int, help="distillation tokens of every run")
    parser.add_argument("--seeds", type=int, default=3, help="data orders per mode (default 3)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes (default none,query,output)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--min-lr", type=float, default=3e-5)
    parser.add_argument("--lr-warmup-steps", type=int, default=2)
    parser.add_argument("--log-interval", type=int, default=8)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="distillation precision (bf16 is 2x fp32's speed on CPUs with AMX)")
    parser.add_argument("--work", default=None,
                        help="pruned models and runs (default outputs/head_add_back_NAME)")
    parser.add_argument("--name", default=None, help="result file suffix")
    args = parser.parse_args(argv)
    if args.quick:
        args.name = args.name or "quick"
        args.seq_length, args.eval_samples = 32, 8
        args.train_tokens = args.train_tokens or 4 * 32 * 4  # 4 steps of 4 × 32
        args.lr, args.min_lr, args.lr_warmup_steps, args.log_interval = 1e-3, 1e-4, 1, 4
        args.target = args.target or "num_attention_heads=4,num_query_groups=2"
    else:
        missing = [flag for flag, value in (("--load", args.load), ("--scores", args.scores),
                                            ("--text-file", args.text_file),
                                            ("--eval-text-file", args.eval_text_file),
                                            ("--train-tokens", args.train_tokens))
                   if not value]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --quick)")
    args.modes = [mode for mode in args.modes.split(",") if mode]
    bad = [mode for mode in args.modes if mode not in MODES]
    if bad or not args.modes or args.seeds < 1:
        parser.error(f"--modes {bad} unknown (use {', '.join(MODES)}) or --seeds < 1")
    args.work = args.work or os.path.join("outputs", f"head_add_back_{args.name or 'run'}")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()

    from megatron_minitron import parallel
    from megatron_minitron.checkpoint import io
    from megatron_minitron.config import count_parameters
    from megatron_minitron.data import calibration_samples, load_tokenizer, micro_batches
    from megatron_minitron.importance import load_scores
    from megatron_minitron.prune import parse_target, prune_checkpoint

    if args.quick:
        args.load, args.scores, args.text_file, args.eval_text_file = prepare_quick(args.work)
    source = io.load_config(args.load)
    target = parse_target(args.target) if args.target else dict(SMOLLM2_HEADS)
    scores = load_scores(args.scores, source)
    held_out = calibration_samples(text_file=args.eval_text_file,
                                   tokenizer=load_tokenizer(args.load),
                                   num_samples=args.eval_samples, seq_length=args.seq_length,
                                   seed=7)
    batches = micro_batches(held_out, args.micro_batch_size)
    runs = {}
    with parallel.held_process_group():
        teacher_loss = held_out_loss(args.load, batches)
        for mode in args.modes:
            pruned = os.path.join(args.work, f"pruned_{mode}")
            if not io.is_checkpoint(pruned):
                prune_checkpoint(args.load, scores, target, pruned, head_add_back=mode)
            runs[mode] = {"zero_shot": held_out_loss(pruned, batches), "distilled": [],
                          "seconds": []}
            params = count_parameters(io.load_config(pruned))["total"]
        for seed in range(args.seeds):  # orders interleaved: a stopped run still compares
            for mode in args.modes:
                output = os.path.join(args.work, f"distill_{mode}_seed{seed}")
                final, seconds = distill(args, os.path.join(args.work, f"pruned_{mode}"),
                                         output, seed)
                runs[mode]["distilled"].append(held_out_loss(final, batches))
                runs[mode]["seconds"].append(seconds)

    rows = [{"mode": "teacher (unpruned)", "zero-shot": f"{teacher_loss:.4f}"}]
    for mode, run in runs.items():
        spread = _spread(run["distilled"])
        run["distilled_spread"] = spread
        rows.append({"mode": mode, "zero-shot": f"{run['zero_shot']:.4f}",
                     "distilled mean": f"{spread['mean']:.4f}",
                     "std": f"{spread['std']:.4f}",
                     "min / max": f"{spread['min']:.4f} / {spread['max']:.4f}",
                     "seeds": len(run["distilled"])})
    print_table(rows, ["mode", "zero-shot", "distilled mean", "std", "min / max", "seeds"])
    result = {
        "command": "python bench/head_add_back.py " + " ".join(sys.argv[1:] if argv is None
                                                                else argv),
        "quick": args.quick, "teacher": os.path.abspath(args.load),
        "target": target, "params": params, "source_params": count_parameters(source)["total"],
        "train_tokens": args.train_tokens, "seeds": args.seeds, "seq_length": args.seq_length,
        "global_batch_size": args.global_batch_size, "lr": args.lr, "min_lr": args.min_lr,
        "held_out": f"{args.eval_samples} x {args.seq_length} tokens of {args.eval_text_file}",
        "teacher_loss": teacher_loss, "runs": runs,
        **{f"zero_shot_loss_{mode}": run["zero_shot"] for mode, run in runs.items()},
        **{f"distilled_loss_{mode}": run["distilled_spread"]["mean"]
           for mode, run in runs.items()},
        "total_s": time.perf_counter() - started,
    }
    name = "head_add_back" + (f"_{args.name}" if args.name else "")
    print("wrote", write_result(name, result))


if __name__ == "__main__":
    main()
