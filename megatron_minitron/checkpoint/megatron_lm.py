"""Megatron-LM ``torch_dist`` checkpoints, read and written.

Reading: every ``--load``/``--teacher``/``--student`` also accepts a Megatron-LM save directory
(holding ``latest_checkpointed_iteration.txt``: an iteration number or ``release``) or one of its
``iter_NNNNNNN``/``release`` folders. The architecture comes from the ``args`` Megatron-LM saves
in the common state (``common.pt``, or the ``common_state`` object of mcore >= 0.19), mapped onto
:class:`ModelConfig`; anything we cannot build is refused in one line naming the arg. Only the
model weights are read (under mcore's own keys), at any TP/PP/EP.

Mixture-of-experts models (``num_experts``) map onto our MoE fields: softmax top-k routers
(``moe_router_pre_softmax`` either way), dropless, with an optional (gated) shared expert and
any ``moe_layer_freq``. Experts saved by SequentialMLP, Transformer Engine's grouped GEMM or the
legacy GroupedMLP all load (mcore stores them under the same keys); our SequentialMLP experts are
saved under those keys with ``moe_grouped_gemm=False``. Training-only knobs (aux/z-loss types,
input jitter, dispatcher, grouped GEMM, expert parallel sizes) do not change the weights or the
forward and are accepted; sigmoid or scaled or biased or group-limited routing, token dropping,
latent or interleaved-GLU experts are refused before any weight is read.

Writing (``--output-format megatron``)::

    OUT/latest_checkpointed_iteration.txt   # "release"
    OUT/release/                            # mcore torch_dist: weights under mcore's keys, and
                                            # {"args", "iteration", "checkpoint_version"}
    OUT/release/minitron_config.json, OUT/release/tokenizer/   # so every minitron command loads OUT

Megatron-LM loads it with ``pretrain_gpt.py --load OUT --finetune`` (architecture flags, or
``--use-checkpoint-args``); ``release`` is read as iteration 0 without optimizer or RNG state.
"""

from __future__ import annotations

import argparse
import dataclasses
import io as _io
import os
import re
import shutil
from typing import Any, Dict, Optional

import torch

from megatron_minitron.checkpoint.megatron_lm_moe import arg as _arg
from megatron_minitron.checkpoint.megatron_lm_moe import (  # noqa: F401 - parse_moe_layer_freq
    check_expert_keys,                                      # is part of this module's API
    match_layer_layout,
    moe_args,
    moe_fields,
    parse_moe_layer_freq,
)
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError

OUTPUT_FORMATS = ("minitron", "megatron")
"""``--output-format``: our checkpoint, or a Megatron-LM one (which every command also loads)."""
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
MCORE_MARKER = "metadata.json"  # written by dist_checkpointing.save in every torch_dist folder
CONFIG_FILE = "minitron_config.json"  # checkpoint.io.CONFIG_FILE
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

# Megatron-LM args that change the network in ways our models do not build; refused when set.
_REFUSED = {
    "qk_l2_norm": "query/key L2 norms are not supported",
    "rotary_interleaved": "only the default (non-interleaved) RoPE layout is supported",
    "multi_latent_attention": "multi-latent attention is not supported",
    "mtp_num_layers": "multi-token prediction layers are not supported",
    "hybrid_override_pattern": "hybrid (Mamba) models are not supported",
    "hybrid_layer_pattern": "hybrid (Mamba) models are not supported",
    "is_hybrid_model": "hybrid (Mamba) models are not supported",
    "heterogeneous_layers_config_path": "heterogeneous layers are not supported",
    "heterogeneous_layers_config_encoded_json": "heterogeneous layers are not supported",
    "window_size": "sliding-window attention is not supported",
    "apply_residual_connection_post_layernorm": "post-norm residuals are not supported",
    "no_rope_freq": "layers without RoPE are not supported",
    "attention_output_gate": "gated attention output is not supported",
    "spec": "custom layer specs are not supported (the GPT local/TE spec is)",
}



