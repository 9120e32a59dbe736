"""Checkpoints: mcore dist_checkpointing shards plus the model config, written atomically.

Layout of a checkpoint directory ``CKPT``::

    CKPT/minitron_config.json   # {"format", "version", "model": ModelConfig, "meta": {...}}
    CKPT/metadata.json, *.distcp, common.pt   # megatron.core.dist_checkpointing (torch_dist)

Tensors are named by mcore's scheme whichever layer spec built the model: a layer's norms under
Transformer Engine's names (``decoder.layers.self_attention.linear_qkv.layer_norm_weight``,
``decoder.layers.mlp.linear_fc1.layer_norm_weight``), as Megatron-LM checkpoints name them
(version 2). Version 1 checkpoints named them ``input_layernorm.weight`` and
``pre_mlp_layernorm.weight``; they load all the same (:func:`adapter.match_checkpoint_keys`).

A save writes into ``CKPT.tmp`` and renames it into place only when every rank has finished, so a
crash mid-save never leaves a directory that loads as complete. A directory is "ours" when it
holds ``minitron_config.json``; nothing else is ever overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.files import write_json_atomic

CONFIG_FILE = "minitron_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "megatron_minitron.checkpoint"
VERSION = 2
"""2: norms under mcore's (Transformer Engine) key names; 1: under the local spec's."""


class CheckpointError(UsageError):
    """A path that is not a loadable checkpoint of ours, or may not be overwritten."""


def tokenizer_dir(path: str) -> Optional[str]:
    """The HF tokenizer folder of a checkpoint (``path/tokenizer``), or ``path`` itself if it
    holds tokenizer files; None when there is none."""
    from megatron_minitron.checkpoint import megatron_lm

    path = megatron_lm.resolve(path, strict=False)
    if megatron_lm.is_megatron_lm(path):  # its args.tokenizer_model, when an HF folder
        return megatron_lm.tokenizer_folder(path)
    inner = os.path.join(path, TOKENIZER_DIR)
    if os.path.isdir(inner):
        return inner
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return path
    return None


def is_checkpoint(path: str) -> bool:
    """True for a checkpoint of ours (also one written with ``--output-format megatron``)."""
    from megatron_minitron.checkpoint import megatron_lm

    return os.path.isfile(os.path.join(megatron_lm.resolve(path, strict=False), CONFIG_FILE))


MODEL_SUBDIRS = ("final", "best")
"""Output folders that stand for one model: a training run's ``final/``, a search's ``best``."""

LOAD_ARGS = ("load", "teacher", "student")
"""Command arguments that name a model to read."""


def resolve_model_dir(path: str) -> str:
    """``path`` itself when it is a checkpoint; for the output folder of ``minitron distill``/
    ``train``/``correct-teacher`` (or ``search``) the model it produced (``final``/``best``)."""
    if os.path.isdir(path) and not is_checkpoint(path):
        for name in MODEL_SUBDIRS:
            inner = os.path.join(path, name)
            if is_checkpoint(inner):
                return inner
    return path


def resolve_load_args(args) -> None:
    """Points every model-reading argument of a parsed command at the model itself."""
    for name in LOAD_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            resolved = resolve_model_dir(value)
            if resolved != value:
                parallel.log_rank0(f"--{name} {value}: using its model {resolved}")
                setattr(args, name, resolved)


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
    from megatron_minitron.checkpoint import megatron_lm

    folder = megatron_lm.resolve(path)
    if megatron_lm.is_megatron_lm(folder):  # a Megatron-LM torch_dist checkpoint
        return megatron_lm.checkpoint_info(folder, path)
    megatron_lm.check_format(folder, path)
    path = folder
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path) and os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(
            f"--load {path} is a training output folder without a final model (the run has not "
            f"finished): resume it with `--resume auto`, or pass one of {path}/checkpoints/*")
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
    write_checkpoint_files(tmp, cfg, meta, tokenizer_from, saved_layout)
    replace_directory(tmp, path)


def write_checkpoint_files(folder: str, cfg: ModelConfig, meta: Optional[Dict[str, Any]],
                           tokenizer_from: Optional[str], saved_layout: Dict[str, Any]) -> None:
    """Writes ``minitron_config.json`` and the tokenizer into a checkpoint folder."""
    source = tokenizer_dir(tokenizer_from) if tokenizer_from else None
    if source:
        shutil.copytree(source, os.path.join(folder, TOKENIZER_DIR))
    info = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(),
            "meta": dict(meta or {}, saved_layout=saved_layout)}
    write_json_atomic(os.path.join(folder, CONFIG_FILE), info)


def replace_directory(tmp: str, path: str) -> None:
    """Renames the complete ``tmp`` to ``path``, replacing what was there only then."""
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


def checkpoint_keys(path: str) -> List[str]:
    """Keys of the tensors stored in checkpoint ``path`` (read from its metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(path).read_metadata().state_dict_metadata)


def load_weights(model, path: str) -> None:
    """Loads the checkpoint's weights into ``model`` (built at the current layout)."""
    from megatron.core import dist_checkpointing

    from megatron_minitron.checkpoint import megatron_lm

    path = megatron_lm.resolve(path)  # a Megatron-LM save directory: its iteration folder
    request = adapter.match_checkpoint_keys(adapter.sharded_state_dict(model),
                                            checkpoint_keys(path))
    loaded = dist_checkpointing.load(request, path)
    loaded = {key: loaded[key] for key in request}  # not the common state (Megatron-LM's args)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def load_sharded(path: str, sharded: Dict[str, Any]) -> Dict[str, Any]:
    """Loads the requested mcore sharded tensors (e.g. ``extra_sharded`` of a save) from
    ``path``; collective. Returns the same keys holding the loaded tensors."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(adapter.match_checkpoint_keys(sharded, checkpoint_keys(path)),
                                   path)


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
