"""The GPU features a DGX run switches on, checked without a GPU: each flag maps onto
Megatron-Core's own config field, each is refused on CPU in one line before any work, weights
load in the requested dtype, and models a checkpoint is loaded into skip the random
initialisation."""

import os

import pytest
import torch

from megatron_minitron import adapter, cli, parallel
from megatron_minitron.checkpoint.io import load_checkpoint, load_weights
from megatron_minitron.distill.config import TrainConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.precision import params_dtype
from megatron_minitron.testing import save_tiny_checkpoint, tiny_config

GPU = dict(gpu=True, te=True, apex=False, flash_attn=True, params_dtype=torch.bfloat16)


def _features(cfg=None, **flags):
    values = dict(GPU, training=True)
    values.update(flags)
    return adapter.gpu_features(cfg or tiny_config(), **values)


@pytest.mark.parametrize("flags,model_fields,ddp_fields", [
    (dict(sequence_parallel=True), dict(sequence_parallel=True), {}),
    (dict(recompute="selective"), dict(recompute_granularity="selective"), {}),
    (dict(recompute="full"), dict(recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1), {}),
    (dict(overlap_grad_reduce=True), {}, dict(overlap_grad_reduce=True)),
    (dict(overlap_param_gather=True, distributed_optimizer=True), {},
     dict(overlap_param_gather=True, use_distributed_optimizer=True)),
    (dict(overlap_param_gather=True, distributed_optimizer=False), {},
     dict(overlap_param_gather=False, use_distributed_optimizer=False)),
])
def test_each_flag_maps_onto_mcore_fields(flags, model_fields, ddp_fields):
    model, ddp = _features(**flags)
    for name, value in model_fields.items():
        assert model[name] == value, name
    for name, value in ddp_fields.items():
        assert ddp[name] == value, name
    from megatron.core.distributed import DistributedDataParallelConfig

    DistributedDataParallelConfig(**ddp)  # mcore accepts the fields


def test_recompute_fields_pass_mcore_validation():
    parallel.initialize(1, 1)
    try:
        for how in ("selective", "full"):
            model, _ = _features(gpu=False, te=False, recompute=how)
            config = adapter.transformer_config(tiny_config(), **model)
            assert config.recompute_granularity == how
    finally:
        parallel.teardown()


def test_fusions_follow_the_kernels_at_hand():
    from megatron.core.transformer.enums import AttnBackend

    model, _ = _features()
    assert model["gradient_accumulation_fusion"] and model["masked_softmax_fusion"]
    assert model["bias_dropout_fusion"] and model["bias_activation_fusion"]  # swiglu
    assert model["apply_rope_fusion"] and not model["persist_layer_norm"]  # TE, no apex
    assert model["attention_backend"] == AttnBackend.flash
    inference, _ = _features(training=False)
    assert not inference["gradient_accumulation_fusion"]
    apex_only, _ = _features(te=False, apex=True)
    assert apex_only["persist_layer_norm"] and not apex_only["apply_rope_fusion"]
    assert "attention_backend" not in apex_only
    relu2, _ = _features(tiny_config(activation="squared_relu"))
    assert not relu2["bias_activation_fusion"]  # mcore fuses only GeLU and SwiGLU
    fp32, _ = _features(params_dtype=torch.float32)
    assert "attention_backend" not in fp32
    for host in (_features(gpu=False)[0], _features(te=False, apex=False)[0]):
        assert host == {}  # no kernels: mcore's defaults (all off)


@pytest.mark.parametrize("field,value,flag", [
    ("sequence_parallel", True, "--sequence-parallel"),
    ("recompute_activations", "full", "--recompute-activations full"),
    ("overlap_grad_reduce", True, "--overlap-grad-reduce"),
    ("overlap_param_gather", True, "--overlap-param-gather"),
])
def test_each_flag_is_refused_on_cpu_in_one_line(field, value, flag, capsys):
    with pytest.raises(UsageError) as err:
        TrainConfig(**{field: value, "tp": 2})
    message = str(err.value)
    assert message.startswith(flag + " needs ") and "this machine has no CUDA" in message
    assert "\n" not in message
    code = cli.main(["distill", "--teacher", "T", "--student", "S", *flag.split()])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and flag in lines[0] and "no CUDA" in lines[0]


