"""The ``minitron`` command line: one subcommand per stage.

    minitron --help
    torchrun --nproc-per-node 2 -m megatron_minitron eval --load CKPT --text-file F --tp 2

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args)``;
modules are imported only when their command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Dict, Tuple

from megatron_minitron.errors import UsageError

COMMANDS: Dict[str, Tuple[str, str]] = {
    "import-hf": ("megatron_minitron.commands.hf",
                  "import a Hugging Face model (Llama, Mistral, Qwen2, Qwen3, Nemotron)"),
    "export-hf": ("megatron_minitron.commands.hf", "export a checkpoint to Hugging Face format"),
    "preprocess-data": ("megatron_minitron.commands.data",
                        "tokenize text/JSONL into a Megatron indexed dataset"),
    "importance": ("megatron_minitron.commands.importance",
                   "activation importance of heads, groups, neurons, channels and layers"),
    "prune": ("megatron_minitron.commands.prune",
              "prune a checkpoint to a target architecture using importance scores"),
    "eval": ("megatron_minitron.commands.eval",
             "LM loss/perplexity on text and zero-shot task accuracy of a checkpoint"),
    "distill": ("megatron_minitron.commands.distill",
                "distill a teacher into a student (co-located teacher, any TP×PP×DP)"),
    "correct-teacher": ("megatron_minitron.commands.distill",
                        "fine-tune the teacher on the distillation data (teacher correction)"),
    "train": ("megatron_minitron.commands.distill",
              "train a checkpoint: --ce-only for plain cross-entropy, or with --teacher"),
    "search": ("megatron_minitron.commands.search",
               "architecture search in a parameter budget: prune, retrain briefly, rank"),
    "run": ("megatron_minitron.commands.run",
            "run a whole recipe (correction, importance, search/prune, distill, eval) from YAML"),
}


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron's layout flags; data parallel size is the rest of the world size."""
    group = parser.add_argument_group("parallel layout")
    group.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                       help="tensor parallel size (default 1)")
    group.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1,
                       help="pipeline parallel size (default 1)")
    group.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=1,
                       help="expert parallel size of mixture-of-experts models: experts split "
                            "over this many of the data parallel ranks (default 1)")
    group.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")


def _command_module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def quiet_megatron_logs(verbose: bool) -> None:
    """Keeps Megatron-Core's INFO lines (its Megatron-FSDP banner at import, per-parameter
    notes) off the screen unless ``--verbose`` or ``MINITRON_DEBUG=1``."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("megatron", "megatron_fsdp"):
        logging.getLogger(name).setLevel(level)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minitron",
        description="Prune and distill Megatron-Core LLMs into smaller ones (Minitron).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--verbose", action="store_true",
                             help="also show Megatron-Core's own INFO log lines")
        if only == name:
            _command_module(name).add_arguments(command, name)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_minitron import progress

    from megatron_minitron.compat.cpu import tune_allocator

    progress.quiet_third_party_bars()
    tune_allocator()  # CPU runs: freed memory stays in the process (see its docstring)
    quiet_megatron_logs("--verbose" in argv or os.environ.get("MINITRON_DEBUG") == "1")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"minitron: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from megatron_minitron.checkpoint.io import resolve_load_args

        resolve_load_args(args)
        return int(_command_module(args.command).main(args) or 0)
    except UsageError as err:  # bad input: one line; anything else keeps its traceback
        if os.environ.get("MINITRON_DEBUG"):
            raise
        print(f"minitron {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