def _where(path: str) -> str:
    return f"--load {path}"


# ---------------------------------------------------------------- locating


def resolve(path: str, strict: bool = True) -> str:
    """The folder holding a checkpoint's weights: ``path`` itself, or for a Megatron-LM save
    directory (a tracker file) the iteration folder it names. ``strict=False`` returns ``path``
    instead of raising for a tracker that names nothing usable."""
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) or not os.path.isfile(tracker):
        return path
    with open(tracker) as handle:
        text = handle.read().strip()
    if text == RELEASE:
        name = RELEASE
    else:
        try:
            name = f"iter_{int(text):07d}"
        except ValueError:
            if not strict:
                return path
            raise UsageError(f"{_where(path)}: {TRACKER} holds {text!r}, not an iteration "
                             "number or 'release'; fix the file or pass the iteration folder")
    folder = os.path.join(path, name)
    if not os.path.isdir(folder):
        if not strict:
            return path
        raise UsageError(f"{_where(path)}: {TRACKER} names {name}, which does not exist; pass "
                         "an existing iter_NNNNNNN folder")
    return folder


def is_megatron_lm(folder: str) -> bool:
    """True for a torch_dist folder that is not ours (no ``minitron_config.json``)."""
    return (os.path.isfile(os.path.join(folder, MCORE_MARKER))
            and not os.path.isfile(os.path.join(folder, CONFIG_FILE)))


def check_format(folder: str, path: str) -> None:
    """Refuses Megatron-LM's legacy (``mp_rank_*``) format in one line."""
    if os.path.isdir(folder) and any(n.startswith("mp_rank_") for n in os.listdir(folder)):
        raise UsageError(f"{_where(path)} is a Megatron-LM checkpoint in the legacy torch format; "
                         "convert it to torch_dist (Megatron-LM --ckpt-convert-format torch_dist)")


# ---------------------------------------------------------------- reading


def read_common(folder: str) -> Dict[str, Any]:
    """The common (non-tensor) state Megatron-LM saved: ``args``, ``iteration``, ...

    mcore < 0.19 keeps it in ``common.pt``; mcore >= 0.19 in a ``common_state`` object of the
    torch_dist files. Both are read whatever mcore is installed.
    """
    from megatron_minitron.compat.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core import dist_checkpointing  # registers argparse.Namespace as safe

    if os.path.isfile(os.path.join(folder, "common.pt")):
        return dist_checkpointing.load_common_state_dict(folder)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    key = "common_state/shard_0_1"  # ShardedObject("common_state", None, (1,), (0,)).unique_key
    loaded = {key: _io.BytesIO()}
    dcp.load(loaded, storage_reader=FileSystemReader(folder), no_dist=True)
    data = loaded[key]
    if isinstance(data, _io.BytesIO):
        data.seek(0)
        data = torch.load(data, weights_only=True)
    return data[0]


