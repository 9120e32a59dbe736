"""Data: tokenizers, documents, Megatron indexed datasets, calibration samples, training data.

Public functions:

* :func:`load_tokenizer`, :func:`check_tokenizer_fits`, :func:`eos_id` (``tokenizer``)
* :func:`iter_documents`, :func:`tokenize_documents` (``text``)
* :func:`build_indexed_dataset`, :func:`open_indexed_dataset`, :func:`token_stream`,
  :func:`indexed_num_tokens` (``indexed``)
* :func:`calibration_samples`, :func:`micro_batches` (``calibration``)
* :func:`build_gpt_datasets`, :class:`MicroBatchSampler`, :class:`MegatronTokenizer`,
  :func:`ensure_dataset_helpers` (``training``)
"""

from megatron_minitron.data.calibration import calibration_samples, micro_batches
from megatron_minitron.data.indexed import (
    IndexedStats,
    build_indexed_dataset,
    indexed_num_tokens,
    open_indexed_dataset,
    token_stream,
)
from megatron_minitron.data.text import iter_documents, tokenize_documents
from megatron_minitron.data.tokenizer import check_tokenizer_fits, eos_id, load_tokenizer
from megatron_minitron.data.training import (
    GPTDatasets,
    MegatronTokenizer,
    MicroBatchSampler,
    build_gpt_datasets,
    ensure_dataset_helpers,
)

__all__ = [
    "GPTDatasets", "IndexedStats", "MegatronTokenizer", "MicroBatchSampler",
    "build_gpt_datasets", "build_indexed_dataset", "calibration_samples", "check_tokenizer_fits",
    "ensure_dataset_helpers", "eos_id", "indexed_num_tokens", "iter_documents", "load_tokenizer",
    "micro_batches", "open_indexed_dataset", "token_stream", "tokenize_documents",
]
