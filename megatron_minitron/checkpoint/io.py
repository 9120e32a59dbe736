"""Checkpoints: mcore dist_checkpointing shards plus the model config, written atomically.

Layout of a checkpoint directory ``CKPT``::

    CKPT/minitron_config.json   # {"format", "version", "model": ModelConfig, "meta": {...}}
    CKPT/metadata.json, *.distcp, common.pt   # megatron.core.dist_checkpointing (torch_dist)

A save writes into ``CKPT.tmp`` and renames it into place only when every rank has finished, so a
crash mid-save never leaves a directory that loads as complete. A directory is "ours" when it
holds ``minitron_config.json``; nothing else is ever overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.files import write_json_atomic

CONFIG_FILE = "minitron_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "megatron_minitron.checkpoint"
VERSION = 1


class CheckpointError(UsageError):
    """A path that is not a loadable checkpoint of ours, or may not be overwritten."""


def tokenizer_dir(path: str) -> Optional[str]:
    """The HF tokenizer folder of a checkpoint (``path/tokenizer``), or ``path`` itself if it
    holds tokenizer files; None when there is none."""
    inner = os.path.join(path, TOKENIZER_DIR)
    if os.path.isdir(inner):
        return inner
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return path
    return None


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def check_output_path(path: str) -> None:
    """Raises unless ``path`` is absent, an empty directory, or one of our checkpoints."""
    if not os.path.exists(path):
        return
    if os.path.isfile(path):
        raise CheckpointError(f"--output {path} is an existing file; choose a new directory")
    if os.listdir(path) and not is_checkpoint(path):
        raise CheckpointError(
            f"--output {path} exists and is not a megatron_minitron checkpoint; "
            "choose a new or empty directory"
        )


def read_checkpoint_info(path: str) -> Dict[str, Any]:
    """Reads and validates ``minitron_config.json``; raises CheckpointError with the fix."""
    if not os.path.exists(path):
        raise CheckpointError(f"--load {path} does not exist; pass a checkpoint directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {path} is not a directory; pass a checkpoint directory")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"--load {path} has no {CONFIG_FILE}: not a megatron_minitron checkpoint "
            "(convert Hugging Face models with `minitron import-hf`)"
        )
    try:
        with open(config_path) as handle:
            info = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"--load {path}: unreadable {CONFIG_FILE} ({err})") from err
    if info.get("format") != FORMAT:
        raise CheckpointError(f"--load {path}: {CONFIG_FILE} has format {info.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return info


def load_config(path: str) -> ModelConfig:
    return ModelConfig.from_dict(read_checkpoint_info(path)["model"])


def finalize_checkpoint_dir(tmp: str, path: str, cfg: ModelConfig, meta: Optional[Dict[str, Any]],
                            tokenizer_from: Optional[str], saved_layout: Dict[str, Any]) -> None:
    """Adds config and tokenizer to the fully written ``tmp`` and renames it to ``path``.

    An existing checkpoint at ``path`` is replaced only after ``tmp`` is complete.
    """
    source = tokenizer_dir(tokenizer_from) if tokenizer_from else None
    if source:
        shutil.copytree(source, os.path.join(tmp, TOKENIZER_DIR))
    info = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(),
            "meta": dict(meta or {}, saved_layout=saved_layout)}
    write_json_atomic(os.path.join(tmp, CONFIG_FILE), info)
    old = f"{path}.old"
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def save_checkpoint(model, cfg: ModelConfig, path: str,
                    meta: Optional[Dict[str, Any]] = None,
                    extra_state: Optional[Dict[str, Any]] = None,
                    tokenizer_from: Optional[str] = None,
                    extra_sharded: Optional[Dict[str, Any]] = None) -> None:
    """Saves this rank's shards of ``model`` (collective over all ranks) atomically to ``path``.

    ``extra_state``: a plain dict (optimizer step, data position, ...) stored by rank 0 as
    ``extra_state.pt``. ``tokenizer_from``: a directory of HF tokenizer files (or a checkpoint
    holding ``tokenizer/``) copied into ``path/tokenizer``. ``extra_sharded``: more mcore
    sharded tensors (optimizer state, ...) saved beside the weights under their own keys; they
    load back with :func:`load_sharded` and are ignored by :func:`load_checkpoint`.
    """
    from megatron.core import dist_checkpointing

    path = os.path.abspath(path)
    tmp = f"{path}.tmp"
    if parallel.is_rank0():
        check_output_path(path)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    parallel.barrier()
    sharded = adapter.sharded_state_dict(model)
    if extra_sharded:
        clash = set(sharded) & set(extra_sharded)
        if clash:
            raise ValueError(f"extra_sharded keys {sorted(clash)[:3]} clash with model keys")
        sharded.update(extra_sharded)
    dist_checkpointing.save(sharded, tmp)
    parallel.barrier()
    if parallel.is_rank0():
        if extra_state is not None:
            torch.save(extra_state, os.path.join(tmp, "extra_state.pt"))
        layout = parallel.current_layout()
        finalize_checkpoint_dir(tmp, path, cfg, meta, tokenizer_from,
                                saved_layout={"tp": layout.tp, "pp": layout.pp})
    parallel.barrier()


def load_weights(model, path: str) -> None:
    """Loads the checkpoint's weights into ``model`` (built at the current layout)."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    canonical_to_module = {}
    request = {}
    for key, value in sharded.items():
        if key.endswith("_extra_state"):
            continue
        canon = adapter.canonical_key(key)
        canonical_to_module[canon] = key
        if hasattr(value, "key"):
            value.key = adapter.canonical_key(value.key)
        request[canon] = value
    loaded = dist_checkpointing.load(request, path)
    state = {canonical_to_module[k]: v for k, v in loaded.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def load_sharded(path: str, sharded: Dict[str, Any]) -> Dict[str, Any]:
    """Loads the requested mcore sharded tensors (e.g. ``extra_sharded`` of a save) from
    ``path``; collective. Returns the same keys holding the loaded tensors."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded, path)


def load_checkpoint(path: str, params_dtype: torch.dtype = torch.float32):
    """Builds the model described by ``path``'s config at the current layout and loads it
    (weights cast to ``params_dtype``; built without random initialisation, with the fused
    kernels this machine has).

    Returns ``(model, cfg)``.
    """
    from megatron_minitron.precision import gpu_fields

    cfg = load_config(path)
    fields, _ = gpu_fields(cfg, params_dtype)
    model = adapter.build_gpt_model(cfg, params_dtype=params_dtype, init_weights=False, **fields)
    load_weights(model, path)
    return model, cfg


def load_extra_state(path: str) -> Optional[Dict[str, Any]]:
    file = os.path.join(path, "extra_state.pt")
    return torch.load(file, weights_only=False) if os.path.isfile(file) else None
