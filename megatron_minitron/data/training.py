"""Training and validation data: Megatron-Core's GPTDataset over blended indexed datasets, and a
deterministic, resumable micro-batch sampler.

    datasets = build_gpt_datasets(["0.7", "data/web", "0.3", "data/code"], tokenizer,
                                  seq_length=1024, train_samples=64_000, split="98,2,0")
    sampler = MicroBatchSampler(datasets.train, micro_batch_size=4, dp_rank=r, dp_size=dp,
                                consumed_samples=resumed_from)
    for batch in sampler:      # {"tokens", "labels", "loss_mask"}: [4, 1024]
        ...                    # sampler.consumed_samples counts this batch too

Samples are packed across documents (each ends with EOS) exactly as Megatron-LM trains;
GPTDataset's shuffled indices are cached next to the data (``PREFIX`` folder ``cache/``) or in
``cache_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_minitron.compat.cpu import apply_cpu_patches
from megatron_minitron.data.tokenizer import eos_id
from megatron_minitron.errors import UsageError

apply_cpu_patches()

import megatron.core.datasets as mcore_datasets  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.datasets.utils import get_blend_from_list  # noqa: E402

_HELPERS = "megatron.core.datasets.helpers_cpp"


class MegatronTokenizer:
    """What mcore's datasets read from a tokenizer, taken from a Hugging Face one.

    mcore 0.16 and 0.19 both type ``GPTDatasetConfig.tokenizer`` as ``MegatronTokenizerBase``
    but read only the attributes below (``unique_identifiers`` names the tokenizer in the hash of
    the cached sample indices).
    """

    def __init__(self, tokenizer) -> None:
        self.vocab_size = len(tokenizer)
        self.eod = eos_id(tokenizer)
        self.eos = self.eod
        self.pad = -1  # no id: mcore never masks a real token as padding
        vocab = sorted(tokenizer.get_vocab().items())
        digest = hashlib.sha256(repr(vocab).encode("utf-8")).hexdigest()[:16]
        self.unique_identifiers = {"class": "HuggingFaceTokenizer", "vocab_size": self.vocab_size,
                                   "eod": self.eod, "vocab_sha256": digest}


def _compile_helpers(build_dir: str) -> str:
    """Builds mcore's ``helpers.cpp`` (pybind11) like its Makefile; returns the module path."""
    import pybind11

    source = os.path.join(os.path.dirname(mcore_datasets.__file__), "helpers.cpp")
    target = os.path.join(build_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.isfile(target):
        return target
    compiler = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        raise UsageError("megatron-core's dataset helpers (helpers_cpp) are not compiled and no "
                         "C++ compiler was found; install g++ (apt-get install g++)")
    if not os.path.isfile(source):
        raise UsageError(f"megatron-core's dataset helpers are not compiled and {source} is "
                         "missing; reinstall megatron-core")
    os.makedirs(build_dir, exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    command = [compiler, "-O3", "-shared", "-std=c++11", "-fPIC", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", source, "-o", tmp]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(f"compiling megatron-core's dataset helpers failed: "
                         f"{(result.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(tmp, target)
    return target


def ensure_dataset_helpers(build_dir: Optional[str] = None) -> str:
    """Makes ``megatron.core.datasets.helpers_cpp`` importable; returns its file.

    megatron-core wheels ship it compiled. Where it is missing (a source install, another
    Python), ``helpers.cpp`` is compiled once with pybind11 and the system C++ compiler into
    ``build_dir`` (default ``$MINITRON_ASSETS/mcore-helpers-<version>``) and registered under
    mcore's module name; site-packages is never written to.
    """
    if _HELPERS in sys.modules:
        return sys.modules[_HELPERS].__file__
    try:
        from megatron.core.datasets import helpers_cpp
        return helpers_cpp.__file__
    except ImportError:
        pass
    from importlib.metadata import version

    from megatron_minitron.assets import asset_root

    build_dir = build_dir or os.path.join(asset_root(),
                                          f"mcore-helpers-{version('megatron-core')}")
    path = _compile_helpers(build_dir)
    spec = importlib.util.spec_from_file_location(_HELPERS, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_HELPERS] = module
    return path


class GPTDatasets(NamedTuple):
    """The three splits; a split whose share (or size) is zero is None."""

    train: Optional[GPTDataset]
    valid: Optional[GPTDataset]
    test: Optional[GPTDataset]


def _parse_blend(blend: Sequence[str] | str):
    items = blend.split() if isinstance(blend, str) else [str(b) for b in blend]
    if not items:
        raise UsageError("--data-path is empty; pass PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'")
    try:
        prefixes, weights = get_blend_from_list(items)
    except (AssertionError, ValueError) as err:
        raise UsageError(f"--data-path {' '.join(items)}: expected PREFIX or 'W1 PREFIX1 W2 "
                         f"PREFIX2 ...' with numeric weights ({err})") from err
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise UsageError(f"data prefix {prefix}: {prefix}.bin/{prefix}.idx not found; build "
                             "it with `minitron preprocess-data --output-prefix PREFIX`")
    return prefixes, weights


def _check_split(split: str) -> None:
    parts = split.replace("/", ",").split(",")
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or min(shares) < 0 or sum(shares) <= 0:
        raise UsageError(f"--split {split}: expected up to three non-negative train,valid,test "
                         "shares, e.g. 98,2,0")


def build_gpt_datasets(blend: Sequence[str] | str, tokenizer, seq_length: int,
                       train_samples: int, valid_samples: Optional[int] = None,
                       test_samples: Optional[int] = None, split: str = "98,2,0",
                       seed: int = 1234, cache_dir: Optional[str] = None) -> GPTDatasets:
    """Builds mcore GPTDatasets (blended when several prefixes are given).

    Collective when torch.distributed is initialised: rank 0 builds the cached indices first,
    then every rank loads them (all ranks must call).

    Args:
        blend: ``["PREFIX"]``, ``["W1", "PREFIX1", "W2", "PREFIX2", ...]`` or the same as one
            space-separated string.
        tokenizer: the Hugging Face tokenizer the data was built with (or its
            :class:`MegatronTokenizer`, which pickles without ``transformers``).
        seq_length: tokens per sample (each sample draws ``seq_length + 1``).
        train_samples: samples of the training split (epochs repeat as needed).
        valid_samples, test_samples: samples of those splits; None means one pass over a
            single dataset (a weighted blend needs a number).
        split: relative sizes of train/valid/test documents, e.g. ``"98,2,0"``.
        seed: seed of mcore's document and sample shuffles.
        cache_dir: where the shuffled indices go (default: ``cache/`` next to the data).
    """
    ensure_dataset_helpers()
    prefixes, weights = _parse_blend(blend)
    _check_split(split)
    if seq_length < 1 or train_samples < 0:
        raise UsageError(f"seq_length={seq_length} must be >= 1 and train_samples="
                         f"{train_samples} >= 0")
    if len(prefixes) == 1:
        weights = None  # one dataset: its weight is meaningless
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=(tokenizer if isinstance(tokenizer, MegatronTokenizer)
                   else MegatronTokenizer(tokenizer)),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    sizes = [train_samples, valid_samples, test_samples]
    for index, name in enumerate(("train", "valid", "test")):
        if weights is not None and sizes[index] is None:
            if config.split_matrix[index] is not None:
                raise UsageError(f"a weighted blend needs the number of {name} samples; pass it "
                                 f"or give {name} a zero share of --split {split}")
            sizes[index] = 0
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with _process_group():
        return GPTDatasets(*builder.build())


@contextlib.contextmanager
def _process_group():
    """A one-process gloo group while none exists: mcore 0.16's BlendedDataset asks
    ``torch.distributed.get_rank()`` before caching its indices, even in a single process."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class MicroBatchSampler:
    """One DP rank's micro-batches of a dataset, in a fixed order, resumable at any point.

    Order (Megatron-LM's pretraining sampler): a global micro-batch covers dataset indices
    ``[c, c + micro_batch_size * dp_size)`` where ``c`` is the number of samples consumed so
    far, and rank ``r`` takes ``[c + r * micro_batch_size, c + (r + 1) * micro_batch_size)``.
    Iteration stops before a global micro-batch that would run past the dataset. As positions
    are counted in global samples, a run may resume with another DP size.

    Attributes:
        consumed_samples: global samples consumed, counting the batch last yielded; store it in
            a checkpoint and pass it back to resume exactly.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UsageError(f"micro_batch_size={micro_batch_size} must be >= 1 and dp_rank="
                             f"{dp_rank} in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise UsageError(f"consumed_samples={consumed_samples} must be >= 0")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro-batches left."""
        return max(len(self.dataset) - self.consumed_samples, 0) // self.global_micro_batch

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        while self.consumed_samples + self.global_micro_batch <= len(self.dataset):
            start = self.consumed_samples + self.dp_rank * self.micro_batch_size
            indices = range(start, start + self.micro_batch_size)
            self.consumed_samples += self.global_micro_batch
            yield collate([self.dataset[i] for i in indices])


def collate(items: List[Dict]) -> Dict[str, torch.Tensor]:
    """Stacks GPTDataset items into ``{"tokens", "labels": [b, L] long, "loss_mask": [b, L]}``."""
    return {
        "tokens": torch.stack([torch.as_tensor(i["tokens"]) for i in items]).long(),
        "labels": torch.stack([torch.as_tensor(i["labels"]) for i in items]).long(),
        "loss_mask": torch.stack([torch.as_tensor(i["loss_mask"]) for i in items]).float(),
    }