def stored_shapes(folder: str) -> Dict[str, torch.Size]:
    """Global shape of every tensor stored in a torch_dist folder."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(folder).read_metadata()
    return {key: meta.size for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "size")}


def config_from_args(args, vocab_size: int, path: str) -> ModelConfig:
    """Maps Megatron-LM's saved ``args`` onto our ModelConfig; one-line UsageError otherwise."""
    where = _where(path)
    for name, reason in _REFUSED.items():
        value = getattr(args, name, None)
        if value not in (None, False, 0, "", [], ()):
            raise UsageError(f"{where}: Megatron-LM arg {name}={value!r} is not supported "
                             f"({reason}); only checkpoints without {name} load")
    position = getattr(args, "position_embedding_type", None) or (
        "rope" if getattr(args, "use_rotary_position_embeddings", False) else "learned_absolute")
    if position != "rope":
        raise UsageError(f"{where}: Megatron-LM arg position_embedding_type={position!r} is not "
                         "supported (only rope)")
    softmax = getattr(args, "softmax_type", None)
    if softmax not in (None, "vanilla"):
        raise UsageError(f"{where}: Megatron-LM arg softmax_type={softmax!r} is not supported "
                         "(only vanilla)")
    normalization = _arg(args, "normalization", "LayerNorm")
    if normalization not in ("LayerNorm", "RMSNorm"):
        raise UsageError(f"{where}: Megatron-LM arg normalization={normalization!r} is not "
                         "supported (LayerNorm or RMSNorm)")
    if getattr(args, "swiglu", False):
        activation = "swiglu"
    elif getattr(args, "squared_relu", False):
        activation = "squared_relu"
    else:
        activation = "gelu"
        for name in ("openai_gelu", "onnx_safe", "quick_geglu"):
            if getattr(args, name, False):
                raise UsageError(f"{where}: Megatron-LM arg {name}=True is not supported "
                                 "(swiglu, squared_relu or the default gelu)")
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    add_bias = _arg(args, "add_bias_linear", not getattr(args, "disable_bias_linear", False))
    moe = moe_fields(args, where)
    extra = dict(moe.pop("extra", {}), source_format="megatron_lm")
    try:
        return ModelConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            ffn_hidden_size=_arg(args, "ffn_hidden_size", 4 * args.hidden_size),
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=_arg(args, "kv_channels", args.hidden_size // heads),
            vocab_size=vocab_size,
            max_position_embeddings=_arg(args, "max_position_embeddings",
                                         _arg(args, "seq_length", 2048)),
            normalization=normalization,
            layernorm_zero_centered_gamma=bool(getattr(args, "apply_layernorm_1p", False)),
            norm_epsilon=float(_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5))),
            activation=activation,
            rotary_base=float(_arg(args, "rotary_base", 10000)),
            rotary_percent=float(_arg(args, "rotary_percent", 1.0)),
            tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
            add_bias_linear=bool(add_bias),
            add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
            qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
            rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
            rope_scaling_factor=float(_arg(args, "rope_scaling_factor", 8.0)),
            seq_len_interpolation_factor=getattr(args, "rotary_seq_len_interpolation_factor",
                                                 None),
            init_method_std=float(_arg(args, "init_method_std", 0.02)),
            extra=extra,
            **moe,
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"{where}: the saved Megatron-LM args do not describe a model we can "
                         f"build ({err}); fix the saved args") from None


def tokenizer_model(args) -> Optional[str]:
    """``args.tokenizer_model`` when it is a Hugging Face tokenizer folder, else None."""
    folder = getattr(args, "tokenizer_model", None)
    if isinstance(folder, str) and os.path.isdir(folder) and any(
            os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        return folder
    return None


def _common(folder: str, path: str) -> Dict[str, Any]:
    check_format(folder, path)
    try:
        common = read_common(folder)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad input here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{_where(path)}: cannot read the Megatron-LM common state "
                         f"({reason})") from None
    if getattr(common, "get", None) is None or common.get("args") is None:
        raise UsageError(f"{_where(path)}: the Megatron-LM checkpoint carries no saved args; "
                         "re-save it with Megatron-LM (its args describe the architecture)")
    return common


def checkpoint_info(folder: str, path: str) -> Dict[str, Any]:
    """An info dict shaped like ``minitron_config.json`` for a Megatron-LM folder."""
    from megatron_minitron.checkpoint import io

    common = _common(folder, path)
    args = common["args"]
    shapes = stored_shapes(folder)
    embedding = shapes.get("embedding.word_embeddings.weight")
    vocab = int(embedding[0]) if embedding is not None else getattr(args, "padded_vocab_size",
                                                                    None)
    if not vocab:
        raise UsageError(f"{_where(path)}: the Megatron-LM checkpoint holds no "
                         "embedding.word_embeddings.weight and no padded_vocab_size")
    cfg = config_from_args(args, vocab, path)
    if cfg.is_moe:
        check_expert_keys(shapes, path)
        cfg = match_layer_layout(cfg, shapes)
    meta = {"megatron_lm": {"folder": os.path.abspath(folder),
                            "iteration": common.get("iteration"),
                            "checkpoint_version": common.get("checkpoint_version"),
                            "tokenizer_model": getattr(args, "tokenizer_model", None)}}
    return {"format": io.FORMAT, "version": io.VERSION, "model": cfg.to_dict(), "meta": meta}


