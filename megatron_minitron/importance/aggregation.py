"""Aggregation of per-token activation scores over sequence, then over batch, exact across ranks.

A score source yields per-token values ``x`` of shape [s, b, c] (c = channels, heads, neurons).
Each sample is first reduced over its sequence (``seq``: mean, l2 or var) to a [b, c] vector; those
per-sample vectors are then reduced over every calibration sample (``batch``: mean, l2 or var).

Tokens routed to an expert arrive permuted; :func:`reduce_routed` reduces them per sample from
their recovered sample ids (over a sample's routed tokens, or over all its tokens with the
others counting as 0), with the same three reductions.

The batch reduction keeps ``(count, mean, M2)`` per channel (Chan/Welford form, float64), which
merges exactly between data parallel ranks: l2 = sqrt(M2 + n·mean²), var = M2 / n (population).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_minitron import parallel
from megatron_minitron.errors import UsageError

REDUCTIONS = ("mean", "l2", "var")


@dataclass(frozen=True)
class Aggregation:
    """How per-token scores become one number per component."""

    batch: str = "l2"
    """Reduction over calibration samples: mean, l2 or var."""
    seq: str = "mean"
    """Reduction over each sample's tokens: mean, l2 or var."""

    def __post_init__(self):
        for axis, name in (("batch", self.batch), ("sequence", self.seq)):
            if name not in REDUCTIONS:
                raise UsageError(f"unknown {axis} aggregation {name!r}; use one of "
                                 f"{', '.join(REDUCTIONS)} (e.g. --aggregation l2,mean)")

    @classmethod
    def parse(cls, text: str) -> "Aggregation":
        """``"l2,mean"`` → Aggregation(batch="l2", seq="mean")."""
        parts = [p.strip().lower() for p in text.split(",")]
        if len(parts) != 2:
            raise UsageError(f"--aggregation {text!r} must be BATCH,SEQ (e.g. l2,mean); each of "
                             f"{', '.join(REDUCTIONS)}")
        return cls(batch=parts[0], seq=parts[1])

    def __str__(self) -> str:
        return f"{self.batch},{self.seq}"


def reduce_sequence(values: torch.Tensor, how: str, magnitude: bool = False) -> torch.Tensor:
    """[s, b, c] → [b, c] float64 of ``values`` (or of ``|values|`` when ``magnitude``).

    The reduction runs in float32 (one sample's sequence is short enough; the cross-sample
    accumulation is float64). The element-wise step and a plain sum over the sequence take a
    third of the time of ``linalg.vector_norm`` over a leading dimension on CPUs, for one
    activation-sized temporary.
    """
    values = values.float()
    if how == "mean":
        reduced = (values.abs().sum(dim=0) / values.shape[0] if magnitude
                   else values.mean(dim=0))
    elif how == "l2":
        reduced = values.square().sum(dim=0).sqrt()
    else:
        reduced = (values.abs() if magnitude else values).var(dim=0, unbiased=False)
    return reduced.double()


def reduce_routed(values: torch.Tensor, sample: torch.Tensor, num_samples: int, how: str,
                  magnitude: bool = False, seq_length: Optional[int] = None):
    """Per-sample reduction of routed tokens: ``values`` [n, c] of n tokens in any order,
    ``sample`` [n] the sample (0 ≤ id < ``num_samples``) each token belongs to.

    Returns ``(per_sample [num_samples, c] float64, tokens [num_samples])``. With ``seq_length``
    each sample's reduction runs over all its ``seq_length`` tokens, the ones absent from
    ``values`` counting as 0 (a sample without routed tokens gives 0); without it, over the
    sample's routed tokens only (a sample without any gives 0 and ``tokens`` 0, for the caller
    to leave out). mean, l2 and var as :func:`reduce_sequence` (var: population, two-pass).
    """
    values = values.float()
    if values.dim() == 1:
        values = values.unsqueeze(1)
    if magnitude:
        values = values.abs()
    channels = values.shape[1]
    tokens = torch.bincount(sample, minlength=num_samples)[:num_samples]
    length = (tokens.clamp_min(1) if seq_length is None
              else torch.full_like(tokens, seq_length)).to(values.dtype).unsqueeze(1)

    def segment_sum(rows):
        out = torch.zeros(num_samples, channels, dtype=rows.dtype, device=rows.device)
        return out.index_add_(0, sample, rows)

    if how == "l2":
        reduced = segment_sum(values.square()).sqrt()
    else:
        mean = segment_sum(values) / length
        if how == "mean":
            reduced = mean
        else:
            absent = (length - tokens.to(values.dtype).unsqueeze(1)) * mean.square()
            reduced = (segment_sum((values - mean[sample]).square()) + absent) / length
    return reduced.double(), tokens


