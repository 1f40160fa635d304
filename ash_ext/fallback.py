"""Pure-PyTorch implementation of the ash_ext op, with the same semantics as the kernels.

Used when the compiled module is missing, for devices without a kernel, and when
``ASH_EXT_FORCE_FALLBACK=1``. The selection is a stable descending sort of each sample: it keeps
exactly k values, and among values equal to the k-th largest the ones with the smallest logical
index -- the kernels' tie rule. ``torch.sort`` ranks NaN above +inf and treats -0.0 and +0.0 as
equal, as the kernels' keys do. Vectorised over the batch; autograd flows through torch's ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._semantics import check_inplace_allowed, check_input, check_percentile, kept_count, sample_size


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the values ASH keeps, shaped like ``x`` (batch first)."""
    flat = x.reshape(x.shape[0], sample_size(x))
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=x.device)
    if k > 0:
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask.view(x.shape)


def shape(x: Tensor, k: int, variant: str) -> Tensor:
    """ASH ``variant`` keeping ``k`` values per sample, out of place, in ``x``'s memory format."""
    flat = x.reshape(x.shape[0], sample_size(x))
    acc = _accumulation_dtype(x.dtype)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mask = kept_mask(flat, k)
    if k == 0 or variant == "ash-p":
        # k == 0 keeps nothing in every variant (no fill s1/0, no factor from 0/0).
        result = torch.where(mask, flat, zero)
    elif variant == "ash-b":
        fill = (flat.sum(dim=1, dtype=acc) / k).to(x.dtype)
        result = torch.where(mask, fill.unsqueeze(1), zero)
    elif variant == "ash-s":
        s1 = flat.sum(dim=1, dtype=acc)
        s2 = torch.where(mask, flat, zero).sum(dim=1, dtype=acc)
        # A kept sum of zero gives the factor 1 (the kernels' rule); the division is kept off
        # that branch so its gradient stays finite.
        degenerate = s2 == 0
        ratio = torch.where(degenerate, torch.zeros_like(s1), s1 / torch.where(degenerate, torch.ones_like(s2), s2))
        factor = torch.exp(ratio).unsqueeze(1)
        result = torch.where(mask, (flat.to(acc) * factor).to(x.dtype), zero)
    else:
        raise ValueError(f"unknown ASH variant {variant!r}")
    # copy_ into empty_like(x) keeps x's memory format (channels_last stays channels_last) and is
    # differentiable.
    return torch.empty_like(x).copy_(result.view(x.shape))


def shape_(x: Tensor, k: int, variant: str) -> Tensor:
    """In-place form of :func:`shape`: writes the result into ``x`` and returns ``x``."""
    with torch.no_grad():
        x.copy_(shape(x, k, variant))
    return x


def _public(variant: str):
    def apply(x: Tensor, percentile: float = 0.65, *, inplace: bool = False) -> Tensor:
        check_input(x)
        k = kept_count(sample_size(x), check_percentile(percentile))
        if inplace:
            check_inplace_allowed(x)
            return shape_(x, k, variant)
        return shape(x, k, variant)

    apply.__name__ = variant.replace("-", "_")
    apply.__doc__ = f"{variant.upper()} in pure PyTorch; same arguments and semantics as ``ash_ext.{apply.__name__}``."
    return apply


ash_p = _public("ash-p")
ash_b = _public("ash-b")
ash_s = _public("ash-s")
