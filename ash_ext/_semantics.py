"""The one place that holds the shaping family's semantics for every backend: how many values are
kept (from a float, a 0-d or a per-sample percentile tensor), which inputs and clip values are
accepted, and the variants' names.

The tie rule and the edge cases the kernels implement are written down in ``csrc/ash_semantics.h``
(shared by the C++ and CUDA kernels) and mirrored by :mod:`ash_ext.fallback`; the README states
them for users.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

#: Variant names, as pytorch-ood spells them, and the codes the compiled op takes ("scale" is
#: SCALE: ASH-S's factor on every value, nothing pruned).
VARIANT_CODES: dict[str, int] = {"ash-p": 0, "ash-b": 1, "ash-s": 2, "scale": 3}

#: What a percentile may be: a number, a 0-d tensor, or a ``[B]`` tensor (one per sample).
Percentile = Union[float, torch.Tensor]

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


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` (a real number or a 0-d floating tensor) as a float in [0, 1].

    ``TypeError`` for other types (bool, strings, lists, complex, tensors with elements other
    than one), ``ValueError`` for values outside [0, 1], NaN and infinities, naming the value.
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a real number or a 0-d floating tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        value = float(value)
    if name == "percentile":
        return check_percentile(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r} of type {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        hint = f"; use {number / 100:g} instead of {number:g}" if 1.0 < number <= 100.0 else ""
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}{hint}")
    return number


def name_key(name: str) -> str:
    """The spelling rule for every name ash_ext accepts (variants, shaping methods, bench methods):
    case and surrounding spaces are ignored and ``_`` reads as ``-``, so ``"ash-s"`` (pytorch-ood's
    spelling), ``"ASH-S"`` and ``"ash_s"`` are one name."""
    return name.strip().lower().replace("_", "-")


def canonical_name(kind: str, name: object, valid: Iterable[str]) -> str:
    """``name`` in its canonical spelling (the one in ``valid``) under :func:`name_key`'s rule.

    Raises ``ValueError`` naming ``kind``, the bad value and the valid names.
    """
    names = tuple(valid)
    if isinstance(name, str):
        key = name_key(name)
        if key in names:
            return key
    raise ValueError(f"{kind} must be one of {', '.join(names)} (any case, '_' or '-'), got {name!r}")


def check_variant(variant: object) -> str:
    """Return the canonical spelling of the ASH/SCALE variant ``variant`` (see :func:`name_key`),
    else raise ``ValueError`` naming it and the valid names."""
    if type(variant) is str and variant in VARIANT_CODES:  # the common case, already canonical
        return variant
    return canonical_name("variant", variant, VARIANT_CODES)


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
    """Number of values per sample: the product of all dimensions but the first.

    Under ``torch.jit.trace`` the sizes are traced values; k is computed on the host from n, so
    the trace is specialised to the traced sample size (the batch may still vary), as documented.
    """
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return math.prod(int(size) for size in x.shape[1:])
    return math.prod(x.shape[1:])


def kept_count(n: int, percentile: float) -> int:
    """``k = n - round(n * percentile)``: how many of a sample's ``n`` values ASH keeps.

    The product is a double and is rounded half to even, exactly as the reference's
    ``int(np.round(n * percentile))`` (Python's ``round`` on a float does the same).
    """
    return n - int(round(n * percentile))


def check_writable_in_place(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x``'s elements provably do not share memory (as
    ``provably_non_overlapping`` in csrc/ops.cpp, with its message): each stride, in increasing
    order, must step past the span of the dimensions before it."""
    if x.numel() == 0:
        return
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= span:
            raise ValueError(
                "ash_ext: inplace=True needs an input whose elements do not share memory, got sizes "
                f"{list(x.shape)} and strides {list(x.stride())} (an expanded or overlapping view cannot be "
                "written in place); use inplace=False"
            )
        span += (size - 1) * stride


def check_inplace_allowed(x: torch.Tensor) -> None:
    """Raise ``RuntimeError`` if writing ASH's result into ``x`` would bypass autograd, and
    ``ValueError`` if elements of ``x`` share memory (every implementation, the fallback too)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "ASH with inplace=True is not differentiable and x requires grad; use inplace=False "
            "or run under torch.no_grad()"
        )
    check_writable_in_place(x)


def check_clip(clip: object) -> Optional[float]:
    """Return ``clip`` (ReAct's upper bound) as a float, or None; NaN and non-numbers raise."""
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise TypeError(f"clip must be a real number or None, got {clip!r} of type {type(clip).__name__}")
    value = float(clip)
    if math.isnan(value):
        raise ValueError(f"clip must not be NaN, got {clip!r}")
    return value


#: Per-sample ks: an int (every sample) or an int64 ``[B]`` tensor on x's device.
KeptCounts = Union[int, torch.Tensor]


def _percentile_tensor_k(x: torch.Tensor, n: int, percentile: torch.Tensor, name: str) -> KeptCounts:
    """k from a percentile tensor: ``n - round(n * p)`` in p's own precision (float32 at least).

    The product is taken in the tensor's dtype, as the reference's ``n * percentile`` is for a
    tensor (16-bit tensors are widened to float32, where their product could overflow), and
    rounded half to even (``torch.round``, as ``np.round``).
    """
    if not percentile.is_floating_point():
        raise TypeError(
            f"{name} must be a float or a floating tensor of fractions, got a tensor of dtype {percentile.dtype}"
        )
    batch = x.shape[0]
    if percentile.dim() == 0 and (percentile.device.type == "cpu" or percentile.device != x.device):
        # A 0-d CPU tensor: one k for every sample, found on the host (no synchronisation).
        if percentile.device.type != "cpu":
            raise ValueError(f"{name} is a 0-d tensor on {percentile.device} but x is on {x.device}")
        value = float(percentile)
        check_fraction(name, value)
        work = percentile.detach().to(torch.float64 if percentile.dtype == torch.float64 else torch.float32)
        return n - int(torch.round(work * n))
    if percentile.dim() not in (0, 1) or (percentile.dim() == 1 and percentile.shape[0] != batch):
        raise ValueError(
            f"{name} must be a number, a 0-d tensor or a [B] tensor with one fraction per sample "
            f"(B = {batch}), got a tensor of shape {tuple(percentile.shape)}"
        )
    if percentile.device != x.device:
        raise ValueError(f"a per-sample {name} must be on x's device ({x.device}), got one on {percentile.device}")
    work = percentile.detach().to(torch.float64 if percentile.dtype == torch.float64 else torch.float32)
    work = work.expand(batch)
    valid = (work >= 0) & (work <= 1)  # NaN fails both
    if work.device.type == "cpu" and not torch.compiler.is_compiling():
        # (Under torch.compile the check would be data-dependent: there, as on accelerators, an
        # invalid fraction becomes k = -1, which the CPU op itself then refuses.)
        if not bool(valid.all()):
            bad = int((~valid).nonzero()[0, 0])
            raise ValueError(
                f"every {name} must be a fraction in [0, 1], got {float(work[bad])!r} for sample {bad}"
            )
        return n - torch.round(work * n).to(torch.int64)
    # On an accelerator the values are not checked here (that would wait for the device): an
    # invalid fraction gives k = -1, and the CUDA kernels fill that sample with NaN.
    ks = n - torch.round(torch.where(valid, work, 0.0) * n).to(torch.int64)
    return torch.where(valid, ks, -1)


def resolve_kept_counts(x: torch.Tensor, percentile: object) -> KeptCounts:
    """k for every sample of ``x`` from ``percentile`` (the fraction pruned).

    A number gives one int k (:func:`kept_count`); a 0-d CPU tensor too; a ``[B]`` tensor (or a 0-d
    tensor on x's accelerator) gives an int64 ``[B]`` tensor on x's device, computed there without a
    host synchronisation.
    """
    n = sample_size(x)
    if isinstance(percentile, torch.Tensor):
        return _percentile_tensor_k(x, n, percentile, "percentile")
    return kept_count(n, check_percentile(percentile))
