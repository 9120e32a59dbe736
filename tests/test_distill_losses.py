"""Distillation losses: equal to a plain autograd implementation, exact over vocab-parallel
logits (TP=2 equals TP=1), untouched by the cross-entropy term, and within the memory bound."""

import math

import pytest
import torch

from megatron_minitron.distill.losses import (
    LOGIT_LOSSES,
    LogitLossSpec,
    _chunk_rows,
    logits_loss,
    loss_chunk_elements,
)
from megatron_minitron.distill.reference import reference_logits_loss
from megatron_minitron.distill.memory import LiveTensorBytes
from megatron_minitron.testing import spawn

SEQ, BATCH, VOCAB = 12, 2, 64


def _inputs(seed=0, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(SEQ, BATCH, vocab, generator=generator)
    teacher = 2.0 * torch.randn(SEQ, BATCH, vocab, generator=generator)
    labels = torch.randint(0, vocab, (SEQ, BATCH), generator=generator)
    mask = (torch.rand(SEQ, BATCH, generator=generator) > 0.25).float()
    return student, teacher, labels, mask


def _loss_and_grad(function, student, teacher, labels, mask, spec, **kwargs):
    student = student.clone().requires_grad_(True)
    result = function(student, teacher, labels, mask, spec, **kwargs)
    result.total.backward()
    return result, student.grad


SPECS = [LogitLossSpec(kind, temperature=temp, ce_weight=ce, topk=8, chunk_tokens=5)
         for kind in LOGIT_LOSSES for temp in (1.0, 2.0) for ce in (0.0, 0.5)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-T{s.temperature}-ce{s.ce_weight}")
def test_matches_plain_autograd(spec):
    student, teacher, labels, mask = _inputs()
    ours, grad = _loss_and_grad(logits_loss, student, teacher, labels, mask, spec)
    plain, plain_grad = _loss_and_grad(reference_logits_loss, student, teacher, labels, mask, spec)
    for name in ("total", "kd", "ce", "tokens"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(plain, name).double(),
                                   rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(grad, plain_grad.float(), rtol=1e-5, atol=1e-7)
    assert float(ours.kd) > 0


def test_scaled_backward_scales_the_gradient():
    student, teacher, labels, mask = _inputs(2)
    spec = LogitLossSpec("kl", ce_weight=0.5, chunk_tokens=5)
    _, grad = _loss_and_grad(logits_loss, student, teacher, labels, mask, spec)
    scaled = student.clone().requires_grad_(True)
    (3.0 * logits_loss(scaled, teacher, labels, mask, spec).total).backward()
    torch.testing.assert_close(scaled.grad, 3.0 * grad)


def test_chunk_size_follows_the_device():
    assert loss_chunk_elements("cpu") == loss_chunk_elements(torch.device("cpu")) == 1 << 21
    cuda = torch.device("cuda", 0)
    assert loss_chunk_elements(cuda, free_bytes=80 << 30) == 1 << 28  # capped
    assert loss_chunk_elements(cuda, free_bytes=3 << 30) == (3 << 30) // (8 * 6 * 4)
    assert loss_chunk_elements("cuda", free_bytes=1 << 20) == 1 << 21  # never below the CPU's


def test_llama3_micro_batch_takes_few_chunks_on_a_gpu(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 << 30, 80 << 30))
    shape = (4096, 1, 128256)  # [s, b, v]: one 4096-token micro-batch at Llama-3's vocabulary
    with FakeTensorMode():  # shapes and devices only: no memory, no GPU needed
        on_cpu = torch.empty(shape, dtype=torch.bfloat16)
        on_gpu = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        assert math.ceil(shape[0] / _chunk_rows(on_cpu, LogitLossSpec())) == 256
        assert math.ceil(shape[0] / _chunk_rows(on_gpu, LogitLossSpec())) == 32


def test_cross_entropy_only():
    student, _, labels, mask = _inputs(1)
    spec = LogitLossSpec("kl", kd_weight=0.0, ce_weight=1.0, chunk_tokens=5)
    ours, grad = _loss_and_grad(logits_loss, student, None, labels, mask, spec)
    plain = torch.nn.functional.cross_entropy(student.double().reshape(-1, VOCAB),
                                              labels.reshape(-1), reduction="none")
    assert torch.isclose(ours.total, (plain * mask.reshape(-1)).sum(), rtol=1e-6)
    assert float(ours.kd) == 0.0


def test_kd_untouched_by_cross_entropy_term():
    """The KD value is bit-identical with the CE term on or off and no input is modified
    (mcore's non-fused vocab-parallel CE rewrites its logits in place)."""
    student, teacher, labels, mask = _inputs(2)
    kept = (student.clone(), teacher.clone())
    values = []
    for ce_weight in (0.0, 1.0):
        spec = LogitLossSpec("kl", ce_weight=ce_weight, chunk_tokens=5)
        result, _ = _loss_and_grad(logits_loss, student, teacher, labels, mask, spec)
        values.append(result.kd.item())
        assert torch.equal(student, kept[0]) and torch.equal(teacher, kept[1])
    assert values[0] == values[1]


def test_teacher_buffer_reuse_gives_same_gradient():
    student, teacher, labels, mask = _inputs(3)
    spec = LogitLossSpec("kl", ce_weight=0.5, chunk_tokens=5)
    _, grad = _loss_and_grad(logits_loss, student, teacher, labels, mask, spec)
    scratch = teacher.clone()
    _, reused = _loss_and_grad(logits_loss, student, scratch, labels, mask, spec,
                               teacher_writable=True)
    assert torch.equal(grad, reused)
    assert reused.data_ptr() == scratch.data_ptr()  # the gradient lives in the teacher buffer


@pytest.mark.parametrize("kind", ["kl", "rkl", "topk_kl"])
def test_extra_peak_memory_bound(kind):
    """Extra peak memory of forward + backward vs one logits tensor: ≤ 1.25 with a separate
    gradient buffer, ≤ 0.25 when the teacher buffer takes the gradient, ≫ 1 for plain autograd."""
    seq, batch, vocab = 128, 2, 1024
    logits_bytes = seq * batch * vocab * 4
    peaks = {}
    for variant in ("separate", "writable", "plain"):
        student = torch.randn(seq, batch, vocab, requires_grad=True)
        teacher = torch.randn(seq, batch, vocab)
        labels = torch.randint(0, vocab, (seq, batch))
        spec = LogitLossSpec(kind, ce_weight=0.5, temperature=2.0, topk=16, chunk_tokens=seq // 32)
        with LiveTensorBytes() as tracker:
            if variant == "plain":
                result = reference_logits_loss(student.float(), teacher, labels, None, spec)
            else:
                result = logits_loss(student, teacher, labels, None, spec,
                                     teacher_writable=variant == "writable")
            result.total.backward()
        peaks[variant] = tracker.peak / logits_bytes
    assert peaks["separate"] <= 1.25, peaks
    assert peaks["writable"] <= 0.25, peaks
    assert peaks["plain"] > 3.0, peaks


# ----------------------------------------------------------------------------- TP = 2


def _tp2_worker(path):
    from megatron_minitron import adapter, parallel

    parallel.initialize(2, 1)
    rank = adapter.tp_rank()
    group = adapter.get_tp_group()
    out = {}
    for spec in SPECS:
        student, teacher, labels, mask = _inputs()
        shard = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
        result, grad = _loss_and_grad(logits_loss, student[..., shard].contiguous(),
                                      teacher[..., shard].contiguous(), labels, mask, spec,
                                      tp_group=group)
        full_grad = torch.cat(_all_gather(grad, group), dim=-1)
        out[repr(spec)] = (result.total.item(), result.kd.item(), result.ce.item(), full_grad)
    out["mcore_ce_modifies_logits"] = _mcore_ce_modifies_logits(rank, group)
    if rank == 0:
        torch.save(out, path)


def _all_gather(tensor, group):
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _mcore_ce_modifies_logits(rank, group) -> bool:
    """The trap: KD computed after mcore's CE on the same tensor would read probabilities."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    student, teacher, labels, mask = _inputs()
    shard = student[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2].contiguous()
    spec = LogitLossSpec("kl", chunk_tokens=5)
    before = logits_loss(shard, teacher[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2],
                         labels, mask, spec, tp_group=group).kd.item()
    kept = shard.clone()
    vocab_parallel_cross_entropy(shard, labels)
    after = logits_loss(shard, teacher[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2],
                        labels, mask, spec, tp_group=group).kd.item()
    return (not torch.equal(shard, kept)) and before != after


def test_tp2_equals_tp1(tmp_path):
    path = str(tmp_path / "tp2.pt")
    spawn(_tp2_worker, 2, path)
    tp2 = torch.load(path)
    assert tp2["mcore_ce_modifies_logits"]  # the trap exists; our loss never reads such a tensor
    for spec in SPECS:
        student, teacher, labels, mask = _inputs()
        result, grad = _loss_and_grad(logits_loss, student, teacher, labels, mask, spec)
        total, kd, ce, tp2_grad = tp2[repr(spec)]
        for ours, reference in ((total, result.total), (kd, result.kd), (ce, result.ce)):
            assert abs(ours - reference.item()) <= 1e-5 * abs(reference.item()), spec
        torch.testing.assert_close(tp2_grad, grad, rtol=1e-5, atol=1e-7)


def test_no_host_sync_per_micro_batch_on_a_device(monkeypatch):
    """A step's loss (KD + CE + intermediate) forward and a scaled backward on a device read
    nothing back to the host: on the meta device any such read (``bool``, ``.item()``) raises."""
    from megatron_minitron import adapter
    from megatron_minitron.distill.model import StageOutput
    from megatron_minitron.distill.trainer import _loss

    monkeypatch.setattr(adapter, "get_tp_group", lambda: None)
    meta = torch.device("meta")  # shapes only: the host cannot read a value
    student = torch.randn(SEQ, BATCH, VOCAB, device=meta, requires_grad=True)
    teacher = torch.randn(SEQ, BATCH, VOCAB, device=meta)
    hidden = torch.randn(SEQ, BATCH, device=meta, requires_grad=True)
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), device=meta)
    mask = torch.ones(SEQ, BATCH, device=meta)
    spec = LogitLossSpec("kl", ce_weight=0.5)
    total, _, report = _loss(spec, labels, mask, StageOutput(student, teacher, hidden * 1.0))
    (4.0 * total).backward()  # a loss scale: grad_total != 1
    assert student.grad.device == meta and hidden.grad.device == meta
    assert report["sums"].shape == (5,)
    with pytest.raises(Exception):  # a host read does raise there
        bool(total > 0)