def test_boolean_flags_parse_both_ways(tmp_path):
    parser = cli.build_parser(only="distill")
    args = parser.parse_args(["distill", "--no-sequence-parallel", "--recompute-activations",
                              "selective"])
    assert args.sequence_parallel is False and args.recompute_activations == "selective"
    assert parser.parse_args(["distill"]).overlap_grad_reduce is None  # YAML/default decides


def test_recipe_refuses_a_gpu_flag_when_read(tmp_path):
    from megatron_minitron.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"workdir: {tmp_path}/w\nteacher: {tmp_path}/t\nsteps:\n"
                      "  - stage: eval\n    name: e0\n    load: '@teacher'\n    tasks: piqa\n"
                      "  - stage: distill\n    name: d\n    student: '@teacher'\n"
                      "    text_file: x.txt\n    seq_length: 16\n    train_tokens: 64\n"
                      "    global_batch_size: 4\n    overlap_grad_reduce: true\n")
    with pytest.raises(UsageError, match=r"step d .*--overlap-grad-reduce needs .*no CUDA"):
        load_recipe(str(recipe))


def test_precision_names():
    assert params_dtype("auto") == torch.float32  # CPU
    assert params_dtype("bf16") == torch.bfloat16 and params_dtype("fp16") == torch.float16
    with pytest.raises(UsageError, match="--precision fp8"):
        params_dtype("fp8")
    args = cli.build_parser(only="importance").parse_args(
        ["importance", "--load", "C", "--output", "s.pt", "--text-file", "t", "--seq-length",
         "8", "--dtype", "bf16"])
    assert args.precision == "bf16"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpu_features") / "tiny")
    save_tiny_checkpoint(path)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_checkpoint_loads_into_a_half_precision_model(checkpoint, dtype):
    with parallel.parallel_context(1, 1):
        reference, _ = load_checkpoint(checkpoint)
        model, _ = load_checkpoint(checkpoint, dtype)
        expected = reference.state_dict()
        for key, value in model.state_dict().items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == dtype, key  # norms too, not only the linears
                assert torch.equal(value, expected[key].to(dtype)), key


def test_bf16_checkpoint_loads_into_fp32_and_bf16(checkpoint, tmp_path):
    from megatron_minitron.checkpoint.io import save_checkpoint

    with parallel.parallel_context(1, 1):
        half, cfg = load_checkpoint(checkpoint, torch.bfloat16)
        save_checkpoint(half, cfg, str(tmp_path / "bf16"))  # what a bf16 training run saves
        full, _ = load_checkpoint(str(tmp_path / "bf16"))
        again, _ = load_checkpoint(str(tmp_path / "bf16"), torch.bfloat16)
        expected = half.state_dict()
        for (key, value), same in zip(full.state_dict().items(), again.state_dict().values()):
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32 and torch.equal(value, expected[key].float())
                assert torch.equal(same, expected[key]), key


def test_load_paths_build_without_random_initialisation(checkpoint, monkeypatch):
    calls = []
    normal = torch.nn.init.normal_

    def counting_normal(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", counting_normal)
    cfg = tiny_config()
    with parallel.parallel_context(1, 1):
        initialised = adapter.build_gpt_model(cfg)
        assert calls and initialised.config.perform_initialization
        calls.clear()
        loaded, _ = load_checkpoint(checkpoint)
        assert calls == [] and loaded.config.perform_initialization is False
        assert loaded.config.use_cpu_initialization  # host only where there is no GPU
        load_weights(initialised, checkpoint)
        for (key, a), b in zip(initialised.state_dict().items(), loaded.state_dict().values()):
            if torch.is_tensor(a):
                assert torch.equal(a, b), key
        half, _ = load_checkpoint(checkpoint, torch.bfloat16)
        tags = ("tensor_model_parallel", "partition_dim", "partition_stride")
        for model in (loaded, half):  # the partition tags mcore's initialisation would set
            for (name, a), b in zip(initialised.named_parameters(), model.parameters()):
                assert [getattr(a, t, None) for t in tags] == [getattr(b, t, None)
                                                               for t in tags], name
        assert any(getattr(p, "tensor_model_parallel", False) for p in loaded.parameters())


def test_gpu_check_script_refuses_without_cuda(capsys):
    from megatron_minitron import gpu_check

    code = gpu_check.main(["--pack-dir", os.devnull])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "CUDA" in lines[0]
