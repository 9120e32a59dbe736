"""Argument groups and checks shared by the commands that read a checkpoint and a text source."""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Callable, Optional

import torch

from megatron_minitron import parallel
from megatron_minitron.checkpoint.io import load_config, read_checkpoint_info
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError


def add_data_arguments(parser: argparse.ArgumentParser, num_samples: int | None,
                       required: bool = True) -> None:
    group = parser.add_argument_group("data")
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument("--text-file", nargs="+", help="text/JSONL file(s) or folder(s)")
    source.add_argument("--data-prefix", help="Megatron indexed dataset prefix (.bin/.idx)")
    group.add_argument("--json-key", default="text", help="JSONL field holding the text")
    group.add_argument("--seq-length", type=int, required=required, help="tokens per sample")
    group.add_argument("--num-samples", type=int, default=num_samples,
                       help=f"samples to draw (default {num_samples or 'every window of the data'})")
    group.add_argument("--micro-batch-size", type=int, default=1, help="samples per forward")
    add_tokenizer_argument(group)


def add_expert_parallel_argument(parser: argparse.ArgumentParser, default: int | None = 1) -> None:
    """Megatron-LM's ``--expert-model-parallel-size`` (dest ``ep``): the data parallel ranks
    a mixture-of-experts layer splits its experts over (1: every rank holds every expert).
    ``default`` None leaves the value to a ``--config`` file (the trainer's default is 1)."""
    parser.add_argument("--expert-model-parallel-size", dest="ep", type=int, default=default,
                        help="expert parallel size (default 1)")


def add_output_format_argument(parser) -> None:
    from megatron_minitron.checkpoint.megatron_lm import OUTPUT_FORMATS

    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="minitron",
                        help="minitron (default) or megatron: a Megatron-LM torch_dist checkpoint "
                             "(pretrain_gpt.py --load OUT --finetune) that every minitron "
                             "command also loads")


def add_head_add_back_arguments(parser) -> None:
    """``--head-add-back [none|query|output]`` and ``--no-head-add-back`` (= none); a bare
    ``--head-add-back`` is ``output``, the form of the former on/off switch. The value is
    checked by :func:`megatron_minitron.prune.head_add_back_mode` (one-line error)."""
    from megatron_minitron.prune.plan import DEFAULT_HEAD_ADD_BACK, HEAD_ADD_BACK_MODES

    modes = "|".join(HEAD_ADD_BACK_MODES)
    parser.add_argument("--head-add-back", nargs="?", const="output",
                        default=DEFAULT_HEAD_ADD_BACK, metavar=modes,
                        help="where kept heads take the residual of pruned heads of their query "
                             "group: query (their query rows of the fused QKV), output (their "
                             "output-projection columns) or none (default "
                             f"{DEFAULT_HEAD_ADD_BACK}; bare: output)")
    parser.add_argument("--no-head-add-back", dest="head_add_back", action="store_const",
                        const="none", help="no head add-back (= --head-add-back none)")


def add_tokenizer_argument(parser) -> None:
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="Hugging Face tokenizer folder (default: the checkpoint's own; "
                             "needed for Megatron-LM checkpoints without one)")


def check_data_arguments(args, cfg: Optional[ModelConfig]) -> None:
    """Cheap checks before any model is built (``cfg`` None: a model not made yet, whose
    positions are not checked)."""
    for path in args.text_file or []:
        if not os.path.exists(path):
            raise UsageError(f"--text-file {path} does not exist; pass a text/JSONL file or folder")
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            raise UsageError(f"--text-file {path} is not readable")
    if args.data_prefix and not os.path.isfile(args.data_prefix + ".idx"):
        raise UsageError(f"--data-prefix {args.data_prefix} has no .idx/.bin files; build them "
                         "with `minitron preprocess-data`")
    if args.seq_length < 1:
        raise UsageError(f"--seq-length {args.seq_length} must be >= 1 (tokens per sample)")
    if cfg is not None and args.seq_length > cfg.max_position_embeddings:
        raise UsageError(f"--seq-length {args.seq_length} is longer than the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}; use a shorter "
                         "sequence")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples {args.num_samples} must be >= 1")
    if args.micro_batch_size < 1:
        raise UsageError(f"--micro-batch-size {args.micro_batch_size} must be >= 1")


def checkpoint_config(path: str) -> ModelConfig:
    read_checkpoint_info(path)
    return load_config(path)


def load_samples(args, checkpoint: str, cfg: ModelConfig) -> torch.Tensor:
    """Rank 0 tokenizes and draws the samples [N, L+1]; every rank receives the same tensor."""
    from megatron_minitron.data import calibration_samples, check_tokenizer_fits, load_tokenizer

    samples, error = None, None
    if parallel.is_rank0():
        try:
            tokenizer = None
            if args.text_file:
                tokenizer = load_tokenizer(getattr(args, "tokenizer", None) or checkpoint)
                check_tokenizer_fits(tokenizer, cfg.vocab_size)
            samples = calibration_samples(
                text_file=args.text_file, data_prefix=args.data_prefix, tokenizer=tokenizer,
                num_samples=args.num_samples, seq_length=args.seq_length, seed=args.seed,
            )
        except UsageError as err:
            error = str(err)
    samples, error = parallel.broadcast_object((samples, error))
    if error:
        raise UsageError(error)
    return samples


def fingerprint(samples: torch.Tensor) -> str:
    """sha256 of the exact token ids used."""
    return hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16]


ModelLookup = Callable[[str], Optional[ModelConfig]]
"""``path → ModelConfig`` of a checkpoint, or of one a recipe will make; None when unknown."""


def existing_model(path: str) -> Optional[ModelConfig]:
    """The :data:`ModelLookup` of a plain command: the checkpoint must exist (one-line error)."""
    return checkpoint_config(path)