PENDING_ELEMENTS = 1 << 12
"""Per-sample rows a :class:`StreamingStat` keeps before merging them in one step (float64
elements, 32 KiB): one merge per batch of rows instead of per micro-batch, a dozen small ops
whose cost is comparable to the activation's own reduction at these widths."""


class StreamingStat:
    """Running (count, mean, M2) over samples for ``num_channels`` channels.

    Per-sample rows are merged in blocks (Chan et al.'s pairwise update, exact in exact
    arithmetic): each update appends its rows, and a block is merged when it reaches
    :data:`PENDING_ELEMENTS` or the state is read (:meth:`result`, :meth:`all_merge`,
    :attr:`mean`, :attr:`m2`)."""

    def __init__(self, num_channels: int, agg: Aggregation, device=None):
        self.agg = agg
        self._count = 0
        self._mean = torch.zeros(num_channels, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(num_channels, dtype=torch.float64, device=device)
        self._pending: List[torch.Tensor] = []
        self._pending_rows = 0
        self._limit = max(1, PENDING_ELEMENTS // max(1, num_channels))

    @property
    def count(self) -> int:
        """Samples seen (merged or pending)."""
        return self._count + self._pending_rows

    @property
    def mean(self) -> torch.Tensor:
        self.flush()
        return self._mean

    @property
    def m2(self) -> torch.Tensor:
        self.flush()
        return self._m2

    def update(self, values: torch.Tensor, magnitude: bool = False) -> torch.Tensor:
        """Adds per-token values [s, b, c] (their magnitudes when ``magnitude``); returns the
        per-sample reduction [b, c]."""
        per_sample = reduce_sequence(values, self.agg.seq, magnitude)
        self.update_samples(per_sample)
        return per_sample

    def update_samples(self, per_sample: torch.Tensor) -> None:
        """Adds already reduced per-sample vectors [k, c] (k may be 0)."""
        if per_sample.shape[0]:
            self._pending.append(per_sample)
            self._pending_rows += per_sample.shape[0]
            if self._pending_rows >= self._limit:
                self.flush()

    def flush(self) -> None:
        """Merges the pending per-sample rows into the running state."""
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending.clear()
        self._pending_rows = 0
        self.merge(block.shape[0], block.mean(dim=0),
                   block.var(dim=0, unbiased=False) * block.shape[0])

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        self.flush()
        total = self._count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + delta.pow(2) * (self._count * count / total)
        self._count = total

    def all_merge(self, group=None) -> None:
        """Merges the states of every rank of ``group`` (in rank order) into each rank."""
        self.flush()
        if parallel.group_size(group) == 1:
            return
        packed = torch.cat([torch.tensor([float(self._count)], dtype=torch.float64,
                                         device=self._mean.device), self._mean, self._m2])
        parts: List[torch.Tensor] = parallel.all_gather(packed, group)
        channels = self._mean.numel()
        self._count, self._mean, self._m2 = (0, torch.zeros_like(self._mean),
                                             torch.zeros_like(self._m2))
        for part in parts:
            self.merge(int(part[0].item()), part[1:1 + channels], part[1 + channels:])

    def result(self) -> torch.Tensor:
        """Final scores [c] (float64)."""
        self.flush()
        if self._count == 0:
            return torch.zeros_like(self._mean)
        if self.agg.batch == "mean":
            return self._mean.clone()
        if self.agg.batch == "l2":
            return (self._m2 + self._count * self._mean.pow(2)).clamp_min(0).sqrt()
        return self._m2 / self._count
