"""The reference algorithm of pytorch-ood's ASH, re-implemented for parity tests and benchmarks.

It is the reference's own method -- a sorted ``torch.topk`` of each sample, then ``scatter_`` --
generalised from 4-D maps to any rank >= 2. The ``*_inplace`` functions work in place, as
pytorch-ood 0.3.3 does; the others leave the input alone, as pytorch-ood 0.4.0 does. Which of
several equal values ``torch.topk`` keeps is up to torch, so on data with ties at the threshold
this may keep other positions than ash_ext's documented tie rule.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._semantics import kept_count, sample_size


def _topk(t: Tensor, percentile: float) -> tuple[Tensor, Tensor, int]:
    k = kept_count(t.shape[1], percentile)
    values, indices = torch.topk(t, k, dim=1)
    return values, indices, k


def _prune(x: Tensor, percentile: float, fill: Optional[Tensor] = None) -> Tensor:
    t = x.reshape(x.shape[0], sample_size(x))
    values, indices, k = _topk(t, percentile)
    if fill is not None:
        values = (fill / k).unsqueeze(1).expand(values.shape)
    return torch.zeros_like(t).scatter_(1, indices, values).view(x.shape)


def _sample_sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def ash_p(x: Tensor, percentile: float = 0.65) -> Tensor:
    """ASH-P by topk + scatter, out of place."""
    return _prune(x, percentile)


def ash_b(x: Tensor, percentile: float = 0.65) -> Tensor:
    """ASH-B by topk + scatter, out of place."""
    return _prune(x, percentile, fill=_sample_sum(x))


def ash_s(x: Tensor, percentile: float = 0.65) -> Tensor:
    """ASH-S by topk + scatter, out of place."""
    s1 = _sample_sum(x)
    pruned = _prune(x, percentile)
    s2 = _sample_sum(pruned)
    scale = (s1 / s2).view((-1,) + (1,) * (x.dim() - 1))
    return pruned * torch.exp(scale)


def _flat_view(x: Tensor) -> Tensor:
    return x.view(x.shape[0], sample_size(x))


def ash_p_inplace(x: Tensor, percentile: float = 0.65) -> Tensor:
    """ASH-P as pytorch-ood 0.3.3 does it: topk, then zero_ and scatter_ into ``x``."""
    t = _flat_view(x)
    values, indices, _ = _topk(t, percentile)
    t.zero_().scatter_(1, indices, values)
    return x


def ash_b_inplace(x: Tensor, percentile: float = 0.65) -> Tensor:
    """ASH-B as pytorch-ood 0.3.3 does it, in place."""
    t = _flat_view(x)
    s1 = t.sum(dim=1)
    values, indices, k = _topk(t, percentile)
    fill = (s1 / k).unsqueeze(1).expand(values.shape)
    t.zero_().scatter_(1, indices, fill)
    return x


def ash_s_inplace(x: Tensor, percentile: float = 0.65) -> Tensor:
    """ASH-S as pytorch-ood 0.3.3 does it: prunes ``x`` in place, returns the rescaled copy."""
    t = _flat_view(x)
    s1 = t.sum(dim=1)
    values, indices, _ = _topk(t, percentile)
    t.zero_().scatter_(1, indices, values)
    s2 = t.sum(dim=1)
    scale = (s1 / s2).view((-1,) + (1,) * (x.dim() - 1))
    return x * torch.exp(scale)
