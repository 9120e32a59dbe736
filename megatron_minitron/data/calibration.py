"""Calibration and evaluation samples: fixed-length windows of a token stream, split over DP.

    samples = calibration_samples(text_file="docs/", tokenizer=tok, num_samples=64,
                                  seq_length=512, seed=1234)           # [64, 513]
    batches = micro_batches(samples, micro_batch_size=4, dp_rank=r, dp_size=dp)

The token stream is every document's ids with EOS appended (``data.text``), or the contents of a
Megatron indexed dataset. It is cut into non-overlapping windows of ``seq_length + 1`` tokens
(inputs plus the next-token label); a permutation seeded by ``seed`` picks ``num_samples`` of
them, so the same arguments give the same samples on every rank and every run.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy
import torch

from megatron_minitron.data.text import input_files, iter_documents, tokenize_documents
from megatron_minitron.data.tokenizer import eos_id
from megatron_minitron.errors import UsageError


def _text_stream(text_file: Sequence[str] | str, tokenizer) -> numpy.ndarray:
    files = input_files(text_file)
    if all(os.path.getsize(f) == 0 for f in files):
        raise UsageError(f"calibration data {text_file} is empty; pass a file with text")
    eos = eos_id(tokenizer)
    pieces = [numpy.asarray(ids, dtype=numpy.int64)
              for ids in tokenize_documents(iter_documents(files), tokenizer, eos)]
    return numpy.concatenate(pieces) if pieces else numpy.zeros(0, dtype=numpy.int64)


def calibration_samples(text_file: Optional[Sequence[str] | str] = None,
                        data_prefix: Optional[str] = None, tokenizer=None, *,
                        num_samples: Optional[int], seq_length: int,
                        seed: int = 1234) -> torch.Tensor:
    """Draws ``num_samples`` disjoint windows of ``seq_length + 1`` tokens.

    Args:
        text_file: text/JSON lines file(s) or folder(s), tokenized with ``tokenizer``.
        data_prefix: a Megatron indexed dataset prefix (already tokenized); exclusive with
            ``text_file``.
        tokenizer: a Hugging Face tokenizer; needed with ``text_file``.
        num_samples: number of windows; None takes every whole window of the data, in order
            (evaluation on a held-out text).
        seq_length: model sequence length; each window holds one token more.
        seed: seed of the permutation that picks the windows.

    Returns:
        LongTensor [num_samples, seq_length + 1]; window ``i`` of the stream is
        ``stream[i * (seq_length + 1):(i + 1) * (seq_length + 1)]``.

    Raises:
        UsageError: bad arguments, empty data, or fewer tokens than asked for.
    """
    if (num_samples is not None and num_samples < 1) or seq_length < 1:
        raise UsageError(f"num_samples={num_samples} and seq_length={seq_length} must be >= 1")
    if (text_file is None) == (data_prefix is None):
        raise UsageError("pass exactly one source of calibration data: a text file or a data "
                         "prefix")
    if data_prefix is not None:
        from megatron_minitron.data.indexed import token_stream

        source, stream = data_prefix, token_stream(data_prefix)
    else:
        if tokenizer is None:
            raise UsageError("calibration text needs a tokenizer; pass --tokenizer or a "
                             "checkpoint that carries one")
        source, stream = text_file, _text_stream(text_file, tokenizer)
    window = seq_length + 1
    if num_samples is None and stream.shape[0] >= window:
        count = stream.shape[0] // window
        return torch.from_numpy(numpy.asarray(stream[:count * window], dtype=numpy.int64)
                                .reshape(count, window))
    needed = (num_samples or 1) * window
    if stream.shape[0] == 0:
        raise UsageError(f"calibration data {source} is empty (0 tokens); pass a file with text")
    if stream.shape[0] < needed:
        raise UsageError(
            f"calibration data has {stream.shape[0]} tokens, need num_samples*(seq_length+1)="
            f"{num_samples}*{window}={needed}; pass more text or lower the number of samples "
            "or the sequence length")
    num_windows = stream.shape[0] // window
    chosen = numpy.random.default_rng(seed).permutation(num_windows)[:num_samples]
    rows = [numpy.asarray(stream[w * window:(w + 1) * window], dtype=numpy.int64) for w in chosen]
    return torch.from_numpy(numpy.stack(rows))  # [num_samples, seq_length + 1]


def micro_batches(samples: torch.Tensor, micro_batch_size: int, dp_rank: int = 0,
                  dp_size: int = 1, pad_remainder: bool = False) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's share of ``samples`` as micro-batches of next-token prediction.

    Shares are contiguous: with ``S = len(samples) / dp_size`` rank ``r`` gets samples
    ``[r * S, (r + 1) * S)`` in order, so the ranks' shares partition the samples exactly and
    every rank holds the same number of equally shaped micro-batches (as pipeline schedules need).

    Args:
        samples: LongTensor [N, L + 1] (see :func:`calibration_samples`).
        micro_batch_size: samples per micro-batch.
        dp_rank: this rank's index among the data parallel ranks.
        dp_size: number of data parallel ranks.
        pad_remainder: when ``N`` is not a multiple of ``micro_batch_size * dp_size``, pad the
            end with copies of sample 0 whose ``loss_mask`` is zero (every real token still
            counts exactly once in a masked loss; activation statistics would see the copies).
            When False such an ``N`` is an error.

    Returns:
        A list of ``{"tokens": [b, L], "labels": [b, L], "loss_mask": [b, L]}``: ``labels`` is
        ``tokens`` shifted by one; ``loss_mask`` is float, 1 for real samples.

    Raises:
        UsageError: bad sizes, or an uneven ``N`` without ``pad_remainder``.
    """
    if samples.dim() != 2 or samples.shape[1] < 2:
        raise UsageError(f"samples must be [N, L+1] with L >= 1, got {list(samples.shape)}")
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise UsageError(f"micro_batch_size={micro_batch_size} must be >= 1 and dp_rank="
                         f"{dp_rank} in [0, dp_size={dp_size})")
    num_samples = samples.shape[0]
    group = micro_batch_size * dp_size
    padded = -(-num_samples // group) * group
    if padded != num_samples and not pad_remainder:
        lower = num_samples // group * group
        raise UsageError(
            f"{num_samples} samples do not split into micro-batches of {micro_batch_size} over "
            f"{dp_size} data parallel ranks; use a multiple of {group} samples (e.g. "
            f"{lower or group} or {padded})")
    share = padded // dp_size
    indices = torch.arange(dp_rank * share, (dp_rank + 1) * share)
    real = indices < num_samples
    rows = samples[torch.where(real, indices, torch.zeros_like(indices))]  # [share, L + 1]
    mask = real.to(torch.float32)[:, None].expand(-1, samples.shape[1] - 1)
    batches = []
    for start in range(0, share, micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        batches.append({
            "tokens": chunk[:, :-1].contiguous(),  # [b, L]
            "labels": chunk[:, 1:].contiguous(),  # [b, L]
            "loss_mask": mask[start:start + micro_batch_size].contiguous(),  # [b, L]
        })
    return batches
