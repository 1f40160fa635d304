"""The family's references (pytorch-ood's functions when importable, else the same algorithms in
torch) and the functions timed for each case."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ... import fallback
from ..._semantics import kept_count
from ...functional import _lts_kept_counts, ash_s, lts_factor, scale, topk_stats
from ...percentile import react_threshold
from .. import impls as ash_impls
from ..impls import Implementation
from .cases import METHODS, SHAPING_METHODS, FamilyCase, clip_value, per_sample_percentiles

#: The implementations, in the order of the table and the CSV.
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "fallback", "ash_ext", "ash_ext_scalar_p", "roofline")


def as_maps(x: Tensor) -> Tensor:
    """``x`` as 4-D maps for pytorch-ood's 4-D-only functions: 2-D ``[B, C]`` as the free view ``[B, C, 1, 1]``."""
    return x if x.dim() == 4 else x.view(x.shape[0], -1, 1, 1)


def _torch_scale(x: Tensor, percentile: float) -> Tensor:
    # pytorch-ood 0.4.0's scale(), for any rank >= 2
    t = x.reshape(x.shape[0], -1)
    k = kept_count(t.shape[1], percentile)
    s1 = t.sum(dim=1)
    s2 = torch.topk(t, k, dim=1).values.sum(dim=1)
    return x * torch.exp(s1 / s2).view((-1,) + (1,) * (x.dim() - 1))


def _torch_lts(z: Tensor, p: float) -> Tensor:
    # pytorch-ood 0.4.0's LTS.scaling_factor
    z = z.relu()
    n = z.shape[1]
    k = max(1, n - round(n * (1 - p)))
    return (z.sum(dim=1) / z.topk(k, dim=1).values.sum(dim=1)).square()


def reference_functions() -> dict[str, Callable[..., Any]]:
    """``scale(x, p)``, ``ash_s(x, p)`` (4-D) and ``lts(z, p)``: pytorch-ood's, or their torch copies
    (:func:`_torch_scale`, :func:`ash_ext.reference.ash_s`, :func:`_torch_lts`) without it."""
    if ash_impls.pytorch_ood_version() is not None:
        from pytorch_ood.detector import LTS
        from pytorch_ood.detector import ash as ood_ash
        from pytorch_ood.detector import scale as ood_scale

        return {"scale": ood_scale.scale, "ash_s": ood_ash.ash_s, "lts": LTS.scaling_factor}
    from ... import reference

    return {"scale": _torch_scale, "ash_s": reference.ash_s, "lts": _torch_lts}


def topk_stats_reference(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(k-th largest, sum, sum of the k largest) of each sample, from a sorted ``torch.topk``."""
    flat = x.reshape(x.shape[0], -1)
    values = torch.topk(flat, k, dim=1).values
    if k == 0:
        threshold = torch.full((flat.shape[0],), math.nan, dtype=x.dtype, device=x.device)
    else:
        threshold = values[:, -1]
    return threshold, flat.sum(dim=1), values.sum(dim=1)


def per_sample_ash_s_reference(x: Tensor, percentiles: Tensor) -> Tensor:
    """ASH-S with one percentile per sample, vectorised in torch: see
    :data:`~ash_ext.bench.family.cases.REFERENCES` ``["per-sample"]``.

    ``k = n - round(n * p)`` per sample (``percentiles`` a ``[B]`` tensor on x's device). Which of
    equal values at the threshold is kept is up to ``torch.sort``.
    """
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    ks = n - torch.round(percentiles.to(torch.float64) * n).to(torch.int64)
    values, indices = torch.sort(flat, dim=1, descending=True)
    ranks_kept = torch.arange(n, device=x.device).unsqueeze(0) < ks.unsqueeze(1)
    mask = torch.zeros_like(ranks_kept).scatter_(1, indices, ranks_kept)
    s1 = flat.sum(dim=1)
    s2 = torch.where(ranks_kept, values, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    factor = torch.exp(s1 / s2).unsqueeze(1)
    return torch.where(mask, flat * factor, torch.zeros((), dtype=x.dtype, device=x.device)).view(x.shape)


def react_fit_reference(activations: Tensor, percentile: float) -> float:
    """pytorch-ood's ReAct fit: ``float(np.percentile(activations.numpy(), percentile * 100))``."""
    return float(np.percentile(activations.numpy(), percentile * 100))


def _lts_fallback(z: Tensor, p: float) -> Tensor:
    """:func:`ash_ext.lts_factor` on the pure-PyTorch fallback's statistics."""
    _, total, kept = fallback.topk_stats(z, _lts_kept_counts(z, p), 0.0, None)
    ratio = total / torch.where(kept == 0, torch.ones_like(kept), kept)
    return torch.where(kept == 0, torch.ones_like(ratio), ratio.square()).to(z.dtype)


def _topk_stats_fallback(x: Tensor, percentile: float) -> tuple[Tensor, Tensor, Tensor]:
    return fallback.topk_stats(x, kept_count(x[0].numel(), percentile))


def implementations(
    case: FamilyCase, device: torch.device | str, names: Sequence[str] = IMPLEMENTATIONS
) -> dict[str, Implementation]:
    """The functions timed for ``case``, by name (see :data:`IMPLEMENTATIONS`; each takes the input)."""
    device = torch.device(device)
    refs = reference_functions()
    p = case.percentile
    m = case.method
    fns: dict[str, Callable[[Tensor], object]] = {}
    if m == "scale":
        fns = {
            "reference": lambda x: refs["scale"](as_maps(x), p),
            "fallback": lambda x: fallback.scale(x, p),
            "ash_ext": lambda x: scale(x, p),
        }
    elif m == "react-ash":
        t = clip_value(case.spec.data)
        fns = {
            "reference": lambda x: refs["ash_s"](as_maps(x).clip(max=t), p),
            "fallback": lambda x: fallback.ash_s(x, p, clip=t),
            "ash_ext": lambda x: ash_s(x, p, clip=t),
        }
    elif m == "lts":
        fns = {
            "reference": lambda x: refs["lts"](x, p),
            "fallback": lambda x: _lts_fallback(x, p),
            "ash_ext": lambda x: lts_factor(x, p),
        }
    elif m == "topk-stats":
        k = kept_count(case.n, p)
        fns = {
            "reference": lambda x: topk_stats_reference(x, k),
            "fallback": lambda x: _topk_stats_fallback(x, p),
            "ash_ext": lambda x: topk_stats(x, p),
        }
    elif m == "per-sample":
        ps = per_sample_percentiles(case, device)
        fns = {
            "reference": lambda x: per_sample_ash_s_reference(x, ps),
            "fallback": lambda x: fallback.ash_s(x, ps),
            "ash_ext": lambda x: ash_s(x, ps),
            "ash_ext_scalar_p": lambda x: ash_s(x, p),
        }
    elif m == "react-fit":
        fns = {
            "reference": lambda x: react_fit_reference(x, p),
            "ash_ext": lambda x: react_threshold(x, p),
        }
    else:
        raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    fns["roofline"] = (lambda x: x.clone()) if m in SHAPING_METHODS else (lambda x: x.sum(dim=1))
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    return {name: Implementation(name, fns[name]) for name in IMPLEMENTATIONS if name in names and name in fns}
