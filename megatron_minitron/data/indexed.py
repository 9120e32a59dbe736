"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) from text and JSON lines.

    minitron preprocess-data --input docs/ --tokenizer CKPT --output-prefix data/docs

Each document becomes one sequence of token ids with the tokenizer's EOS appended, written with
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` (``uint16`` ids for vocabularies
under 65,500 tokens, ``int32`` otherwise). Both files are written under temporary names and
renamed into place, the ``.idx`` last, so a prefix whose ``.idx`` exists is complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import numpy

from megatron_minitron.compat.cpu import apply_cpu_patches
from megatron_minitron.data.text import input_files, iter_documents, tokenize_document
from megatron_minitron.data.tokenizer import eos_id
from megatron_minitron.errors import UsageError

apply_cpu_patches()

from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)

logger = logging.getLogger("megatron_minitron")


@dataclass(frozen=True)
class IndexedStats:
    """What :func:`build_indexed_dataset` wrote."""

    prefix: str
    """The dataset prefix (``prefix.bin``, ``prefix.idx``)."""
    documents: int
    """Number of documents (sequences) written."""
    tokens: int
    """Number of token ids written, EOS tokens included."""


_WORKER_STATE = {}


def _init_worker(tokenizer, eos: int) -> None:
    _WORKER_STATE.update(tokenizer=tokenizer, eos=eos)


def _encode(text: str) -> List[int]:
    return tokenize_document(text, _WORKER_STATE["tokenizer"], _WORKER_STATE["eos"])


def _encoded(documents: Iterator[str], tokenizer, eos: int, workers: int) -> Iterator[List[int]]:
    if workers <= 1:
        for text in documents:
            yield tokenize_document(text, tokenizer, eos)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context().Pool(workers, _init_worker, (tokenizer, eos)) as pool:
        yield from pool.imap(_encode, documents, chunksize=8)


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def build_indexed_dataset(inputs: Sequence[str] | str, tokenizer, output_prefix: str,
                          json_key: str = "text", workers: int = 1) -> IndexedStats:
    """Tokenizes ``inputs`` into the indexed dataset ``output_prefix.{bin,idx}``.

    Args:
        inputs: text files, folders of text files, JSON lines files (see ``data.text``).
        tokenizer: a Hugging Face tokenizer (see :func:`load_tokenizer`).
        output_prefix: path prefix of the two output files; its folder is created.
        json_key: the text field of JSON lines records.
        workers: tokenizer processes (1: tokenize in this process).

    Returns:
        The counts written.

    Raises:
        UsageError: bad inputs, or no non-empty document.
    """
    if workers < 1:
        raise UsageError(f"--workers {workers} must be >= 1")
    eos = eos_id(tokenizer)
    dtype = DType.optimal_dtype(len(tokenizer))
    documents = iter_documents(input_files(inputs), json_key)  # paths checked here
    output_prefix = os.path.abspath(output_prefix)
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    num_documents = num_tokens = 0
    try:
        for ids in _encoded(documents, tokenizer, eos, workers):
            if not ids:
                continue
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
            num_documents += 1
            num_tokens += len(ids)
        if num_documents == 0:
            raise UsageError(f"inputs {inputs} hold no text; pass non-empty documents")
        builder.finalize(f"{tmp}.idx")
        _remove(f"{output_prefix}.idx")  # a prefix with a .idx always has its matching .bin
        os.replace(f"{tmp}.bin", f"{output_prefix}.bin")
        os.replace(f"{tmp}.idx", f"{output_prefix}.idx")
    finally:
        builder.data_file.close()
        _remove(f"{tmp}.bin")
        _remove(f"{tmp}.idx")
    logger.info("wrote %s.{bin,idx}: %d documents, %d tokens", output_prefix, num_documents,
                num_tokens)
    return IndexedStats(output_prefix, num_documents, num_tokens)


def _check_prefix(prefix: str) -> None:
    if not IndexedDataset.exists(prefix):
        raise UsageError(f"data prefix {prefix}: {prefix}.bin/{prefix}.idx not found; build it "
                         "with `minitron preprocess-data --output-prefix PREFIX`")


def open_indexed_dataset(prefix: str) -> IndexedDataset:
    """The indexed dataset at ``prefix`` (memory-mapped).

    Raises:
        UsageError: when ``prefix.bin``/``prefix.idx`` are missing.
    """
    _check_prefix(prefix)
    return IndexedDataset(prefix, mmap=True)


def indexed_num_tokens(prefix: str) -> int:
    """Number of token ids stored at ``prefix``, read from its index alone."""
    dataset = open_indexed_dataset(prefix)
    return int(dataset.sequence_lengths.sum(dtype=numpy.int64))


def token_stream(prefix: str) -> numpy.ndarray:
    """All token ids of ``prefix`` in document order, as a read-only memory map.

    The ``.bin`` file stores the documents back to back, so the file itself is the stream.
    """
    dataset = open_indexed_dataset(prefix)
    dtype = dataset.index.dtype
    if os.path.getsize(f"{prefix}.bin") == 0:
        return numpy.zeros(0, dtype=dtype)
    stream = numpy.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    expected = int(dataset.sequence_lengths.sum(dtype=numpy.int64))
    if stream.shape[0] != expected:
        raise UsageError(f"data prefix {prefix}: .bin holds {stream.shape[0]} tokens but .idx "
                         f"describes {expected}; rebuild it with `minitron preprocess-data`")
    return stream
