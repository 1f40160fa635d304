"""The shaping family's semantics (notes/kernel_spec.md, csrc/ash.h) as plain PyTorch, in float64.

Written from the spec alone, independent of ash_ext.fallback, so that the emulated CUDA kernels
are checked against the rules rather than against another implementation of them:

* per-sample k: sample b keeps its k_b largest values, ties at the k_b-th largest going to the
  smallest logical indices (a stable descending sort; torch.sort ranks NaN above +inf and -0.0
  with +0.0); a k_b outside [0, n] makes every output value (and statistic) of that sample NaN;
* clamp: x.clamp(low, high) first (torch.clamp's rounding of the bounds, NaN kept), everywhere;
* ASH-S's and SCALE's factor: exp(s1 / s2), or where s2 == 0 the constant 0 (s1 < 0) or 1;
* SCALE: every value times the factor; its backward E g + E (G / s2) (1 - m s1 / s2), G over all;
* topk_stats: (k-th largest value with -0.0 read as +0.0, NaN for k == 0; s1; s2).
"""

from __future__ import annotations

import torch

VARIANT_IDS = {"ash-p": 0, "ash-b": 1, "ash-s": 2, "scale": 3}


def clamp(x: torch.Tensor, low, high) -> torch.Tensor:
    if low is None and high is None:
        return x
    return x.clamp(min=low, max=high)


def as_ks(x: torch.Tensor, ks) -> torch.Tensor:
    """ks as a [batch] int64 tensor on x's device (an int is every sample's k)."""
    if isinstance(ks, int):
        return torch.full((x.shape[0],), ks, dtype=torch.int64, device=x.device)
    return ks.to(device=x.device, dtype=torch.int64)


def kept_mask(flat: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """[batch, n] mask of the kept values of each row of `flat` (logical order)."""
    n = flat.shape[1]
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand_as(order).contiguous())
    return ranks < ks.clamp(0, n).unsqueeze(1)


def _selection(values: torch.Tensor, ks):
    """The samples of ``values`` as [batch, n] rows, n, the ks as a tensor and the kept mask."""
    flat = values.reshape(values.shape[0], -1)
    ks = as_ks(values, ks)
    return flat, flat.shape[1], ks, kept_mask(flat, ks)


def _sums(flat64: torch.Tensor, mask: torch.Tensor):
    zero = torch.zeros((), dtype=torch.float64)
    s1 = flat64.sum(1)
    s2 = torch.where(mask, flat64, zero).sum(1)
    return s1, s2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_factor(s1: torch.Tensor, s2: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """exp(s1 / s2) (0 or 1 where s2 == 0), rounded to `dtype`'s accumulation type, where the
    kernels form it: a factor beyond float32's range is inf there, as in the kernels."""
    degenerate = s2 == 0
    constant = torch.where(s1 < 0, torch.zeros_like(s1), torch.ones_like(s1))
    factor = torch.where(degenerate, constant, torch.exp(s1 / torch.where(degenerate, torch.ones_like(s2), s2)))
    return factor.to(accumulation_dtype(dtype)).double()


def _invalid(ks: torch.Tensor, n: int) -> torch.Tensor:
    return (ks < 0) | (ks > n)


def forward(x: torch.Tensor, ks, variant: str, low=None, high=None) -> torch.Tensor:
    """The op's output (x's dtype and memory format)."""
    flat, n, ks, mask = _selection(clamp(x, low, high), ks)
    flat64 = flat.double()
    s1, s2 = _sums(flat64, mask)
    zero = torch.zeros((), dtype=x.dtype)
    if variant == "ash-p":
        result = torch.where(mask, flat, zero)
    elif variant == "ash-b":
        fill = torch.where(ks > 0, s1 / ks.clamp(min=1).double(), torch.zeros_like(s1)).to(x.dtype)
        result = torch.where(mask, fill.unsqueeze(1), zero)
    elif variant == "ash-s":
        result = torch.where(mask, (flat64 * scale_factor(s1, s2, x.dtype).unsqueeze(1)).to(x.dtype), zero)
    elif variant == "scale":
        result = (flat64 * scale_factor(s1, s2, x.dtype).unsqueeze(1)).to(x.dtype)
    else:
        raise ValueError(variant)
    result = torch.where(_invalid(ks, n).unsqueeze(1), torch.full((), float("nan"), dtype=x.dtype), result)
    return torch.empty_like(x).copy_(result.view(x.shape))


def backward(grad: torch.Tensor, x: torch.Tensor, ks, variant: str) -> torch.Tensor:
    """d(op(x))/dx^T grad, the selection recomputed from x (never clamped here)."""
    xs, n, ks, mask = _selection(x, ks)
    x64 = xs.double()
    g64 = grad.reshape(x.shape[0], -1).double()
    s1, s2 = _sums(x64, mask)
    factor = scale_factor(s1, s2, x.dtype).unsqueeze(1)
    zero = torch.zeros((), dtype=torch.float64)
    degenerate = (s2 == 0).unsqueeze(1)
    safe_s2 = torch.where(s2 == 0, torch.ones_like(s2), s2).unsqueeze(1)
    s1 = s1.unsqueeze(1)
    if variant == "ash-p":
        result = torch.where(mask, g64, zero)
    elif variant == "ash-b":
        kept_g = torch.where(mask, g64, zero).sum(1, keepdim=True)
        result = torch.where((ks > 0).unsqueeze(1), kept_g / ks.clamp(min=1).double().unsqueeze(1), zero)
        result = result.expand_as(g64)
    elif variant == "ash-s":
        big_g = torch.where(mask, g64 * x64, zero).sum(1, keepdim=True)
        shaped = factor * (torch.where(mask, g64 - big_g * s1 / (safe_s2 * safe_s2), zero) + big_g / safe_s2)
        result = torch.where(degenerate, torch.where(mask, factor * g64, zero), shaped)
    elif variant == "scale":
        big_g = (g64 * x64).sum(1, keepdim=True)
        shaped = factor * (g64 - torch.where(mask, big_g * s1 / (safe_s2 * safe_s2), zero) + big_g / safe_s2)
        result = torch.where(degenerate, factor * g64, shaped)
    else:
        raise ValueError(variant)
    result = torch.where(_invalid(ks, n).unsqueeze(1), torch.full((), float("nan"), dtype=torch.float64), result)
    return torch.empty_like(x).copy_(result.view(x.shape).to(x.dtype))


def stats(x: torch.Tensor, ks, low=None, high=None):
    """(threshold in x's dtype, s1, s2 in float64) per sample."""
    flat, n, ks, mask = _selection(clamp(x, low, high), ks)
    s1, s2 = _sums(flat.double(), mask)
    ordered = torch.sort(flat, dim=1, descending=True, stable=True).values
    picked = ordered.gather(1, (ks.clamp(1, n) - 1).unsqueeze(1)).squeeze(1)
    picked = picked + torch.zeros((), dtype=x.dtype)  # -0.0 + 0.0 reads +0.0
    nan = torch.full((), float("nan"), dtype=x.dtype)
    threshold = torch.where((ks == 0) | _invalid(ks, n), nan, picked)
    nan64 = torch.full((), float("nan"), dtype=torch.float64)
    s1 = torch.where(_invalid(ks, n), nan64, s1)
    s2 = torch.where(_invalid(ks, n), nan64, s2)
    return threshold, s1, s2
