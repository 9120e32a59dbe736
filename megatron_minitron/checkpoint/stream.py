"""Tensor-by-tensor access to our checkpoints without building (or holding) a model.

mcore's ``torch_dist`` checkpoints store every parameter as one global tensor; layer parameters are
stacked along a leading layer axis under ``decoder.layers.<name>`` ([L, ...]), or, for a mixed
dense/mixture-of-experts stack, stored one layer at a time under ``decoder.layers.<i>.<name>``
(``adapter.checkpoint_layers_stacked``). Routed experts' tensors are stacked over the global
expert index (``...mlp.experts.experts.linear_fc1.weight``: [E, ...] in a layer). The format is
therefore independent of the TP/PP/EP layout it was saved at, and a checkpoint written here loads
at any layout.

* :class:`CheckpointReader` reads one layer's slice of a stacked tensor, or one global tensor, at a
  time (PyTorch Distributed Checkpoint with a planner that reads only that region).
* :func:`write_streaming_checkpoint` writes a checkpoint whose tensors are produced on demand,
  one layer slice at a time, through PyTorch Distributed Checkpoint with a planner that resolves
  each write item lazily — peak memory is one slice, never the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from megatron_minitron.checkpoint import io

LAYER_PREFIX = "decoder.layers."
# mcore's own marker files of a torch_dist checkpoint
MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}


class CheckpointReader:
    """Reads tensors of a checkpoint by key, one layer slice at a time."""

    def __init__(self, path: str):
        from megatron_minitron.checkpoint import megatron_lm

        self.path = megatron_lm.resolve(path)
        self._storage = _CachedMetadataReader(self.path)
        metadata = self._storage.read_metadata()
        self.shapes: Dict[str, torch.Size] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        for key, meta in metadata.state_dict_metadata.items():  # weights only (not optimizer)
            if hasattr(meta, "size") and key.startswith(megatron_lm.MODEL_KEY_PREFIXES):
                self.shapes[key] = meta.size
                self.dtypes[key] = meta.properties.dtype

    def layer_keys(self) -> List[str]:
        """Stacked per-layer keys (``decoder.layers.<name>``)."""
        return sorted(k for k in self.shapes if k.startswith(LAYER_PREFIX))

    def global_keys(self) -> List[str]:
        return sorted(k for k in self.shapes if not k.startswith(LAYER_PREFIX))

    def layer_tensors(self, layer: int) -> Dict[str, str]:
        """Source ``layer``'s tensors: ``{suffix: key}`` (e.g. ``mlp.router.weight`` →
        ``decoder.layers.2.mlp.router.weight``), from stacked and per-layer keys alike."""
        out = {}
        for key in self.layer_keys():
            head, _, rest = key[len(LAYER_PREFIX):].partition(".")
            if not head.isdigit():
                out[key[len(LAYER_PREFIX):]] = key  # stacked: every layer has it
            elif int(head) == layer:
                out[rest] = key
        return out

    def is_stacked(self, key: str) -> bool:
        """Whether layer key ``key`` holds every layer ([L, ...])."""
        return not key[len(LAYER_PREFIX):].partition(".")[0].isdigit()

    def layer_shape(self, key: str) -> Tuple[int, ...]:
        """One layer's shape of layer key ``key`` (without the stacked layer axis)."""
        shape = tuple(self.shapes[key])
        return shape[1:] if self.is_stacked(key) else shape

    def read_layer(self, key: str, layer: int,
                   rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Source ``layer``'s slice of layer key ``key`` (stacked or per-layer), its first
        dimension narrowed to ``rows``."""
        return self.read([key], layer=layer if self.is_stacked(key) else None, rows=rows)[key]

    def read(self, keys: Sequence[str], layer: Optional[int] = None,
             rows: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
        """Reads ``keys``: whole tensors, or the slice of source ``layer`` of stacked ones;
        ``rows=(start, stop)`` narrows the first (non-layer) dimension further."""
        import torch.distributed.checkpoint as dcp

        out, regions = {}, []
        for key in keys:
            shape = tuple(self.shapes[key])
            lead = 0 if layer is None else 1  # stacked tensors: [L, ...]
            offsets, sizes = [0] * len(shape), list(shape)
            if layer is not None:
                offsets[0], sizes[0] = layer, 1
            if rows is not None:
                offsets[lead], sizes[lead] = rows[0], rows[1] - rows[0]
            out[key] = torch.empty(sizes[lead:], dtype=self.dtypes[key])
            view = out[key].unsqueeze(0) if lead else out[key]
            regions.append((key, tuple(offsets), tuple(sizes), view))
        with _single_process():
            dcp.load({}, storage_reader=self._storage,
                     planner=_RegionLoadPlanner(regions), no_dist=True)
        return out


class _CachedMetadataReader(FileSystemReader):
    """Reads the checkpoint's ``.metadata`` once, however many regions are loaded."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata_cache"):
            self._metadata_cache = super().read_metadata(*args, **kwargs)
        return self._metadata_cache


class _RegionLoadPlanner(LoadPlanner):
    """Reads given regions (key, offsets, sizes, destination) of global tensors."""

    def __init__(self, regions):
        self.regions = {key: (offsets, view) for key, offsets, _, view in regions}
        self.chunks = {key: ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                 sizes=torch.Size(sizes))
                       for key, offsets, sizes, _ in regions}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, chunk in self.chunks.items():
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise ValueError(f"unexpected non-tensor item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        _, view = self.regions[read_item.dest_index.fqn]
        return narrow_to(view, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor):
        pass


@contextlib.contextmanager
def _single_process():
    """DCP warns that it runs without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def narrow_to(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


@dataclasses.dataclass
class TensorSpec:
    """One output tensor: its global shape, and how to produce each chunk."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    chunks: List[Tuple[Tuple[int, ...], Tuple[int, ...], Callable[[], torch.Tensor]]]
    """(offsets, sizes, producer) — producer() returns the chunk tensor when it is written."""


class _LazySavePlanner(SavePlanner):
    """A SavePlanner whose write items are produced on demand (see module docstring)."""

    def __init__(self, specs: Sequence[TensorSpec], objects: Optional[Dict[str, bytes]] = None):
        self.specs = specs
        self.objects = dict(objects or {})
        self.producers = {}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True):
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for spec in self.specs:
            properties = TensorProperties(dtype=spec.dtype)
            for offsets, sizes, producer in spec.chunks:
                index = MetadataIndex(spec.key, torch.Size(offsets))
                self.producers[(spec.key, tuple(offsets))] = producer
                items.append(WriteItem(
                    index=index, type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                   sizes=torch.Size(sizes)),
                        properties=properties, size=torch.Size(spec.shape))))
        for key in self.objects:  # mcore ShardedObjects: bytes under their unique key
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def create_global_plan(self, all_plans):
        plans, self.metadata = create_default_global_save_plan(all_plans)
        return plans, self.metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            import io as _io

            return _io.BytesIO(self.objects[write_item.index.fqn])
        producer = self.producers[(write_item.index.fqn, tuple(write_item.index.offset))]
        return producer().contiguous()


