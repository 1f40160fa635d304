"""ReAct's clipping threshold: ``np.percentile`` of all in-distribution activations, from two O(N)
selections instead of a sort."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._semantics import check_input, check_percentile
from .functional import _stats


def _order_statistic(flat: Tensor, index: int) -> tuple[float, float]:
    """(the value at ascending position ``index`` of ``flat`` ([1, N]), i.e. its (N - index)-th
    largest; the sum of every value)."""
    stats = _stats(flat, flat.shape[1] - index, None, None)
    return float(stats.threshold[0]), float(stats.total[0])


@torch.no_grad()
def react_threshold(activations: Tensor, percentile: float = 0.9) -> float:
    """The ``percentile``-th fraction of every value in ``activations``, as ReAct's fit computes it.

    Equal to ``float(np.percentile(activations.flatten().cpu().numpy(), percentile * 100))``
    (numpy's default, linear interpolation between the two neighbouring order statistics, in the
    activations' dtype) for float32 and float64 activations, NaN included; float16 and bfloat16
    activations are compared as float32. ``activations`` may have any shape and live on any device
    with an ash_ext kernel; the two order statistics are found by the selection kernel in O(N).

    :param activations: the in-distribution activations (any shape, at least one value)
    :param percentile: fraction in [0, 1] (pytorch-ood's ``ReAct.percentile``)
    """
    if not isinstance(activations, Tensor):
        raise TypeError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
    fraction = check_percentile(percentile)
    if activations.numel() == 0:
        raise ValueError("react_threshold needs at least one activation, got an empty tensor")
    flat = activations.detach().reshape(1, -1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    check_input(flat)
    count = flat.shape[1]
    # numpy's arithmetic, step by step: q = (100 p) / 100, the virtual index (N - 1) q, its floor
    # and fraction in float64, then the interpolation in the activations' dtype.
    quantile = np.true_divide(fraction * 100, 100)
    virtual_index = (count - 1) * quantile
    below = math.floor(virtual_index)
    if virtual_index >= count - 1:
        below = count - 1
    above = min(below + 1, count - 1)
    gamma = float(virtual_index - below)
    lower_value, total = _order_statistic(flat, below)
    upper_value = lower_value if above == below else _order_statistic(flat, above)[0]
    # numpy: any NaN makes the percentile NaN. The sum is NaN where there is one (or inf - inf).
    if math.isnan(total) and bool(torch.isnan(flat).any()):
        return math.nan
    dtype = np.float64 if flat.dtype == torch.float64 else np.float32
    lower = dtype(lower_value)
    upper = dtype(upper_value)
    difference = upper - lower
    if gamma >= 0.5:
        return float(upper - difference * (1 - gamma))
    return float(lower + difference * gamma)
