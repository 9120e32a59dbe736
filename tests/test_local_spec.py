"""The local spec's CPU fast paths equal mcore's own: the plain linears on one tensor-parallel
rank, the SwiGLU MLP, and the CPU shim's RoPE. Whole models (with and without biases, gated
and plain MLPs, rope scaling) give the same logits and the same gradients with the fast paths
on and forced off; each falls back to mcore where it does not apply."""

import pytest
import torch
import torch.nn.functional as F

from megatron_minitron import adapter, parallel  # applies the CPU patches before mcore imports
from megatron_minitron.model import linear, mlp
from megatron_minitron.model.linear import ColumnLinear, RowLinear
from megatron_minitron.model.mlp import SwiGLU, SwiGLUMLP
from megatron_minitron.model import norm as norm_module
from megatron_minitron.model.norm import RMSNorm
from megatron_minitron.model.forward import position_ids_for
from megatron_minitron.testing import tiny_config, tiny_moe_config

from megatron.core.models.common.embeddings import rope_utils  # noqa: E402,I001
from megatron.core.tensor_parallel.layers import (  # noqa: E402
    ColumnParallelLinear,
    RowParallelLinear,
)
from megatron.core.transformer.mlp import MLP  # noqa: E402

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="the CPU shim's RoPE is patched only without CUDA")


@pytest.fixture(scope="module")
def group():
    parallel.initialize(1, 1)
    yield
    parallel.teardown()


@pytest.fixture
def mcore_paths(monkeypatch):
    """Forces mcore's own paths: returns a function that switches them on."""
    def force():
        monkeypatch.setattr(linear, "_plain", lambda layer: False)
        monkeypatch.setattr(SwiGLUMLP, "_plain_swiglu", lambda *args: False)
        monkeypatch.setattr(RMSNorm, "forward", torch.nn.RMSNorm.forward)
        if not torch.cuda.is_available():
            monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd",
                                rope_utils._apply_rotary_pos_emb_bshd.__wrapped__)
    return force


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    model.train()
    logits = adapter.stage_forward(model, tokens, position_ids_for(tokens))
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.t().flatten())
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                             if p.grad is not None}


