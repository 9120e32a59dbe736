"""The local spec's core attention (torch's fused kernel) equals mcore's DotProductAttention:
causal and explicit masks, grouped queries, gradients, bf16, and the configurations it leaves to
mcore."""

import pytest
import torch

from megatron_minitron import adapter, parallel  # applies the CPU patches before mcore imports
from megatron_minitron.model.attention import SDPAttention
from megatron_minitron.testing import tiny_config

from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402,I001
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

SEQ, BATCH = 12, 3


@pytest.fixture(scope="module")
def group():
    parallel.initialize(1, 1)
    yield
    parallel.teardown()


def _pair(heads=4, groups=2, dropout=0.0):
    cfg = tiny_config(num_attention_heads=heads, num_query_groups=groups)
    config = adapter.transformer_config(cfg, attention_dropout=dropout)
    make = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    return SDPAttention(**make), DotProductAttention(**make), config


def _qkv(config, dtype=torch.float32, grad=False):
    generator = torch.Generator().manual_seed(0)
    dim = config.kv_channels
    shapes = [(SEQ, BATCH, config.num_attention_heads, dim)] + [
        (SEQ, BATCH, config.num_query_groups, dim)] * 2
    return [(torch.randn(s, generator=generator) * 2).to(dtype).requires_grad_(grad)
            for s in shapes]


def _packed_mask():
    """[b, 1, s, s], True = masked: row 0 causal, row 1 two causal segments, row 2 ends in
    four padding positions that see no key (fully masked rows)."""
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    mask = causal.repeat(BATCH, 1, 1, 1)
    mask[1, 0, 6:, :6] = True
    mask[2, 0, 8:, :] = True
    return mask


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1)])
def test_equals_mcore_causal_with_gradients(group, heads, groups):
    fused, plain, config = _pair(heads, groups)
    inputs = _qkv(config, grad=True)
    out = fused(*inputs, None)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = plain(*ref_inputs, None)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_inputs)
    assert out.shape == ref.shape == (SEQ, BATCH, heads * config.kv_channels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_explicit_mask_equals_mcore_and_stays_finite(group):
    fused, plain, config = _pair()
    inputs = _qkv(config)
    mask = _packed_mask()
    out, ref = fused(*inputs, mask), plain(*inputs, mask)
    assert torch.isfinite(out).all()
    seen = ~mask[:, 0].all(-1)  # [b, s]: query positions that see at least one key
    assert not seen.all()  # the case of a fully masked row is exercised
    keep = seen.t().unsqueeze(-1).expand_as(out)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    # the explicit mask really is applied: the segmented row differs from plain causal
    assert not torch.allclose(out[6:, 1], fused(*inputs, None)[6:, 1])


def test_bf16_within_bf16_rounding(group):
    fused, plain, config = _pair()
    inputs = _qkv(config, torch.bfloat16)
    reference = plain(*[t.float() for t in inputs], None)
    out = fused(*inputs, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.03, atol=0.03)


def test_dropout_in_training_takes_mcores_path(group, monkeypatch):
    fused, _, config = _pair(dropout=0.5)
    calls, kernel = [], torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    fused.train()
    with adapter.cuda_to_cpu():
        out = fused(*_qkv(config), None)
    assert not calls and torch.isfinite(out).all()
    fused.eval()
    fused(*_qkv(config), None)
    assert calls  # eval mode (no dropout) goes through the fused kernel


def test_local_spec_uses_it(group):
    model = adapter.build_gpt_model(tiny_config())
    assert all(type(layer.self_attention.core_attention) is SDPAttention
               for layer in adapter.decoder_layers(model))
    assert adapter.accepts_attention_mask(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim acts only without CUDA")
def test_model_compute_pauses_only_the_cpu_mode():
    """The model's own ops run outside the CUDA-to-CPU function mode (it costs ~4% of a CPU
    forward); the mode is back after the block, and outside it the block changes nothing."""
    from torch.overrides import _get_current_function_mode

    from megatron_minitron.compat.cpu import _CudaToCpu, model_compute

    assert _get_current_function_mode() is None
    with model_compute():  # no mode: a no-op
        assert _get_current_function_mode() is None
    with adapter.cuda_to_cpu():
        assert isinstance(_get_current_function_mode(), _CudaToCpu)
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # the mode maps it
        with model_compute():
            assert _get_current_function_mode() is None
        assert isinstance(_get_current_function_mode(), _CudaToCpu)
    assert _get_current_function_mode() is None
