"""The one place that knows Megatron-Core's module names and internals.

Everything else in the package talks about "layers", "attention output projection", "MLP fc1"
through the functions here, so a change in mcore is mended in this file alone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Dict, List

import torch
import torch.nn.functional as F

from megatron_minitron.compat.cpu import apply_cpu_patches, cpu_mode, cuda_to_cpu
from megatron_minitron.config import ModelConfig

apply_cpu_patches()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.activations import squared_relu  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

ACTIVATION_FUNCS = {"swiglu": F.silu, "gelu": F.gelu, "squared_relu": squared_relu}
"""Our activation name -> mcore's ``activation_func`` (swiglu also sets ``gated_linear_unit``)."""


def te_available() -> bool:
    """True when Transformer Engine imports (GPU machines with the NGC image)."""
    if cpu_mode() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """LayerNorm whose weight is stored as gamma - 1 and applied as 1 + weight (LayerNorm1P).

    The local spec's norms cannot do this without apex (``WrappedTorchNorm`` refuses
    ``layernorm_zero_centered_gamma``), so the local spec gets this class for every norm. It
    keeps the stored weight the same as Transformer Engine's and Hugging Face Nemotron's, so
    checkpoints move between specs and round-trip to Hugging Face bit for bit.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused):
        super().__init__(hidden_size, eps=eps)
        with torch.no_grad():
            self.weight.zero_()  # gamma = 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(hidden, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def layer_spec(cfg: ModelConfig, use_te: bool, config: TransformerConfig):
    """The layer spec, or for a zero-centred LayerNorm on the local spec the block's
    submodules (its final norm must be replaced too)."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
    if not cfg.layernorm_zero_centered_gamma:
        return spec
    norms = dict(input_layernorm=ZeroCenteredLayerNorm, pre_mlp_layernorm=ZeroCenteredLayerNorm)
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **norms))
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=ZeroCenteredLayerNorm)


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                       **overrides) -> TransformerConfig:
    """Maps our ModelConfig onto mcore's TransformerConfig at the current parallel layout."""
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        layernorm_zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        gated_linear_unit=cfg.gated,
        activation_func=ACTIVATION_FUNCS[cfg.activation],
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=False,
        use_cpu_initialization=True,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                    use_te: bool | None = None) -> GPTModel:
    """Builds this rank's pipeline stage of an mcore GPTModel for ``cfg``."""
    cfg.check_layout(parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_pipeline_model_parallel_world_size())
    use_te = te_available() if use_te is None else use_te
    with cuda_to_cpu():  # tied embeddings under PP call .cuda() while syncing the output layer
        model = _gpt_model(cfg, params_dtype, use_te)
    if not cpu_mode():
        model.cuda(torch.cuda.current_device())
    return model


def _gpt_model(cfg: ModelConfig, params_dtype: torch.dtype, use_te: bool) -> GPTModel:
    config = transformer_config(cfg, params_dtype)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, use_te, config),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percent,
        rotary_base=int(cfg.rotary_base) if float(cfg.rotary_base).is_integer() else cfg.rotary_base,
    )


# ---------------------------------------------------------------- module access


def decoder_layers(model: GPTModel) -> List[torch.nn.Module]:
    """This stage's transformer layers, in order."""
    return list(model.decoder.layers)


def layer_global_index(layer: torch.nn.Module) -> int:
    """0-based index of a layer in the whole (unpipelined) model."""
    return layer.layer_number - 1


def layer_offset(model: GPTModel) -> int:
    layers = decoder_layers(model)
    return layer_global_index(layers[0]) if layers else 0


def attention_output_projection(layer) -> torch.nn.Module:
    """Row-parallel linear whose input is the concatenated per-head attention output."""
    return layer.self_attention.linear_proj


def mlp_fc1(layer) -> torch.nn.Module:
    return layer.mlp.linear_fc1


def mlp_fc2(layer) -> torch.nn.Module:
    """Row-parallel linear whose input is the post-activation MLP hidden state."""
    return layer.mlp.linear_fc2


def layer_norms(layer) -> List[torch.nn.Module]:
    """The norms inside a layer (input and pre-MLP), whichever spec built it."""
    norms = []
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        module = getattr(layer, name, None)
        if module is not None and not isinstance(module, torch.nn.Identity):
            norms.append(module)
    return norms


