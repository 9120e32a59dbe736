"""Distillation losses on vocab-parallel logits, exact at any TP size and computed in chunks.

    result = logits_loss(student_logits, teacher_logits, labels, loss_mask,
                         LogitLossSpec("kl", temperature=1.0, ce_weight=0.5), tp_group)
    result.total.backward()        # d(kd_weight * KD_sum + ce_weight * CE_sum)

Logits are ``[s, b, v/tp]`` (any leading shape works; chunks run over the first dimension).
Every per-token quantity that needs the whole vocabulary (max, normaliser, dot products) is
all-reduced over the tensor parallel group, so each loss equals the single-rank value.

Memory: the loss walks the logits in chunks of sequence positions. Per chunk it upcasts to fp32,
computes the per-token losses and writes the gradient for the student logits at once, so nothing
of logits size is saved for backward except that gradient. With ``teacher_writable=True`` the
gradient is written into the teacher logits tensor (the caller gives it up), and the only extra
memory is the chunk temporaries. Neither input is otherwise modified: a cross-entropy term never
touches the logits the KD term reads (unlike mcore's non-fused vocab-parallel cross entropy, which
turns its input into probabilities in place).

Definitions per token (``T`` temperature, ``p = softmax(z / T)``; the sum runs over the vocab):

* ``kl``: ``T² · KL(p_teacher ‖ p_student)`` (forward KL, Hinton's T² scaling);
* ``rkl``: ``T² · KL(p_student ‖ p_teacher)``;
* ``mse``: ``mean_v (z_s - z_t)²`` (temperature unused);
* ``cosine``: ``1 - cos(z_s, z_t)`` (temperature unused);
* ``topk_kl``: ``T² · KL(q_teacher ‖ q_student)`` with ``q = softmax`` restricted to the teacher's
  ``topk`` largest logits (ties broken by the lower vocab id);
* cross entropy: ``logsumexp(z_s) - z_s[label]`` at temperature 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from megatron_minitron import parallel
from megatron_minitron.errors import UsageError

LOGIT_LOSSES = ("kl", "rkl", "mse", "cosine", "topk_kl")
INTERMEDIATE_LOSSES = ("cosine", "mse")
_AUTO_CHUNKS = 32  # chunk temporaries stay well under a quarter of one logits tensor
_MIN_CHUNK_ELEMENTS = 1 << 16  # below this, more chunks only add per-op overhead
_CPU_CHUNK_ELEMENTS = 1 << 21  # CPU: cross-entropy gains up to here, KL loses above
_DEVICE_CHUNK_ELEMENTS = 1 << 28  # on a GPU: a few dozen chunks per micro-batch, not hundreds
_CHUNK_TEMPORARIES = 6  # fp32 chunk-sized temporaries of the KL terms (upcasts, exps, diff)
_CHUNK_MEMORY_SHARE = 8  # a chunk's temporaries take at most 1/8 of the device's free memory


@dataclass(frozen=True)
class LogitLossSpec:
    """What the logits loss computes."""

    kind: str = "kl"
    """One of ``kl``, ``rkl``, ``mse``, ``cosine``, ``topk_kl``."""
    temperature: float = 1.0
    """Softmax temperature of the KL losses."""
    kd_weight: float = 1.0
    """Weight of the KD term in ``total``; 0 with no teacher (plain cross-entropy training)."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy term in ``total``."""
    topk: int = 64
    """Teacher logits kept by ``topk_kl``."""
    chunk_tokens: Optional[int] = None
    """Sequence positions per chunk; None picks about 1/32 of the logits, at most
    :func:`loss_chunk_elements` values (2^21 on a CPU)."""

    def __post_init__(self):
        if self.kind not in LOGIT_LOSSES:
            raise UsageError(f"loss {self.kind!r} is unknown; choose one of {LOGIT_LOSSES}")
        if not self.temperature > 0:
            raise UsageError(f"temperature={self.temperature} must be > 0")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise UsageError(f"kd_weight={self.kd_weight} and ce_weight={self.ce_weight} must be "
                             ">= 0 and not both 0")
        if self.topk < 1:
            raise UsageError(f"topk={self.topk} must be >= 1")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise UsageError(f"chunk_tokens={self.chunk_tokens} must be >= 1")


class LogitLossResult(NamedTuple):
    """Sums over the unmasked tokens (float64 scalars; ``total`` carries the gradient)."""

    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    tokens: torch.Tensor


# ----------------------------------------------------------------------------- helpers


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    return parallel.all_reduce(tensor, group=group)


def _vocab_start(local_vocab: int, group) -> int:
    return parallel.group_rank(group) * local_vocab


