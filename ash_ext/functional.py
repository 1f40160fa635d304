"""The public ASH functions: argument checks, k, and the hand-off to the implementation that
serves the tensor (compiled CPU or CUDA kernel, or the pure-PyTorch fallback)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import fallback
from ._ops import FALLBACK, implementation_for
from ._semantics import (
    VARIANT_CODES,
    check_inplace_allowed,
    check_input,
    check_percentile,
    check_variant,
    kept_count,
    sample_size,
)


def shape(x: Tensor, percentile: float = 0.65, variant: str = "ash-s", *, inplace: bool = False) -> Tensor:
    """Apply the ASH ``variant`` (``"ash-p"``, ``"ash-b"`` or ``"ash-s"``) to ``x``.

    ``x`` is ``[B, ...]``: each of the B samples keeps its ``k = n - round(n * percentile)``
    largest values (n = values per sample); the rest become zero. Out of place unless
    ``inplace=True``, which writes into ``x`` and returns it (not differentiable).
    """
    check_input(x)
    check_variant(variant)
    k = kept_count(sample_size(x), check_percentile(percentile))
    use_fallback = implementation_for(x) == FALLBACK
    if inplace:
        check_inplace_allowed(x)
        if use_fallback:
            return fallback.shape_(x, k, variant)
        torch.ops.ash_ext.ash_(x, k, VARIANT_CODES[variant])
        return x
    if use_fallback:
        return fallback.shape(x, k, variant)
    return torch.ops.ash_ext.ash(x, k, VARIANT_CODES[variant])


def ash_p(x: Tensor, percentile: float = 0.65, *, inplace: bool = False) -> Tensor:
    """ASH-P: keep each sample's ``k`` largest values as they are and zero the rest.

    :param x: activations ``[B, ...]`` (float16, bfloat16, float32 or float64, rank >= 2)
    :param percentile: fraction of each sample's values that is pruned, in [0, 1]
    :param inplace: write the result into ``x`` and return ``x``
    """
    return shape(x, percentile, "ash-p", inplace=inplace)


def ash_b(x: Tensor, percentile: float = 0.65, *, inplace: bool = False) -> Tensor:
    """ASH-B: set each sample's ``k`` largest values to ``s1 / k`` (s1: the sample's sum), zero the rest.

    Arguments as for :func:`ash_p`.
    """
    return shape(x, percentile, "ash-b", inplace=inplace)


def ash_s(x: Tensor, percentile: float = 0.65, *, inplace: bool = False) -> Tensor:
    """ASH-S: scale each sample's ``k`` largest values by ``exp(s1 / s2)``, zero the rest.

    s1 is the sample's sum, s2 the sum of the kept values; where s2 is 0 the factor is 1.
    Arguments as for :func:`ash_p`.
    """
    return shape(x, percentile, "ash-s", inplace=inplace)
