"""Codebook statistics: pure functions over code indices."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Counts of each code over all positions of `indices` (any shape) -> (K,) float64."""
    # The clamp keeps indices a NaN made (FSQ rounds its codes to integers) in range, so such a
    # model's evaluation reaches its NaN check instead of failing in bincount.
    flat = indices.reshape(-1).clamp(0, codebook_size - 1)
    return torch.bincount(flat, minlength=codebook_size).double()  # (K)


def perplexity(counts: Tensor) -> float:
    """exp of the entropy of code usage: K for a uniform histogram, 1 when one code takes all.

    Counted over a whole split this is the codebook perplexity the log watches; per batch it is
    capped by the batch's token count and biased low, so it is logged separately.
    """
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def perplexity_tensor(counts: Tensor) -> Tensor:
    """`perplexity` as a 0-dim tensor on the counts' device, with no host sync (NaN for no
    counts): the training loop sums it on the device."""
    p = counts / counts.sum()  # (K)
    return torch.exp(torch.special.entr(p).sum())


def usage(counts: Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((counts > 0).sum()) / counts.numel()


def dead_codes(counts: Tensor) -> int:
    """Codes never used."""
    return int((counts == 0).sum())
