"""Hugging Face checkpoints in and out: ``import_hf`` and ``export_hf``.

    minitron import-hf --hf-path DIR [--gguf-file NAME] --output CKPT
    minitron export-hf --load CKPT --output DIR

Both run in one process at TP=1, PP=1; a checkpoint written by ``import_hf`` loads at any layout.
Every input is checked before the model is read, so a bad path fails in seconds, and nothing is
written unless the conversion succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from megatron_minitron import progress
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.hf import mapping

logger = logging.getLogger("megatron_minitron")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MAX_SHARD_BYTES = 5 * 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise UsageError("Hugging Face conversion needs transformers; install it with "
                         "pip install -e '.[hf]'") from err
    return transformers


def dtype_kwarg(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype``
    before."""
    from packaging.version import Version

    old = Version(_transformers().__version__) < Version("4.56")
    return {"torch_dtype" if old else "dtype": dtype}


def _check_single_process(command: str) -> None:
    import torch.distributed as dist

    size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    if size > 1:
        raise UsageError(f"{command} runs in one process (found WORLD_SIZE={size}); launch it "
                         "with `minitron` or `python -m megatron_minitron`, not torchrun")


# ---------------------------------------------------------------- import


def _check_source(hf_path: str, gguf_file: Optional[str]) -> str:
    """Validates the input folder; returns the prefix naming it in error messages."""
    where = f"--hf-path {hf_path}"
    if not os.path.exists(hf_path):
        raise UsageError(f"{where} does not exist; pass a Hugging Face model directory")
    if not os.path.isdir(hf_path) or not os.access(hf_path, os.R_OK | os.X_OK):
        raise UsageError(f"{where} is not a readable directory; pass a Hugging Face model "
                         "directory")
    if gguf_file is not None:
        file = os.path.join(hf_path, gguf_file)
        if not os.path.isfile(file) or not os.access(file, os.R_OK):
            raise UsageError(f"--gguf-file {gguf_file} is not a readable file in {hf_path}")
    elif not os.path.isfile(os.path.join(hf_path, "config.json")):
        found = sorted(f for f in os.listdir(hf_path) if f.endswith(".gguf"))
        hint = (f"pass --gguf-file {found[0]}" if found else
                "pass a directory saved by save_pretrained, or --gguf-file NAME for a GGUF model")
        raise UsageError(f"{where} has no config.json; {hint}")
    return where


def _read_hf_config(hf_path: str, gguf_file: Optional[str], where: str) -> Tuple[object, str]:
    """(transformers config, architecture); config.json's architecture is checked first."""
    raw_file = os.path.join(hf_path, "config.json")
    if os.path.isfile(raw_file):
        try:
            with open(raw_file) as handle:
                raw = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{where}: unreadable config.json ({err})") from err
        mapping.check_architecture(raw.get("architectures"), raw.get("model_type"), where)
    transformers = _transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(
            hf_path, gguf_file=gguf_file, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad input here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{where}: cannot read the model config ({reason})") from err
    arch = mapping.check_architecture(getattr(hf_config, "architectures", None),
                                      getattr(hf_config, "model_type", None), where)
    return hf_config, arch


def _load_tokenizer(hf_path: str, gguf_file: Optional[str], where: str):
    """The HF tokenizer, or None when the directory has none (a bare weights folder)."""
    if gguf_file is None and not any(os.path.isfile(os.path.join(hf_path, f))
                                     for f in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files; the checkpoint will carry no tokenizer", where)
        return None
    try:
        return _transformers().AutoTokenizer.from_pretrained(
            hf_path, gguf_file=gguf_file, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{where}: cannot load the tokenizer ({reason})") from err


def _load_hf_state(hf_path: str, gguf_file: Optional[str], where: str) -> Dict[str, torch.Tensor]:
    """The model's fp32 state dict (GGUF weights are dequantized by transformers)."""
    transformers = _transformers()
    try:
        with progress.third_party_bars():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                hf_path, gguf_file=gguf_file, local_files_only=True,
                **dtype_kwarg(torch.float32))
    except Exception as err:  # noqa: BLE001
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{where}: cannot load the model weights ({reason})") from err
    return dict(model.state_dict())


def import_hf(hf_path: str, output: str, gguf_file: Optional[str] = None,
              output_format: str = "minitron") -> ModelConfig:
    """Converts a Hugging Face Llama/Mistral/Qwen2/Qwen3/Nemotron or Mixtral/Qwen2-MoE/Qwen3-MoE
    model into a checkpoint at ``output``.

    Args:
        hf_path: directory of a model saved by ``save_pretrained``, or holding a GGUF file.
        output: checkpoint directory to write (absent, empty, or one of our checkpoints).
        gguf_file: name of the GGUF file inside ``hf_path``, if the weights are GGUF.
        output_format: ``minitron`` (ours) or ``megatron`` (a Megatron-LM checkpoint,
            :mod:`megatron_minitron.checkpoint.megatron_lm`).

    Returns:
        The ModelConfig of the written checkpoint.

    Raises:
        UsageError: a missing or unreadable input, an unsupported architecture or feature, a
            tokenizer larger than the vocabulary, or an ``output`` that may not be overwritten.
    """
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io, megatron_lm

    _check_single_process("import-hf")
    where = _check_source(hf_path, gguf_file)
    io.check_output_path(output)
    hf_config, arch = _read_hf_config(hf_path, gguf_file, where)
    cfg = mapping.config_from_hf(hf_config, arch, where)
    tokenizer = _load_tokenizer(hf_path, gguf_file, where)
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise UsageError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}; use the tokenizer the model was "
                         "trained with")
    logger.info("importing %s (%s) from %s", arch, gguf_file or "safetensors", hf_path)
    hf_state = _load_hf_state(hf_path, gguf_file, where)
    source = os.path.abspath(os.path.join(hf_path, gguf_file) if gguf_file else hf_path)
    meta = {"source": source, "hf_architecture": arch,
            "hf_token_ids": cfg.extra.get("hf_token_ids", {})}
    with tempfile.TemporaryDirectory(prefix="minitron-tokenizer-") as tokenizer_files:
        if tokenizer is not None:
            tokenizer.save_pretrained(tokenizer_files)
        with parallel.parallel_context(1, 1):
            model = adapter.build_gpt_model(cfg, use_te=False)
            mapping.load_hf_state(model, cfg, hf_state, where)
            del hf_state
            save = megatron_lm.save_checkpoint if output_format == "megatron" else \
                io.save_checkpoint
            save(model, cfg, output, meta=meta,
                               tokenizer_from=tokenizer_files if tokenizer is not None else None)
    logger.info("wrote %s", output)
    return cfg


