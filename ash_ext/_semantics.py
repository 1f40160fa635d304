"""The one place that holds ASH's semantics for every backend: how many values are kept, which
inputs are accepted, and the variants' names.

The tie rule and the edge cases the kernels implement are written down in ``csrc/ash_semantics.h``
(shared by the C++ and CUDA kernels) and mirrored by :mod:`ash_ext.fallback`; the README states
them for users.
"""

from __future__ import annotations

import math
import numbers

import torch

#: Variant names, as pytorch-ood spells them, and the codes the compiled op takes.
VARIANT_CODES: dict[str, int] = {"ash-p": 0, "ash-b": 1, "ash-s": 2}

#: Floating dtypes every backend supports.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_percentile(percentile: object) -> float:
    """Return ``percentile`` as a float after checking that it is a finite fraction in [0, 1].

    Raises ``TypeError`` for non-numbers (bool included) and ``ValueError`` for values outside
    [0, 1], NaN and infinities; values that look like percents get a hint.
    """
    # type(...) is float first: the ABC check below costs a microsecond per call.
    if type(percentile) is not float and (isinstance(percentile, bool) or not isinstance(percentile, numbers.Real)):
        raise TypeError(
            f"percentile must be a real number in [0, 1], got {percentile!r} of type {type(percentile).__name__}"
        )
    value = float(percentile)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = f"; use {value / 100:g} instead of {value:g}" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"percentile must be a fraction in [0, 1] (the fraction pruned), got {percentile!r}{hint}")
    return value


def check_variant(variant: object) -> str:
    """Return ``variant`` if it names an ASH variant, else raise ``ValueError`` naming it."""
    if not isinstance(variant, str) or variant not in VARIANT_CODES:
        raise ValueError(f"variant must be one of {sorted(VARIANT_CODES)}, got {variant!r}")
    return variant


def check_input(x: object) -> torch.Tensor:
    """Return ``x`` after checking it is a floating tensor of rank >= 2 in a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ASH expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ASH supports float16, bfloat16, float32 and float64 inputs, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            "ASH needs an input of at least 2 dimensions (batch, features...), "
            f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    return x


def sample_size(x: torch.Tensor) -> int:
    """Number of values per sample: the product of all dimensions but the first."""
    return math.prod(x.shape[1:])


def kept_count(n: int, percentile: float) -> int:
    """``k = n - round(n * percentile)``: how many of a sample's ``n`` values ASH keeps.

    The product is a double and is rounded half to even, exactly as the reference's
    ``int(np.round(n * percentile))`` (Python's ``round`` on a float does the same).
    """
    return n - int(round(n * percentile))


def check_inplace_allowed(x: torch.Tensor) -> None:
    """Raise ``RuntimeError`` if writing ASH's result into ``x`` would bypass autograd."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "ASH with inplace=True is not differentiable and x requires grad; use inplace=False "
            "or run under torch.no_grad()"
        )
