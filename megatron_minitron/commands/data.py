"""``minitron preprocess-data``: text / JSON lines to a Megatron indexed dataset.

    minitron preprocess-data --input docs/ more.jsonl --tokenizer CKPT_OR_TOKENIZER_DIR \\
        --output-prefix data/docs [--json-key text] [--workers 2]

Writes ``data/docs.bin`` and ``data/docs.idx``: one sequence per document, EOS appended.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files, folders of text files, or JSON lines files (.jsonl)")
    parser.add_argument("--tokenizer", required=True, metavar="DIR_OR_CKPT",
                        help="Hugging Face tokenizer folder, checkpoint holding tokenizer/, "
                             "or .gguf file")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text",
                        help="field of JSON lines records holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizer processes (default 1)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="fail unless the tokenizer fits a model of this vocabulary size")


def main(args: argparse.Namespace) -> int:
    from megatron_minitron.data import build_indexed_dataset, check_tokenizer_fits, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.vocab_size is not None:
        check_tokenizer_fits(tokenizer, args.vocab_size)
    build_indexed_dataset(args.input, tokenizer, args.output_prefix, json_key=args.json_key,
                          workers=args.workers)  # logs what it wrote
    return 0