# ---------------------------------------------------------------- export


def _check_export_output(output: str) -> None:
    if os.path.isfile(output):
        raise UsageError(f"--output {output} is an existing file; choose a new directory")
    if os.path.isdir(output) and os.listdir(output):
        raise UsageError(f"--output {output} exists and is not empty; choose a new or empty "
                         "directory")


def write_safetensors(state: Dict[str, torch.Tensor], folder: str,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> List[str]:
    """Writes ``model.safetensors``, or numbered shards plus the index HF expects."""
    from safetensors.torch import save_file

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    return names


def export_hf(load: str, output: str, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Writes checkpoint ``load`` as a Hugging Face model directory ``output``.

    The directory (safetensors, config.json, generation_config.json and the checkpoint's
    tokenizer files) loads offline with ``AutoModelForCausalLM.from_pretrained(output)``. It is
    written into a temporary sibling and renamed into place.

    Args:
        load: checkpoint directory (any saved layout).
        output: new or empty directory.
        dtype: dtype of the written weights.
        max_shard_bytes: largest safetensors file; bigger models are sharded with an index.

    Returns:
        The absolute path of ``output``.

    Raises:
        UsageError: ``load`` is not a checkpoint, ``output`` exists and is not empty, or the
            model has no Llama/Mistral/Qwen2/Qwen3/Nemotron (or, with experts, Mixtral/
            Qwen2-MoE/Qwen3-MoE) equivalent that the installed transformers accepts (checked
            before anything is written).
    """
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io

    _check_single_process("export-hf")
    info = io.read_checkpoint_info(load)
    _check_export_output(output)
    cfg = ModelConfig.from_dict(info["model"])
    token_ids = cfg.extra.get("hf_token_ids") or info.get("meta", {}).get("hf_token_ids")
    hf_config = mapping.hf_config_from(cfg, dtype, token_ids)
    transformers = _transformers()
    with parallel.parallel_context(1, 1):
        model = adapter.build_gpt_model(cfg, use_te=False, init_weights=False)
        io.load_weights(model, load)
        state = mapping.hf_state_from(model, cfg, dtype)
        del model
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
    try:
        write_safetensors(state, tmp, max_shard_bytes)
        hf_config.save_pretrained(tmp)
        transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        tokenizer = io.tokenizer_dir(load)
        if tokenizer:
            shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
        else:
            logger.warning("--load %s carries no tokenizer; %s will hold none", load, output)
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)  # atomic, also over an empty directory
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s", output)
    return output
