"""StreamingStat: per-sample rows merged in blocks give the batch statistics of all rows, however
the micro-batches fall against the blocks."""

import pytest
import torch

from megatron_minitron.importance import aggregation
from megatron_minitron.importance.aggregation import Aggregation, StreamingStat


def _reference(rows: torch.Tensor, batch: str) -> torch.Tensor:
    if batch == "mean":
        return rows.mean(dim=0)
    if batch == "l2":
        return rows.square().sum(dim=0).sqrt()
    return rows.var(dim=0, unbiased=False)


@pytest.mark.parametrize("pending_elements", [1, 7 * 5, 1 << 12])
@pytest.mark.parametrize("batch", ["mean", "l2", "var"])
def test_blocked_merges_equal_the_statistics_of_all_rows(monkeypatch, pending_elements, batch):
    monkeypatch.setattr(aggregation, "PENDING_ELEMENTS", pending_elements)
    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(23, 7, generator=generator, dtype=torch.float64) * 3 + 10)
    stat = StreamingStat(7, Aggregation(batch=batch))
    start = 0
    for size in (1, 4, 0, 5, 3, 4, 6):  # uneven micro-batches, one empty
        stat.update_samples(rows[start:start + size])
        start += size
        assert stat.count == start
    assert start == rows.shape[0]
    torch.testing.assert_close(stat.result(), _reference(rows, batch), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stat.mean, rows.mean(dim=0), rtol=1e-12, atol=1e-12)
    stat.update_samples(rows[:2])  # more after a read
    torch.testing.assert_close(stat.result(), _reference(torch.cat([rows, rows[:2]]), batch),
                               rtol=1e-12, atol=1e-12)


def test_update_reduces_the_sequence_and_pends():
    stat = StreamingStat(3, Aggregation())
    values = torch.randn(5, 2, 3)
    per_sample = stat.update(values, magnitude=True)
    torch.testing.assert_close(per_sample, values.abs().mean(dim=0).double())
    assert stat.count == 2 and stat._pending  # pending until read
    torch.testing.assert_close(stat.result(), per_sample.square().sum(dim=0).sqrt())
    assert not stat._pending