def tokenizer_folder(folder: str, path: Optional[str] = None) -> Optional[str]:
    """The HF tokenizer folder named by a Megatron-LM checkpoint's args, or None."""
    return tokenizer_model(_common(folder, path or folder)["args"])


def missing_tokenizer_error(path: str) -> UsageError:
    folder = resolve(path, strict=False)
    try:
        named = getattr(_common(folder, path)["args"], "tokenizer_model", None)
    except UsageError:
        named = None
    return UsageError(f"{path} is a Megatron-LM checkpoint whose tokenizer (args.tokenizer_model="
                      f"{named!r}) is not a Hugging Face tokenizer folder; pass --tokenizer DIR")


# ---------------------------------------------------------------- writing


def megatron_args(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                  tokenizer: Optional[str] = None) -> argparse.Namespace:
    """The ``args`` Megatron-LM saves, for ``cfg``: every field its ``--use-checkpoint-args``
    reads (megatron/training/checkpointing.py ``load_args_from_checkpoint``) and the ones its
    model builder needs (for a mixture-of-experts model, :func:`moe_args`)."""
    return argparse.Namespace(
        **moe_args(cfg),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        seq_length=cfg.max_position_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=True,
        use_rotary_position_embeddings=True,
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer()
        else cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
        rotary_interleaved=False,
        use_rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        rotary_seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        swiglu=cfg.activation == "swiglu",
        squared_relu=cfg.activation == "squared_relu",
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        apply_layernorm_1p=cfg.layernorm_zero_centered_gamma,
        normalization=cfg.normalization,
        norm_epsilon=cfg.norm_epsilon,
        qk_layernorm=cfg.qk_layernorm,
        apply_query_key_layer_scaling=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=cfg.init_method_std,
        padded_vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=1,
        tokenizer_type="HuggingFaceTokenizer" if tokenizer else None,
        tokenizer_model=tokenizer,
        mtp_num_layers=None,
        spec=None,
        ckpt_format="torch_dist",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=1,
        consumed_train_samples=0,
        skipped_train_samples=0,
        consumed_valid_samples=0,
    )


def common_state(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Optional[str]) -> Dict:
    """The non-tensor part Megatron-LM's ``generate_state_dict`` saves (release: iteration 0)."""
    return {"args": megatron_args(cfg, dtype, tokenizer), "iteration": 0,
            "checkpoint_version": 3.0}


def _tokenizer_target(path: str, tokenizer_from: Optional[str]) -> Optional[str]:
    from megatron_minitron.checkpoint import io

    if tokenizer_from and io.tokenizer_dir(tokenizer_from):
        return os.path.join(os.path.abspath(path), RELEASE, io.TOKENIZER_DIR)
    return None


def _finish(tmp: str, path: str, cfg: ModelConfig, meta: Optional[Dict],
            tokenizer_from: Optional[str], saved_layout: Dict) -> None:
    """Adds our config and tokenizer to ``tmp/release``, the tracker to ``tmp``, and renames
    ``tmp`` to ``path`` (rank 0)."""
    from megatron_minitron.checkpoint import io

    io.write_checkpoint_files(os.path.join(tmp, RELEASE), cfg,
                              dict(meta or {}, output_format="megatron"), tokenizer_from,
                              saved_layout)
    with open(os.path.join(tmp, TRACKER), "w") as handle:
        handle.write(RELEASE)
    io.replace_directory(tmp, path)


_PRE_MLP_NORM = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(mlp\.linear_fc1\.layer_norm_|"
                           r"pre_mlp_layernorm\.)(weight|bias)$")