def return_freed_memory_promptly(threshold: int = 1 << 20) -> bool:
    """Asks glibc to serve allocations above ``threshold`` bytes with mmap, so tensors freed
    between streamed slices go back to the OS instead of growing the heap (glibc otherwise
    raises that threshold up to 32 MiB after the first large free). No-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def write_torch_dist(specs: Sequence[TensorSpec], folder: str, common: Dict,
                     objects: Optional[Dict[str, bytes]] = None) -> None:
    """Writes ``specs`` (and serialized ShardedObjects ``objects`` by unique key) as an mcore
    torch_dist checkpoint in the existing ``folder``, with ``common`` as its common state."""
    import torch.distributed.checkpoint as dcp

    writer = FileSystemWriter(folder, single_file_per_rank=False, thread_count=1,
                              sync_files=True)
    with _single_process():
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(specs, objects),
                 no_dist=True)
    torch.save(common, os.path.join(folder, "common.pt"))
    with open(os.path.join(folder, "metadata.json"), "w") as handle:
        json.dump(MCORE_METADATA, handle)


def write_streaming_checkpoint(specs: Sequence[TensorSpec], cfg, path: str,
                               meta: Optional[Dict] = None,
                               tokenizer_from: Optional[str] = None) -> None:
    """Writes a complete checkpoint of ours at ``path`` atomically (single process)."""
    path = os.path.abspath(path)
    io.check_output_path(path)
    return_freed_memory_promptly()
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write_torch_dist(specs, tmp, common={})
        io.finalize_checkpoint_dir(tmp, path, cfg, meta, tokenizer_from,
                                   saved_layout={"tp": 1, "pp": 1, "streamed": True})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