def final_norm(model: GPTModel):
    """The decoder's final norm on the last pipeline stage, else None."""
    norm = getattr(model.decoder, "final_layernorm", None)
    return None if isinstance(norm, torch.nn.Identity) else norm


def layer_hidden_input(args, kwargs) -> torch.Tensor:
    """The [s, b, h] residual stream entering a TransformerLayer, from a forward hook's inputs."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def layer_hidden_output(output) -> torch.Tensor:
    """The [s, b, h] residual stream leaving a TransformerLayer (its forward returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_layer_output(output, hidden: torch.Tensor):
    """A TransformerLayer output with its hidden states replaced (used to skip a layer)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def linear_output(output) -> torch.Tensor:
    """mcore's Column/RowParallelLinear return ``(output, bias)``; this is the output."""
    return output[0] if isinstance(output, tuple) else output


def attention_qkv(layer) -> torch.nn.Module:
    """Column-parallel fused QKV linear; its rows go query group by query group, each group
    holding [its query heads, its key head, its value head] (heads_per_group + 2 heads)."""
    return layer.self_attention.linear_qkv


def word_embeddings(model: GPTModel) -> torch.nn.Module:
    """Vocab-parallel input embedding (first stage only)."""
    return model.embedding.word_embeddings


def output_layer(model: GPTModel) -> torch.nn.Module:
    """Column-parallel output projection (last stage); it holds no weight when tied."""
    return model.output_layer


# ---------------------------------------------------------------- state dict naming

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear. Our
# checkpoints always use the local spec's names so they load with either spec.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_key(key: str) -> str:
    for te_name, local_name in _TE_TO_LOCAL.items():
        if key.endswith(te_name):
            return key[: -len(te_name)] + local_name
    return key


def sharded_state_dict(model: GPTModel) -> Dict:
    """mcore sharded state dict with spec-independent keys (weights only, no extra state)."""
    sharded = model.sharded_state_dict()
    out = {}
    for key, value in sharded.items():
        if key.endswith("_extra_state"):
            continue
        key = canonical_key(key)
        if hasattr(value, "key"):
            value.key = canonical_key(value.key)
        out[key] = value
    return out


def get_tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def get_pp_group():
    return parallel_state.get_pipeline_model_parallel_group()


def get_dp_group():
    return parallel_state.get_data_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def is_first_stage() -> bool:
    return parallel_state.is_pipeline_first_stage()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


# ---------------------------------------------------------------- training access


def stage_forward(model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor,
                  input_tensor=None) -> torch.Tensor:
    """Runs this rank's stage; returns hidden states [s, b, h], or on the last stage the
    vocab-parallel logits [s, b, v/tp] as the output layer made them.

    GPTModel itself returns ``logits.transpose(0, 1).contiguous()``, a second logits-sized
    tensor (and another one in backward); a forward hook on the output layer hands the
    original on and gives GPTModel an empty slice to transpose instead. ``input_tensor``: the
    previous stage's hidden states (ignored on the first stage).
    """
    if input_tensor is not None or not model.pre_process:
        model.set_input_tensor(input_tensor)
    if not model.post_process:
        return model(tokens, position_ids, None)
    captured = []

    def keep_logits(module, args, output):
        logits = linear_output(output)  # [s, b, v/tp]
        captured.append(logits)
        return (logits[..., :0],) + tuple(output[1:])

    handle = model.output_layer.register_forward_hook(keep_logits)
    try:
        model(tokens, position_ids, None)
    finally:
        handle.remove()
    return captured[0]


def stage_layer_numbers(num_layers: int) -> List[int]:
    """1-based numbers of the layers this pipeline stage holds (mcore's even split)."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = num_layers // pp
    first = parallel_state.get_pipeline_model_parallel_rank() * per_stage
    return list(range(first + 1, first + per_stage + 1))


def layer_stage(layer_number: int, num_layers: int, pp: int) -> int:
    """Pipeline stage holding 1-based ``layer_number`` (0, the embedding, is on stage 0)."""
    return 0 if layer_number == 0 else (layer_number - 1) // (num_layers // pp)


def layer_by_number(model: GPTModel, layer_number: int) -> torch.nn.Module:
    """The TransformerLayer with 1-based global ``layer_number`` on this stage."""
    for layer in decoder_layers(model):
        if layer.layer_number == layer_number:
            return layer
    raise KeyError(f"layer {layer_number} is not on this pipeline stage")


# ---------------------------------------------------------------- optimizer state
#
# Optimizer state is saved in mcore's per-parameter ("model space") key layout: each state tensor
# (``exp_avg``, ``exp_avg_sq``, the fp32 main copy ``fp32_param`` of a 16-bit parameter) is a
# sharded tensor keyed ``optimizer.state.<state>.<parameter key>``, sharded like its parameter,
# each rank writing the part it updates. mcore's own ``sharded_state_dict`` cannot be used as
# is in 0.16 and 0.19: its model-space format for the distributed optimizer describes each data
# parallel slice with ``flattened_range``, which their ShardedTensor refuses; its other formats
# gather every data parallel rank's state into whole-buffer copies ("fully_reshardable") or
# reload only at the same TP/PP ("dp_reshardable"); and the bf16 plain optimizer's fails on a
# model with fp32 parameters (the local spec's norms). So each parameter's slice is described
# here as the few contiguous boxes it covers: views of the state, no copy, no communication,
# reloadable at any TP/PP/DP layout with either optimizer.

_PREFIX = "optimizer.state."


def chained_optimizers(optimizer) -> List:
    """The per-dtype Megatron optimizers inside mcore's ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    return [sub.optimizer for sub in chained_optimizers(optimizer) if sub.optimizer is not None]


def _keeps_step_per_param(inner) -> bool:
    """torch's Adam keeps ``step`` per parameter; TE's and apex's fused Adam per group."""
    return type(inner).__module__.startswith("torch.optim")


def _init_optimizer_state(optimizer) -> None:
    """Creates Adam's state (zeros) where no step has made it yet."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for main in group["params"]:
                if len(inner.state[main]) == 0:
                    inner.state[main]["exp_avg"] = torch.zeros_like(main)
                    inner.state[main]["exp_avg_sq"] = torch.zeros_like(main)
                    if _keeps_step_per_param(inner):
                        inner.state[main]["step"] = torch.zeros((), dtype=torch.float32)


def optimizer_step(optimizer) -> int:
    """How many updates the optimizer has made (0 before the first)."""
    steps = [0]
    for inner in _inner_optimizers(optimizer):
        steps += [int(s["step"]) for s in inner.state.values() if "step" in s]
        steps += [int(g["step"]) for g in inner.param_groups if "step" in g]
    return max(steps)


def _set_optimizer_step(optimizer, step: int) -> None:
    for inner in _inner_optimizers(optimizer):
        if _keeps_step_per_param(inner):
            for main_state in inner.state.values():
                main_state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = step


def _is_distributed(sub) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(sub, DistributedOptimizer)


def _boxes(shape, start: int, end: int) -> List:
    """The flat range [start, end) of a row-major tensor of ``shape`` as contiguous boxes:
    ``(offset, box shape, flat start)`` each."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,) if shape else (), (end - start,) if shape else (), start)]
    inner = 1
    for size in shape[1:]:
        inner *= size
    row = start // inner
    if start % inner == 0 and end % inner == 0:
        return [((row,) + (0,) * (len(shape) - 1), (end // inner - row,) + tuple(shape[1:]),
                 start)]
    if row == (end - 1) // inner:
        return [((row,) + offset, (1,) + box, row * inner + flat)
                for offset, box, flat in _boxes(shape[1:], start - row * inner,
                                                 end - row * inner)]
    head, tail = -(-start // inner) * inner, end // inner * inner
    return _boxes(shape, start, head) + _boxes(shape, head, tail) + _boxes(shape, tail, end)


def _param_states(sub):
    """(model parameter, the flat range of it this rank updates, {state name: tensor}) for each
    parameter the Megatron optimizer ``sub`` updates; ``fp32_param`` is the fp32 main copy of a
    16-bit parameter."""
    inner = sub.optimizer
    if _is_distributed(sub):
        for model_param in sub.model_param_group_index_map:
            span = sub._get_model_param_range_map(model_param)["param"]
            states = dict(sub._get_main_param_and_optimizer_states(model_param))
            states["fp32_param"] = states.pop("param")
            yield model_param, (span.start, span.end), states
        return
    if hasattr(sub, "float16_groups"):
        pairs = [pair for model_groups, main_groups in (
            (sub.float16_groups, sub.fp32_from_float16_groups),
            (sub.fp32_from_fp32_groups, sub.fp32_from_fp32_groups))
            for model_group, main_group in zip(model_groups, main_groups)
            for pair in zip(model_group, main_group)]
    else:
        pairs = [(param, param) for group in inner.param_groups for param in group["params"]]
    for model_param, main in pairs:
        yield model_param, (0, model_param.numel()), dict(inner.state[main], fp32_param=main)


def _state_sharded(sub, model_sharded: Dict, prefix: str) -> Dict:
    """This rank's part of the optimizer state as sharded tensors (views of the state itself)
    by place: for each parameter the boxes of its flat range, keyed and sharded like it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    by_param = {id(value.data): value for value in model_sharded.values()
                if getattr(value, "data", None) is not None}
    found, distributed = {}, _is_distributed(sub)
    for number, (model_param, span, states) in enumerate(_param_states(sub)):
        sharded = by_param[id(model_param)]
        states = {name: tensor for name, tensor in states.items() if name != "step"}
        if model_param.dtype == torch.float32:
            del states["fp32_param"]  # the main copy is the parameter itself
        pieces = ([sharded] if isinstance(sharded, ShardedTensor)
                  else list(nested_values(sharded.build())))  # e.g. SwiGLU's two halves
        for index, piece in enumerate(pieces):
            if not piece.data.is_contiguous() or piece.data.untyped_storage().data_ptr() != \
                    model_param.untyped_storage().data_ptr():
                raise NotImplementedError(f"{piece.key}: its sharded tensor is not a contiguous "
                                          "part of the parameter")
            first = piece.data.storage_offset() - model_param.storage_offset()
            start = max(span[0], first) - first
            end = min(span[1], first + piece.data.numel()) - first
            prepend = piece.prepend_axis_num
            replica = piece.replica_id
            if distributed and isinstance(replica, tuple):  # each DP rank holds its own slice
                replica = (*replica[:2], 0)
            for box_index, (offset, box, flat) in enumerate(_boxes(piece.local_shape, start, end)):
                global_offset = piece.global_offset[:prepend] + tuple(
                    g + o for g, o in zip(piece.global_offset[prepend:], offset))
                begin = first + flat - span[0]
                # The stacked-layer axes become size-1 axes of the box: mcore's writer of
                # uneven shards takes the box's shape as the chunk's.
                shape = (1,) * prepend + tuple(box)
                numel = torch.Size(box).numel()
                for name, tensor in states.items():
                    data = tensor.view(-1)[begin:begin + numel].view(shape)
                    found[f"{prefix}{number}.{index}.{box_index}.{name}"] = ShardedTensor(
                        key=f"{_PREFIX}{name}.{piece.key}", data=data, dtype=data.dtype,
                        local_shape=shape, global_shape=piece.global_shape,
                        global_offset=global_offset, axis_fragmentations=None,
                        replica_id=replica)
    return found


def optimizer_state_sharded(optimizer, model_sharded: Dict) -> Dict:
    """The optimizer's state as mcore sharded tensors for saving (views of the state itself).

    ``model_sharded``: the trained modules' sharded state dict (its tensors are the
    parameters).
    """
    _init_optimizer_state(optimizer)
    out = {}
    for index, sub in enumerate(chained_optimizers(optimizer)):
        out.update(_state_sharded(sub, model_sharded, f"optimizer.{index}."))
    return out


def load_optimizer_state(optimizer, model_sharded: Dict, load, step: int) -> None:
    """Loads the state saved from :func:`optimizer_state_sharded` (at any layout).

    ``load(request)`` loads a dict of sharded tensors and returns their tensors by the same
    keys; ``step``: the optimizer's step at the save.
    """
    request = optimizer_state_sharded(optimizer, model_sharded)
    loaded = load(request)
    with torch.no_grad():
        for key, value in request.items():
            if loaded[key] is not value.data:
                value.data.copy_(loaded[key])
    _set_optimizer_step(optimizer, step)
