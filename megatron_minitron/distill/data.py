"""Training and validation samples of a run: a Megatron indexed dataset (mcore's GPTDataset) or
windows of tokenized text, consumed through the resumable :class:`MicroBatchSampler`.

Both give samples ``{"tokens", "labels", "loss_mask"}`` of ``seq_length`` tokens; sample ``i``
is a fixed function of ``i`` and the seed, so a run that resumes at ``consumed_samples`` sees
exactly the samples it would have seen.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import numpy
import torch

from megatron_minitron import parallel
from megatron_minitron.errors import UsageError


class TokenWindows:
    """``num_samples`` samples from disjoint windows of ``seq_length + 1`` tokens of a stream.

    Windows are visited in a fresh seeded permutation each epoch.
    """

    def __init__(self, stream: numpy.ndarray, seq_length: int, windows: numpy.ndarray,
                 num_samples: int, seed: int):
        self.stream = stream
        self.window = seq_length + 1
        self.windows = windows
        self.num_samples = num_samples
        self.seed = seed
        self._orders: Dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> numpy.ndarray:
        if epoch not in self._orders:
            rng = numpy.random.default_rng([self.seed, epoch])
            self._orders = {epoch: rng.permutation(len(self.windows))}
        return self._orders[epoch]

    def __getitem__(self, index: int) -> Dict[str, numpy.ndarray]:
        epoch, position = divmod(int(index), len(self.windows))
        start = int(self.windows[self._order(epoch)[position]]) * self.window
        ids = numpy.asarray(self.stream[start:start + self.window], dtype=numpy.int64)
        return {"tokens": ids[:-1], "labels": ids[1:],
                "loss_mask": numpy.ones(self.window - 1, dtype=numpy.float32)}


class RunData(NamedTuple):
    train: object
    valid: Optional[object]


def _valid_share(split: str) -> float:
    shares = [float(x) for x in split.replace("/", ",").split(",")]
    shares += [0.0] * (3 - len(shares))
    return shares[1] / sum(shares)


def _text_stream(text_file: List[str], tokenizer, json_key: str) -> numpy.ndarray:
    from megatron_minitron.data import eos_id, iter_documents, tokenize_documents

    pieces = [numpy.asarray(ids, dtype=numpy.int32)
              for ids in tokenize_documents(iter_documents(text_file, json_key), tokenizer,
                                            eos_id(tokenizer))]
    return numpy.concatenate(pieces) if pieces else numpy.zeros(0, dtype=numpy.int32)


def text_windows(text_file: List[str], tokenizer, json_key: str, seq_length: int,
                 train_samples: int, valid_samples: int, split: str, seed: int) -> RunData:
    """Tokenizes ``text_file`` on rank 0 (others receive the ids) and splits its windows."""
    stream, error = None, None
    if parallel.is_rank0():
        try:
            stream = _text_stream(text_file, tokenizer, json_key)
        except UsageError as err:
            error = str(err)
    stream, error = parallel.broadcast_object((stream, error))
    if error:
        raise UsageError(error)
    num_windows = stream.shape[0] // (seq_length + 1)
    if num_windows == 0:
        raise UsageError(f"--text-file {' '.join(text_file)} holds {stream.shape[0]} tokens, "
                         f"less than one sample of --seq-length {seq_length} + 1; pass more text")
    order = numpy.random.default_rng(seed).permutation(num_windows)
    num_valid = round(num_windows * _valid_share(split)) if valid_samples else 0
    if valid_samples and num_valid == 0:
        num_valid = 1
    if num_valid >= num_windows:
        raise UsageError(f"--text-file has {num_windows} windows of {seq_length + 1} tokens, too "
                         "few to hold out validation windows; pass more text or lower "
                         "--eval-samples/--eval-interval")
    train = TokenWindows(stream, seq_length, order[num_valid:], train_samples, seed)
    valid = (TokenWindows(stream, seq_length, order[:num_valid], valid_samples, seed + 1)
             if num_valid else None)
    return RunData(train, valid)


def indexed_data(data_prefix: List[str], tokenizer, seq_length: int, train_samples: int,
                 valid_samples: int, split: str, seed: int, cache_dir: Optional[str]) -> RunData:
    """mcore GPTDatasets over a (blended) indexed dataset; collective."""
    from megatron_minitron.data import build_gpt_datasets

    datasets = build_gpt_datasets(data_prefix, tokenizer, seq_length,
                                  train_samples=train_samples,
                                  valid_samples=valid_samples or None, split=split, seed=seed,
                                  cache_dir=cache_dir)
    if datasets.train is None or len(datasets.train) == 0:
        raise UsageError(f"--data-prefix {' '.join(data_prefix)} gives no training samples with "
                         f"--split {split}; give train a share")
    if valid_samples and (datasets.valid is None or len(datasets.valid) == 0):
        raise UsageError(f"--data-prefix {' '.join(data_prefix)} gives no validation samples "
                         f"with --split {split}; give validation a share or drop --eval-*")
    return RunData(datasets.train, datasets.valid if valid_samples else None)


def take(iterator, count: int) -> List[Dict[str, torch.Tensor]]:
    """The next ``count`` micro-batches of a sampler iterator."""
    batches = []
    for _ in range(count):
        try:
            batches.append(next(iterator))
        except StopIteration:
            raise UsageError("the data ran out before the last step; this is a bug in the "
                             "sample count") from None
    return batches
