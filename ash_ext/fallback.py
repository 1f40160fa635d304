"""Pure-PyTorch implementation of the ash_ext ops, with the same semantics as the kernels.

Used when the compiled module is missing, for devices without a kernel, and when
``ASH_EXT_FORCE_FALLBACK=1``. The selection is a stable descending sort of each sample: it keeps
exactly k values, and among values equal to the k-th largest the ones with the smallest logical
index -- the kernels' tie rule. ``torch.sort`` ranks NaN above +inf and treats -0.0 and +0.0 as
equal, as the kernels' keys do. Vectorised over the batch (k may differ per sample); autograd
flows through torch's ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._semantics import KeptCounts, sample_size


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are taken in: float64 for float64 inputs, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], sample_size(x))


def _counts(flat: Tensor, k: KeptCounts) -> Tensor:
    """k as an int64 ``[B]`` tensor on flat's device."""
    if isinstance(k, Tensor):
        return k.to(device=flat.device, dtype=torch.int64).expand(flat.shape[0])
    return torch.full((flat.shape[0],), k, dtype=torch.int64, device=flat.device)


def clamped(x: Tensor, clamp_min: Optional[float], clamp_max: Optional[float]) -> Tensor:
    """``x.clamp(clamp_min, clamp_max)``, or ``x`` itself when both are None."""
    if clamp_min is None and clamp_max is None:
        return x
    return x.clamp(min=clamp_min, max=clamp_max)


def _selection(flat: Tensor, ks: Tensor) -> tuple[Tensor, Tensor]:
    """(kept mask, descending sorted values) of each row; ks outside [0, n] keep nothing."""
    n = flat.shape[1]
    ordered = torch.sort(flat, dim=1, descending=True, stable=True)
    ranks_kept = torch.arange(n, device=flat.device).unsqueeze(0) < ks.unsqueeze(1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device).scatter(1, ordered.indices, ranks_kept)
    return mask, ordered.values


def kept_mask(x: Tensor, k: KeptCounts) -> Tensor:
    """Boolean mask of the values ASH keeps, shaped like ``x`` (batch first)."""
    flat = _flat(x)
    return _selection(flat, _counts(flat, k))[0].view(x.shape)


def _invalid(ks: Tensor, n: int) -> Tensor:
    """Samples whose k is outside [0, n] (only unchecked per-sample ks on accelerators)."""
    return (ks < 0) | (ks > n)


def scale_factor(s1: Tensor, s2: Tensor) -> Tensor:
    """exp(s1 / s2), and where s2 == 0 the kernels' rule: 0 for s1 < 0, else 1.

    The division is kept off the s2 == 0 branch so that its gradient stays finite.
    """
    degenerate = s2 == 0
    ratio = s1 / torch.where(degenerate, torch.ones_like(s2), s2)
    rule = torch.where(s1 < 0, torch.zeros_like(s1), torch.ones_like(s1))
    return torch.where(degenerate, rule, torch.exp(torch.where(degenerate, torch.zeros_like(ratio), ratio)))


def shape(
    x: Tensor,
    k: KeptCounts,
    variant: str,
    clamp_min: Optional[float] = None,
    clamp_max: Optional[float] = None,
) -> Tensor:
    """The shaping ``variant`` keeping ``k`` values per sample, out of place, in ``x``'s memory format."""
    source = clamped(x, clamp_min, clamp_max)
    flat = _flat(source)
    ks = _counts(flat, k)
    acc = accumulation_dtype(x.dtype)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mask, _ = _selection(flat, ks)
    if variant == "ash-p":
        result = torch.where(mask, flat, zero)
    elif variant == "ash-b":
        # k == 0 keeps nothing (no fill s1 / 0).
        fill = (flat.sum(dim=1, dtype=acc) / ks.clamp(min=1)).to(x.dtype)
        result = torch.where(mask, fill.unsqueeze(1), zero)
    elif variant in ("ash-s", "scale"):
        s1 = flat.sum(dim=1, dtype=acc)
        s2 = torch.where(mask, flat, zero).sum(dim=1, dtype=acc)
        factor = scale_factor(s1, s2).unsqueeze(1)
        scaled = (flat.to(acc) * factor).to(x.dtype)
        result = scaled if variant == "scale" else torch.where(mask, scaled, zero)
    else:
        raise ValueError(f"unknown shaping variant {variant!r}")
    result = torch.where(_invalid(ks, flat.shape[1]).unsqueeze(1), torch.full_like(result, float("nan")), result)
    # copy_ into empty_like(x) keeps x's memory format (channels_last stays channels_last) and is
    # differentiable.
    return torch.empty_like(x).copy_(result.view(x.shape))


def shape_(
    x: Tensor,
    k: KeptCounts,
    variant: str,
    clamp_min: Optional[float] = None,
    clamp_max: Optional[float] = None,
) -> Tensor:
    """In-place form of :func:`shape`: writes the result into ``x`` and returns ``x``."""
    with torch.no_grad():
        x.copy_(shape(x, k, variant, clamp_min, clamp_max))
    return x


def topk_stats(
    x: Tensor,
    k: KeptCounts,
    clamp_min: Optional[float] = None,
    clamp_max: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(threshold, total, kept) per sample, as ``torch.ops.ash_ext.topk_stats`` returns them."""
    flat = _flat(clamped(x, clamp_min, clamp_max))
    ks = _counts(flat, k)
    acc = accumulation_dtype(x.dtype)
    n = flat.shape[1]
    nan = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    if n == 0:
        empty = torch.zeros(flat.shape[0], dtype=acc, device=x.device)
        return nan.expand(flat.shape[0]).clone(), empty, empty.clone()
    mask, ordered = _selection(flat, ks)
    kth = ordered.gather(1, (ks - 1).clamp(0, n - 1).unsqueeze(1)).squeeze(1)
    # + 0.0 turns -0.0 into +0.0: the threshold is reported as its key's canonical value.
    threshold = torch.where((ks >= 1) & (ks <= n), kth + 0.0, nan)
    total = flat.sum(dim=1, dtype=acc)
    kept = torch.where(mask, flat, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1, dtype=acc)
    invalid = _invalid(ks, n)
    acc_nan = torch.tensor(float("nan"), dtype=acc, device=x.device)
    return threshold, torch.where(invalid, acc_nan, total), torch.where(invalid, acc_nan, kept)


def _public(variant: str):
    def apply(x: Tensor, percentile: object = 0.65, *, inplace: bool = False, clip: Optional[float] = None) -> Tensor:
        from .functional import shape_with

        return shape_with(x, percentile, variant, inplace=inplace, clip=clip, force_fallback=True)

    apply.__name__ = variant.replace("-", "_")
    apply.__doc__ = f"{variant.upper()} in pure PyTorch; same arguments and semantics as ``ash_ext.{apply.__name__}``."
    return apply


ash_p = _public("ash-p")
ash_b = _public("ash-b")
ash_s = _public("ash-s")
scale = _public("scale")
