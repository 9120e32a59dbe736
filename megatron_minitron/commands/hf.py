"""``minitron import-hf`` and ``minitron export-hf``.

    minitron import-hf --hf-path DIR [--gguf-file NAME] --output CKPT [--output-format megatron]
    minitron export-hf --load CKPT --output DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Adds the flags of ``name`` (import-hf or export-hf) to ``parser``."""
    if name == "import-hf":
        parser.add_argument("--hf-path", required=True, metavar="DIR",
                            help="Hugging Face model directory (save_pretrained or GGUF)")
        parser.add_argument("--gguf-file", metavar="NAME",
                            help="GGUF file inside --hf-path, when the weights are GGUF")
        parser.add_argument("--output", required=True, metavar="CKPT",
                            help="checkpoint directory to write (new, empty, or ours)")
        from megatron_minitron.commands.common import add_output_format_argument

        add_output_format_argument(parser)
    else:
        parser.add_argument("--load", required=True, metavar="CKPT", help="checkpoint to export")
        parser.add_argument("--output", required=True, metavar="DIR",
                            help="new or empty directory for the Hugging Face model")
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                            help="dtype of the written weights (default float32)")


def main(args: argparse.Namespace) -> int:
    from megatron_minitron.hf import convert

    if args.command == "import-hf":
        convert.import_hf(args.hf_path, args.output, gguf_file=args.gguf_file,
                          output_format=args.output_format)
    else:
        convert.export_hf(args.load, args.output, dtype=convert.DTYPES[args.dtype])
    return 0
