"""Rank correlation of importance scores (no SciPy needed)."""

from __future__ import annotations

from typing import Dict

import torch

SCORE_KINDS = ("head", "query_group", "neuron", "channel", "layer_bi")
"""The importance score tensors compared across precisions and devices."""


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), float64."""
    flat = values.flatten().double()
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), dtype=torch.float64)
    sorted_values = flat[order].tolist()
    start = 0
    for end in range(1, flat.numel() + 1):  # average over runs of equal values
        if end == flat.numel() or sorted_values[end] != sorted_values[start]:
            if end - start > 1:
                ranks[order[start:end]] = (start + end - 1) / 2
            start = end
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (flattened)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return 1.0 if denom == 0 else float((ra * rb).sum()) / denom


def score_agreement(scores: Dict, reference: Dict) -> Dict[str, float]:
    """Spearman per score kind of ``scores`` against ``reference``."""
    return {kind: spearman(scores[kind], reference[kind]) for kind in SCORE_KINDS}