def loss_chunk_elements(device, free_bytes: Optional[int] = None) -> int:
    """Most logits elements one chunk of the loss holds on ``device`` (a device or its type).

    CPU: 2^21 (measured: cross-entropy is faster up to here, KL slower beyond, at a 49k
    vocabulary). CUDA (or another accelerator): up to 2^28, so that a micro-batch at a Llama-3
    vocabulary takes a few dozen chunks (each costs some kernel launches and one TP
    all-gather) rather than hundreds; the chunk's fp32 temporaries
    stay within 1/8 of ``free_bytes`` (the device's free memory, read from
    ``torch.cuda.mem_get_info`` when None), and never below the CPU size.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return _CPU_CHUNK_ELEMENTS
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if free_bytes is None:
        return _DEVICE_CHUNK_ELEMENTS
    by_memory = free_bytes // (_CHUNK_MEMORY_SHARE * _CHUNK_TEMPORARIES * 4)
    return int(min(_DEVICE_CHUNK_ELEMENTS, max(_CPU_CHUNK_ELEMENTS, by_memory)))


def _chunk_rows(logits: torch.Tensor, spec: LogitLossSpec) -> int:
    """Sequence positions per chunk: the spec's, else about 1/32 of the logits, at most
    :func:`loss_chunk_elements` for the logits' device and at least one row."""
    rows = logits.shape[0]
    if spec.chunk_tokens is not None:
        return min(rows, spec.chunk_tokens)
    per_row = max(1, math.prod(logits.shape[1:]))
    budget = min(max(logits.numel() // _AUTO_CHUNKS, _MIN_CHUNK_ELEMENTS),
                 loss_chunk_elements(logits.device))
    return max(1, min(rows, budget // per_row))


class _Chunk:
    """One chunk of positions: fp32 logits, loss mask, labels, and where its gradient goes."""

    def __init__(self, student, teacher, labels, mask, vocab_start, spec, out):
        self.s = student.float()  # [c, b, v/tp]; a view when already fp32: never written
        self.t = None if teacher is None else teacher.float()
        self.mask = mask.to(torch.float32)  # [c, b]
        self.labels = labels
        self.vocab_start = vocab_start
        self.spec = spec
        self.out = out  # [c, b, v/tp] gradient destination (may alias the teacher), or None
        self.written = False  # whether ``out`` holds a gradient term yet
        self.lse_student = None  # log-sum-exp of the student logits when a KL found it (T = 1)
        self.target = None  # z[label], all-reduced, when a KL found it (T = 1)

    def emit(self, values: torch.Tensor, row_scale: torch.Tensor) -> None:
        """out (+)= values * row_scale[..., None], with the loss mask folded into the scale."""
        scale = (row_scale * self.mask).unsqueeze(-1)
        if self.written:
            self.out.addcmul_(values, scale)
        else:
            torch.mul(values, scale, out=self.out)
            self.written = True


def _vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b, dim=-1)


def _shifted_exp(x: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    return torch.sub(x, row_max.unsqueeze(-1)).exp_()


def _target_logits(chunk: _Chunk, logits: torch.Tensor) -> torch.Tensor:
    """This rank's share of z[label] (0 where another rank owns the label): [c, b]."""
    local = chunk.labels - chunk.vocab_start
    owned = (local >= 0) & (local < logits.shape[-1])
    picked = torch.gather(logits, -1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1))
    return picked.squeeze(-1) * owned


def _subtract_onehot(chunk: _Chunk, weight: float) -> None:
    """out[label] -= weight (masked) on the rank owning each label."""
    out = chunk.out
    local = chunk.labels - chunk.vocab_start
    owned = (local >= 0) & (local < out.shape[-1])
    values = (-weight * chunk.mask * owned).to(out.dtype)
    out.scatter_add_(-1, local.clamp(0, out.shape[-1] - 1).unsqueeze(-1), values.unsqueeze(-1))


# ----------------------------------------------------------------------------- KD terms
# Each returns the per-token loss [c, b] and, when the chunk has an ``out``, writes kd_weight
# times the gradient of the per-token loss w.r.t. the student logits into it.


def _combine_ranks(local_max: torch.Tensor, local_sums: torch.Tensor, owners, group):
    """Vocab-global statistics from each rank's, with one collective.

    ``local_max`` [m, c, b]: row maxima of m tensors on this rank's vocab shard;
    ``local_sums`` [n, c, b]: sums of ``exp(x - local max) * ...`` (``owners[i]`` names the
    tensor whose max shifted sum ``i``; -1: a plain sum). Returns the global maxima [m, c, b],
    the sums rescaled to them [n, c, b] and this rank's rescale factors ``exp(local - global
    max)`` [m, c, b], which turn its local exponentials into global ones.
    """
    size = parallel.group_size(group)
    stats = torch.cat([local_max, local_sums])  # [m + n, c, b]
    if size == 1:
        return local_max, local_sums, torch.ones_like(local_max)
    gathered = parallel.all_gather_into_tensor(stats, group)  # [tp * (m + n), c, b]
    gathered = gathered.view((size,) + tuple(stats.shape))  # [tp, m + n, c, b]
    maxima = gathered[:, :local_max.shape[0]]  # [tp, m, c, b]
    global_max = maxima.amax(dim=0)
    rescale = torch.exp(maxima - global_max)  # [tp, m, c, b]
    sums = []
    for index, owner in enumerate(owners):
        parts = gathered[:, local_max.shape[0] + index]  # [tp, c, b]
        sums.append((parts * rescale[:, owner]).sum(0) if owner >= 0 else parts.sum(0))
    mine = rescale[parallel.group_rank(group)]
    return global_max, torch.stack(sums), mine


def _kl(chunk: _Chunk, group, reverse: bool, ce_share: float):
    """``ce_share``: weight of a cross-entropy term folded in (temperature 1): its softmax part
    ``ce_share * p_s`` is added to the gradient here, leaving only the one-hot part.

    Exponentials use this rank's row maxima; one all-gather of the per-row statistics makes
    them global (:func:`_combine_ranks`).
    """
    spec = chunk.spec
    temp = spec.temperature
    s = chunk.s if temp == 1.0 else chunk.s / temp
    t = chunk.t if temp == 1.0 else chunk.t / temp
    local_max = torch.stack([s.amax(dim=-1), t.amax(dim=-1)])  # [2, c, b]
    exp_s = _shifted_exp(s, local_max[0])
    exp_t = _shifted_exp(t, local_max[1])
    diff = torch.sub(s, t)  # [c, b, v/tp]
    sums = [exp_s.sum(-1), exp_t.sum(-1), _vecdot(diff, exp_s if reverse else exp_t)]
    owners = [0, 1, 0 if reverse else 1]
    if temp == 1.0:  # the CE term's target logits ride along
        sums.append(_target_logits(chunk, chunk.s))
        owners.append(-1)
    row_max, sums, rescale = _combine_ranks(local_max, torch.stack(sums), owners, group)
    if temp == 1.0:
        chunk.target = sums[3]
    lse_s = row_max[0] + torch.log(sums[0])
    lse_t = row_max[1] + torch.log(sums[1])
    if reverse:  # sum p_s (s - t) - lse_s + lse_t
        mean_diff = sums[2] / sums[0]
        loss = mean_diff - lse_s + lse_t
    else:  # sum p_t (t - s) - lse_t + lse_s
        del diff
        loss = -sums[2] / sums[1] - lse_t + lse_s
    if temp == 1.0:
        chunk.lse_student = lse_s
    if chunk.out is not None:  # p = local exp * rescale / global sum
        scale = spec.kd_weight * temp  # d/dz = (1/T) d/ds, times the T^2 of the loss
        if reverse:  # d/ds = p_s * ((s - t) - mean(s - t))
            factor = diff.sub_(mean_diff.unsqueeze(-1)).mul_(scale).add_(ce_share)
            chunk.emit(exp_s.mul_(factor), rescale[0] / sums[0])
        else:  # d/ds = p_s - p_t
            chunk.emit(exp_s, (scale + ce_share) * rescale[0] / sums[0])
            chunk.emit(exp_t, -scale * rescale[1] / sums[1])
    return loss * (temp * temp)


def _mse(chunk: _Chunk, group):
    diff = torch.sub(chunk.s, chunk.t)
    vocab = diff.shape[-1] * parallel.group_size(group)
    loss = _all_reduce(_vecdot(diff, diff), group) / vocab
    if chunk.out is not None:
        chunk.emit(diff, torch.full_like(loss, 2.0 * chunk.spec.kd_weight / vocab))
    return loss


def _cosine(chunk: _Chunk, group):
    s, t = chunk.s, chunk.t
    sums = _all_reduce(torch.stack([_vecdot(s, t), _vecdot(s, s), _vecdot(t, t)]), group)
    norm_s = sums[1].sqrt().clamp_min(1e-12)
    norm_t = sums[2].sqrt().clamp_min(1e-12)
    cos = sums[0] / (norm_s * norm_t)
    if chunk.out is not None:  # d(1 - cos)/ds = cos * s / |s|^2 - t / (|s||t|)
        weight = chunk.spec.kd_weight
        t_part = t * (weight / (norm_s * norm_t)).unsqueeze(-1)  # before ``out`` (the teacher
        chunk.emit(s, weight * cos / (norm_s * norm_s))     # buffer, maybe) is written
        chunk.emit(t_part, -torch.ones_like(cos))
    return 1.0 - cos


def _topk_kl(chunk: _Chunk, group):
    spec, s, t = chunk.spec, chunk.s, chunk.t
    local_vocab = t.shape[-1]
    values, index = torch.topk(t, min(spec.topk, local_vocab), dim=-1, sorted=False)
    index = index + chunk.vocab_start  # [c, b, k_local] global ids
    size = parallel.group_size(group)
    if size > 1:
        values = torch.cat(parallel.all_gather(values, group), -1)
        index = torch.cat(parallel.all_gather(index, group), -1)
    # candidates in vocab order, so that ties resolve the same way at every TP size
    order = torch.argsort(index, dim=-1)
    values, index = values.gather(-1, order), index.gather(-1, order)
    k = min(spec.topk, values.shape[-1])
    top_values, top_pos = torch.topk(values, k, dim=-1, sorted=True)
    local = index.gather(-1, top_pos) - chunk.vocab_start  # [c, b, k]
    owned = (local >= 0) & (local < local_vocab)
    local = local.clamp(0, local_vocab - 1)
    student_top = _all_reduce(s.gather(-1, local) * owned, group)  # [c, b, k]
    temp = spec.temperature
    log_q_t = torch.log_softmax(top_values / temp, dim=-1)
    log_q_s = torch.log_softmax(student_top / temp, dim=-1)
    q_t = log_q_t.exp()
    loss = (q_t * (log_q_t - log_q_s)).sum(-1) * (temp * temp)
    if chunk.out is not None:
        grad_top = (log_q_s.exp() - q_t) * (spec.kd_weight * temp) * owned  # [c, b, k]
        chunk.out.zero_()
        chunk.out.scatter_add_(-1, local, (grad_top * chunk.mask.unsqueeze(-1)).to(
            chunk.out.dtype))
        chunk.written = True
    return loss


def _kd_term(chunk: _Chunk, group, ce_share: float) -> torch.Tensor:
    kind = chunk.spec.kind
    if kind in ("kl", "rkl"):
        return _kl(chunk, group, kind == "rkl", ce_share)
    if kind == "mse":
        return _mse(chunk, group)
    if kind == "cosine":
        return _cosine(chunk, group)
    return _topk_kl(chunk, group)


def _ce_term(chunk: _Chunk, group, weight: float, folded: bool) -> torch.Tensor:
    """Cross entropy at temperature 1 (reusing the KL's normaliser when it has one).

    With ``weight > 0`` and an ``out``, adds ``weight`` times its gradient; ``folded``: the
    softmax part is already there (see :func:`_kl`).
    """
    s = chunk.s
    grad = chunk.out is not None and weight > 0
    lse, target = chunk.lse_student, chunk.target
    if lse is None or (grad and not folded):
        local_max = s.amax(dim=-1).unsqueeze(0)  # [1, c, b]
        exp = _shifted_exp(s, local_max[0])
        sums = [exp.sum(-1)] + ([_target_logits(chunk, s)] if target is None else [])
        row_max, sums, rescale = _combine_ranks(local_max, torch.stack(sums),
                                                [0, -1][:len(sums)], group)
        lse = row_max[0] + torch.log(sums[0])
        target = sums[1] if target is None else target
        if grad and not folded:
            chunk.emit(exp, weight * rescale[0] / sums[0])
    elif target is None:
        target = _all_reduce(_target_logits(chunk, s), group)
    if grad:
        _subtract_onehot(chunk, weight)
    return lse - target


# ----------------------------------------------------------------------------- autograd


def _grad_buffer(student, teacher, teacher_writable: bool) -> torch.Tensor:
    if (teacher_writable and teacher is not None and teacher.dtype == student.dtype
            and teacher.shape == student.shape and teacher.is_contiguous()):
        return teacher
    return torch.empty_like(student)


class _FusedLogitsLoss(torch.autograd.Function):
    """Forward computes loss sums and the student-logits gradient chunk by chunk."""

    @staticmethod
    def forward(ctx, student, teacher, labels, mask, spec, group, teacher_writable):
        need_grad = ctx.needs_input_grad[0]
        use_kd = teacher is not None and spec.kd_weight > 0
        grad_buffer = _grad_buffer(student, teacher, teacher_writable) if need_grad else None
        vocab_start = _vocab_start(student.shape[-1], group)
        kd_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        ce_weight = spec.ce_weight if use_kd else 1.0
        fold = use_kd and ce_weight > 0 and spec.kind in ("kl", "rkl") and spec.temperature == 1
        rows = _chunk_rows(student, spec)
        for start in range(0, student.shape[0], rows):
            end = min(start + rows, student.shape[0])
            chunk = _Chunk(student[start:end], None if teacher is None else teacher[start:end],
                           labels[start:end], mask[start:end], vocab_start, spec,
                           grad_buffer[start:end] if need_grad else None)
            if use_kd:
                kd_tokens = _kd_term(chunk, group, ce_weight if fold else 0.0)
                kd_sum += _vecdot(kd_tokens.double().flatten(), chunk.mask.double().flatten())
            ce_tokens = _ce_term(chunk, group, ce_weight, fold)
            ce_sum += _vecdot(ce_tokens.double().flatten(), chunk.mask.double().flatten())
            if need_grad and not chunk.written:
                chunk.out.zero_()
            del chunk
        total = (spec.kd_weight * kd_sum + spec.ce_weight * ce_sum) if use_kd else ce_sum.clone()
        ctx.grad_buffer = grad_buffer
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        grad = ctx.grad_buffer
        ctx.grad_buffer = None
        if grad_total is None:
            return None, None, None, None, None, None, None
        # On an accelerator, scale always: reading grad_total on the host would stall the
        # device queue (a host sync per micro-batch); on the CPU the check is free.
        if grad_total.device.type != "cpu" or not bool(grad_total == 1):
            grad.mul_(grad_total.to(grad.dtype))
        return grad, None, None, None, None, None, None


def logits_loss(student: torch.Tensor, teacher: Optional[torch.Tensor], labels: torch.Tensor,
                loss_mask: Optional[torch.Tensor], spec: LogitLossSpec, tp_group=None,
                teacher_writable: bool = False) -> LogitLossResult:
    """KD + cross-entropy sums over the unmasked tokens of vocab-parallel logits.

    Args:
        student: student logits ``[s, b, v/tp]`` (this rank's vocab shard).
        teacher: teacher logits of the same shape, or None for cross-entropy only.
        labels: next-token ids ``[s, b]`` (global vocab ids).
        loss_mask: ``[s, b]`` weights (1 keeps a token); None keeps all.
        spec: loss kind, temperature and weights.
        tp_group: the tensor parallel group the vocab is split over (None: not split).
        teacher_writable: the teacher tensor may be overwritten with the gradient.

    Returns:
        :class:`LogitLossResult`: ``total = kd_weight·kd + ce_weight·ce`` (differentiable
        w.r.t. ``student``; just ``ce`` when there is no teacher), the KD and CE sums
        (always reported, detached) and the number of unmasked tokens.
    """
    if teacher is not None and teacher.shape != student.shape:
        raise UsageError(f"teacher logits {list(teacher.shape)} and student logits "
                         f"{list(student.shape)} differ; teacher and student need the same "
                         "vocabulary and tensor parallel size")
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels {list(labels.shape)} do not match logits "
                         f"{list(student.shape)}")
    mask = torch.ones(labels.shape, device=student.device) if loss_mask is None else loss_mask
    teacher_in = None if teacher is None else teacher.detach()
    total, kd, ce = _FusedLogitsLoss.apply(student, teacher_in, labels, mask, spec, tp_group,
                                           teacher_writable)
    return LogitLossResult(total, kd, ce, mask.to(torch.float64).sum())


# ----------------------------------------------------------------------------- intermediate


def intermediate_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                      kind: str = "cosine") -> torch.Tensor:
    """Per-token loss between (projected) student and teacher hidden states ``[s, b, h]``.

    ``cosine``: ``1 - cos`` along the hidden dimension; ``mse``: mean squared difference.
    Hidden states are replicated over tensor parallel ranks (no sequence parallelism), so
    every rank computes the same value. Returns ``[s, b]`` in fp32.
    """
    student_hidden = student_hidden.float()
    teacher_hidden = teacher_hidden.detach().float()
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(student_hidden, teacher_hidden,
                                                           dim=-1, eps=1e-8)
    if kind == "mse":
        return ((student_hidden - teacher_hidden) ** 2).mean(-1)
    raise UsageError(f"intermediate loss {kind!r} is unknown; choose one of "
                     f"{INTERMEDIATE_LOSSES}")


def logits_bytes(shape, dtype=torch.float32) -> int:
    """Bytes of one logits tensor of ``shape``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