_PRE_MLP_NORM_NAMES = {"mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
                       "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def with_te_norm_keys(sharded: Dict, cfg: ModelConfig) -> Dict:
    """``sharded`` plus each MoE layer's pre-MLP norm under both of mcore's names for it.

    mcore's local spec stores that norm as ``...mlp.linear_fc1.layer_norm_weight`` (the name
    Transformer Engine gives the norm it fuses into a dense MLP's fc1); TE's MoE layers keep a
    separate ``...pre_mlp_layernorm.weight``. Writing both (a vector per layer) lets Megatron-LM
    load the checkpoint under either ``--transformer-impl``, whichever spec built ours; readers
    ignore the key they do not ask for.
    """
    if not cfg.is_moe:
        return sharded
    moe_layers = cfg.moe_layers()
    aliases = {}
    for name, value in sharded.items():
        found = _PRE_MLP_NORM.match(getattr(value, "key", None) or "")
        if found is None or not hasattr(value, "data"):
            continue
        layer, stored, param = found.groups()
        if layer is not None and not moe_layers[int(layer)]:
            continue  # a dense layer: TE fuses its norm into fc1 under that very key
        prefix = "decoder.layers." + (f"{layer}." if layer is not None else "")
        aliases[f"{name}@alias"] = dataclasses.replace(
            value, key=f"{prefix}{_PRE_MLP_NORM_NAMES[stored]}{param}")
    return dict(sharded, **aliases)


def save_checkpoint(model, cfg: ModelConfig, path: str, meta: Optional[Dict] = None,
                    tokenizer_from: Optional[str] = None) -> None:
    """Saves this rank's shards of ``model`` (collective) as a Megatron-LM checkpoint at
    ``path``, atomically; see the module docstring for the layout."""
    from megatron.core import dist_checkpointing

    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint import io

    path = os.path.abspath(path)
    tmp = f"{path}.tmp"
    if parallel.is_rank0():
        io.check_output_path(path)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, RELEASE))
    parallel.barrier()
    dtype = next(model.parameters()).dtype
    state = dict(common_state(cfg, dtype, _tokenizer_target(path, tokenizer_from)),
                 model=with_te_norm_keys(adapter.megatron_lm_sharded_state_dict(model), cfg))
    dist_checkpointing.save(state, os.path.join(tmp, RELEASE))
    parallel.barrier()
    if parallel.is_rank0():
        layout = parallel.current_layout()
        _finish(tmp, path, cfg, meta, tokenizer_from, {"tp": layout.tp, "pp": layout.pp})
    parallel.barrier()


def write_streaming(specs, cfg: ModelConfig, path: str, meta: Optional[Dict] = None,
                    tokenizer_from: Optional[str] = None) -> None:
    """Writes streamed tensors (``checkpoint.stream.TensorSpec``, our key names) as a
    Megatron-LM checkpoint at ``path`` (single process, atomic)."""
    from megatron_minitron import adapter
    from megatron_minitron.checkpoint import io, stream

    if cfg.is_moe:  # adapter.extra_state_keys and the stacked-layer streams are dense-only
        raise UsageError("--output-format megatron: streamed writing of mixture-of-experts "
                         "models is not supported yet; write --output-format minitron")
    path = os.path.abspath(path)
    io.check_output_path(path)
    stream.return_freed_memory_promptly()
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, RELEASE))
    try:
        native = [stream.TensorSpec(adapter.native_key(s.key), s.shape, s.dtype, s.chunks)
                  for s in specs]
        objects = {key: _none_object() for key in adapter.extra_state_keys(cfg)}
        dtype = specs[0].dtype if specs else torch.float32
        stream.write_torch_dist(native, os.path.join(tmp, RELEASE),
                                common_state(cfg, dtype, _tokenizer_target(path, tokenizer_from)),
                                objects=objects)
        _finish(tmp, path, cfg, meta, tokenizer_from, {"tp": 1, "pp": 1, "streamed": True})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _none_object() -> bytes:
    """A ShardedObject holding None, serialized as mcore's torch_dist strategy does."""
    buffer = _io.BytesIO()
    torch.save([None], buffer)
    return buffer.getvalue()
