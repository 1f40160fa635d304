"""What ``torch.jit.script`` compiles for the public shaping functions.

The eager bodies in :mod:`ash_ext.functional` call the compiled fast path and the fallback, which
TorchScript cannot compile; under scripting (``torch.jit.is_scripting()``, a constant there) each
public function runs :func:`scripted_shape` instead: the same k (``n - round(n * percentile)``,
half to even, as :func:`ash_ext._semantics.kept_count`; a ``[B]`` tensor of fractions as
``_percentile_tensor_k``), the same checks, and a call of the registered op, so a scripted model
holds ``ash_ext::ash`` nodes and runs wherever ash_ext's library is loaded (Python or C++).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor


def round_half_even(value: float) -> int:
    """``round(value)`` as Python rounds a float (half to even), written so TorchScript compiles it
    (its ``round`` rounds half away from zero)."""
    below = math.floor(value)
    fraction = value - below
    if fraction > 0.5 or (fraction == 0.5 and below % 2 == 1):
        return int(below) + 1
    return int(below)


def scripted_variant_code(variant: str) -> int:
    """The op's code for ``variant`` under the one spelling rule (``_semantics.name_key``)."""
    key = variant.strip().lower().replace("_", "-")
    if key == "ash-p":
        return 0
    if key == "ash-b":
        return 1
    if key == "ash-s":
        return 2
    if key == "scale":
        return 3
    raise ValueError("variant must be one of ash-p, ash-b, ash-s, scale (any case, '_' or '-'), got '" + variant + "'")


def scripted_shape(
    x: Tensor, percentile: Union[float, Tensor], variant_code: int, inplace: bool, clip: Optional[float]
) -> Tensor:
    """The public functions' semantics in TorchScript: checks, k, then ``ash_ext::ash`` / ``ash_``."""
    if x.dim() < 2:
        raise ValueError("ASH needs an input of at least 2 dimensions (batch, features...)")
    if not x.is_floating_point() or x.dtype not in [torch.float16, torch.bfloat16, torch.float32, torch.float64]:
        raise TypeError("ASH supports float16, bfloat16, float32 and float64 inputs")
    if clip is not None and math.isnan(clip):
        raise ValueError("clip must not be NaN")
    n = 1
    for size in x.shape[1:]:
        n *= size
    k = 0
    k_per_sample: Optional[Tensor] = None
    if isinstance(percentile, Tensor):
        if not percentile.is_floating_point():
            raise TypeError("percentile must be a float or a floating tensor of fractions")
        if percentile.dim() > 1 or (percentile.dim() == 1 and percentile.shape[0] != x.shape[0]):
            raise ValueError("percentile must be a number, a 0-d tensor or a [B] tensor with one fraction per sample")
        work = percentile.detach().to(torch.float64 if percentile.dtype == torch.float64 else torch.float32)
        work = work.to(x.device).expand(x.shape[0])
        valid = (work >= 0) & (work <= 1)
        if work.device.type == "cpu" and not bool(valid.all()):
            raise ValueError("every percentile must be a fraction in [0, 1]")
        ks = n - torch.round(torch.where(valid, work, torch.zeros_like(work)) * n).to(torch.int64)
        k_per_sample = torch.where(valid, ks, torch.full_like(ks, -1))
    else:
        if not (0.0 <= percentile <= 1.0):
            raise ValueError("percentile must be a fraction in [0, 1] (the fraction pruned)")
        k = n - round_half_even(n * percentile)
    if inplace:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("ASH with inplace=True is not differentiable and x requires grad")
        torch.ops.ash_ext.ash_(x, k, variant_code, k_per_sample, None, clip)
        return x
    return torch.ops.ash_ext.ash(x, k, variant_code, k_per_sample, None, clip)