VARIANTS = {
    "llama": dict(),
    "qwen2_biases": dict(add_qkv_bias=True),
    "biases_gelu": dict(add_bias_linear=True, activation="gelu"),
    "rope_scaling_untied": dict(rope_scaling=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_equals_mcores_paths(group, mcore_paths, variant):
    torch.manual_seed(0)
    model = adapter.build_gpt_model(tiny_config(**VARIANTS[variant]))
    with torch.no_grad():  # weights at a scale where a wrong path moves the logits
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    logits, grads = _loss_and_grads(model, tokens)
    mcore_paths()
    ref_logits, ref_grads = _loss_and_grads(model, tokens)
    assert logits.abs().max() > 0.5
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["llama", "qwen2_biases"])
def test_forward_only_logits_equal_mcores_paths_bit_for_bit(group, mcore_paths, variant):
    """Without autograd (importance, evaluation) the norms take their in-place path too."""
    torch.manual_seed(0)
    model = adapter.build_gpt_model(tiny_config(**VARIANTS[variant]))
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = adapter.stage_forward(model, tokens, position_ids_for(tokens))
        mcore_paths()
        reference = adapter.stage_forward(model, tokens, position_ids_for(tokens))
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_rmsnorm_in_place_path_equals_torchs():
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(7, 3, 48) * 5
    with torch.no_grad():
        fast = norm(x)
        torch.testing.assert_close(fast, torch.nn.RMSNorm.forward(norm, x), rtol=0, atol=0)
        assert not fast.requires_grad
    trained = norm(x.requires_grad_(True))  # autograd on: its own backward
    assert trained.grad_fn is not None
    torch.testing.assert_close(trained.detach(), fast, rtol=0, atol=0)
    grad = torch.randn_like(x)
    mine = torch.autograd.grad(trained, (x, norm.weight), grad)
    reference = torch.autograd.grad(torch.nn.RMSNorm.forward(norm, x), (x, norm.weight), grad)
    for got, expected in zip(mine, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    double = RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        double.weight.normal_()
    assert torch.autograd.gradcheck(
        lambda x, w: norm_module._RMSNormFunction.apply(x, w, 1e-6),
        (torch.randn(4, 3, 6, dtype=torch.double, requires_grad=True), double.weight))
    half = RMSNorm(48, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        half.weight.copy_(norm.weight)
        torch.testing.assert_close(half(x.bfloat16()), torch.nn.RMSNorm.forward(half, x.bfloat16()),
                                   rtol=0, atol=0)  # bf16: computed in fp32, cast back
    x16 = x.detach().bfloat16().requires_grad_(True)
    mine = torch.autograd.grad(half(x16), (x16, half.weight), grad.bfloat16())
    reference = torch.autograd.grad(torch.nn.RMSNorm.forward(half, x16), (x16, half.weight),
                                    grad.bfloat16())
    assert mine[0].dtype == torch.bfloat16 and mine[1].dtype == torch.bfloat16
    for got, expected in zip(mine, reference):
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        wide = RMSNorm(48, eps=1e-6).double()  # float64: torch's kernel
        torch.testing.assert_close(wide(x.double()), torch.nn.RMSNorm.forward(wide, x.double()),
                                   rtol=0, atol=0)


def test_dense_local_spec_uses_them_and_moe_experts_keep_mcores(group):
    model = adapter.build_gpt_model(tiny_config())
    assert type(model.decoder.final_layernorm) is RMSNorm
    assert type(adapter.build_gpt_model(tiny_config(normalization="LayerNorm"))
                .decoder.final_layernorm) is torch.nn.LayerNorm
    for layer in adapter.decoder_layers(model):
        assert type(layer.input_layernorm) is RMSNorm and type(layer.pre_mlp_layernorm) is RMSNorm
        assert type(layer.mlp) is SwiGLUMLP
        assert type(layer.mlp.linear_fc1) is ColumnLinear
        assert type(layer.mlp.linear_fc2) is RowLinear
        assert type(layer.self_attention.linear_qkv) is ColumnLinear
        assert type(layer.self_attention.linear_proj) is RowLinear
    moe = adapter.build_gpt_model(tiny_moe_config())
    kinds = [type(layer.mlp).__name__ for layer in adapter.decoder_layers(moe)]
    assert kinds == ["MoELayer", "SwiGLUMLP", "MoELayer", "MoELayer"]
    experts = [m for m in moe.modules() if type(m) is MLP]
    assert experts and all(type(e.linear_fc1) is ColumnParallelLinear
                           and type(e.linear_fc2) is RowParallelLinear for e in experts)


def test_linears_take_mcores_path_outside_the_plain_case(group, monkeypatch):
    """A supplied weight, or sequence parallelism (or >1 TP rank) goes to mcore's forward."""
    model = adapter.build_gpt_model(tiny_config())
    layer = adapter.decoder_layers(model)[0]
    qkv, proj = layer.self_attention.linear_qkv, layer.self_attention.linear_proj
    assert linear._plain(qkv) and linear._plain(proj)
    calls = []
    for cls in (ColumnParallelLinear, RowParallelLinear):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, original=original, **k: (
            calls.append(type(self)), original(self, *a, **k))[1])
    x = torch.randn(5, 2, 64)
    qkv(x)
    proj(torch.randn(5, 2, 64))
    assert calls == []
    qkv(x, weight=qkv.weight.detach() * 2)
    assert calls == [ColumnLinear]
    monkeypatch.setattr(proj, "sequence_parallel", True)
    assert not linear._plain(proj)


def test_swiglu_gradient_in_one_buffer():
    x = torch.randn(5, 3, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (x,))
    y = torch.randn(5, 3, 8, requires_grad=True)
    gate, up = y.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(SwiGLU.apply(y), expected, rtol=0, atol=0)
    with torch.no_grad():  # the in-place path without autograd
        torch.testing.assert_close(mlp.swiglu(y), expected, rtol=0, atol=0)


def test_mlp_takes_mcores_path_for_other_activations(group):
    model = adapter.build_gpt_model(tiny_config(activation="squared_relu"))
    block = adapter.decoder_layers(model)[0].mlp
    assert not block._plain_swiglu(None)
    gated = adapter.decoder_layers(adapter.build_gpt_model(tiny_config()))[0].mlp
    assert gated._plain_swiglu(None) and not gated._plain_swiglu(torch.ones(1))


@CPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mscale", [1.0, 1.3])
def test_rope_equals_mcores(dtype, mscale):
    fast = rope_utils._apply_rotary_pos_emb_bshd
    original = fast.__wrapped__
    generator = torch.Generator().manual_seed(0)
    t = (torch.randn(7, 2, 3, 16, generator=generator) * 3).to(dtype)
    freqs = torch.randn(7, 1, 1, 16, generator=generator) * 4
    for _ in range(2):  # the second call reads the cached cos and sin
        torch.testing.assert_close(fast(t, freqs, mscale=mscale),
                                   original(t, freqs, mscale=mscale), rtol=0, atol=0)
    freqs.mul_(0.5)  # changed in place: recomputed
    torch.testing.assert_close(fast(t, freqs, mscale=mscale), original(t, freqs, mscale=mscale),
                               rtol=0, atol=0)
    other = torch.randn(7, 1, 1, 16, generator=generator)  # another tensor: recomputed
    torch.testing.assert_close(fast(t, other, mscale=mscale), original(t, other, mscale=mscale),
                               rtol=0, atol=0)


@CPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_gradient_equals_mcores(dtype):
    fast = rope_utils._apply_rotary_pos_emb_bshd
    original = fast.__wrapped__
    generator = torch.Generator().manual_seed(0)
    freqs = torch.randn(7, 1, 1, 16, generator=generator, dtype=dtype) * 4
    weight = torch.randn(7, 2, 3, 16, generator=generator, dtype=dtype)
    base = torch.randn(7, 2, 3, 16, generator=generator, dtype=dtype) * 3
    grads = []
    for function in (fast, original):
        t = base.clone().requires_grad_()
        (function(t, freqs, mscale=1.3) * weight).sum().backward()
        grads.append(t.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    if dtype == torch.float64:
        t = base[:3, :1].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: fast(t, freqs[:3]), (t,))


def test_fast_paths_run_inside_the_model(group, monkeypatch):
    """Each path is taken where mcore's layers call it, not only when called directly: the
    layers pass keywords (a padding mask to the MLP, say) that a direct call does not."""
    calls = {"linear": 0, "swiglu": 0, "rope": 0, "norm": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(linear, "_plain_forward", counted("linear", linear._plain_forward))
    monkeypatch.setattr(mlp.SwiGLU, "apply", counted("swiglu", mlp.SwiGLU.apply))
    cfg = tiny_config()
    torch.manual_seed(0)
    model = adapter.build_gpt_model(cfg)
    if not torch.cuda.is_available():
        from megatron_minitron.compat import cpu
        monkeypatch.setattr(cpu._Rope, "apply", counted("rope", cpu._Rope.apply))
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    _loss_and_grads(model, tokens)
    layers = cfg.num_layers
    assert calls["linear"] == 4 * layers and calls["swiglu"] == layers
    if not torch.cuda.is_available():
        assert calls["rope"] == 2 * layers  # queries and keys
    mean = torch.mean
    monkeypatch.setattr(torch, "mean", counted("norm", mean))
    model.eval()
    with torch.no_grad():
        adapter.stage_forward(model, tokens, position_ids_for(tokens))
    assert calls["norm"] == 2 * layers + 1


@CPU_ONLY
def test_rope_partial_and_interleaved_take_mcores_path():
    fast = rope_utils._apply_rotary_pos_emb_bshd
    original = fast.__wrapped__
    t = torch.randn(5, 2, 3, 16)
    partial = torch.randn(5, 1, 1, 8)  # rotary_percent 0.5: a pass-through half
    torch.testing.assert_close(fast(t, partial), original(t, partial), rtol=0, atol=0)
    freqs = torch.randn(5, 1, 1, 16)
    torch.testing.assert_close(fast(t, freqs, rotary_interleaved=True),
                               original(t, freqs, rotary_interleaved=True), rtol=0, atol=0)
    assert not torch.equal(fast(t, freqs, rotary_interleaved=True), fast(t, freqs))


def test_mlp_gets_its_group_without_warnings(group, caplog):
    from megatron.core import parallel_state

    with caplog.at_level("WARNING"):
        model = adapter.build_gpt_model(tiny_config())
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    assert all(layer.mlp.linear_fc1.tp_group is tp_group
               for layer in adapter.decoder_layers(model))
