"""Loads the compiled kernels, registers what torch needs to trace and differentiate them, and
chooses which implementation serves a tensor."""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from ._semantics import check_writable_in_place

try:
    from . import _C  # noqa: F401  (importing registers the ash_ext ops with torch)

    EXTENSION_ERROR: Exception | None = None
except ImportError as error:  # built without the extension, or a broken build
    _C = None
    EXTENSION_ERROR = error

#: Set ``ASH_EXT_FORCE_FALLBACK=1`` to route every call to the pure-PyTorch implementation.
FORCE_FALLBACK_ENV = "ASH_EXT_FORCE_FALLBACK"
_FORCE_FALLBACK = os.environ.get(FORCE_FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")

CPU_KERNEL = "cpu-kernel"
CUDA_KERNEL = "cuda-kernel"
FALLBACK = "fallback"


def extension_loaded() -> bool:
    """Whether the compiled module ``ash_ext._C`` was imported."""
    return _C is not None


_COMPILED_WITH_CUDA = _C is not None and bool(_C.compiled_with_cuda())


def compiled_with_cuda() -> bool:
    """Whether the compiled module contains the CUDA kernels."""
    return _COMPILED_WITH_CUDA


#: The public functions' fast path in the compiled module (``shape`` in csrc/python_module.cpp):
#: ``FAST_SHAPE(x, percentile, variant_code, clip, inplace)`` runs a plain eager call (an ordinary
#: tensor, a float percentile, no clip or a float one, nothing to differentiate) with one C++ call
#: and returns None for every other call, which then takes the general path. None where every call
#: takes the general path (no compiled module, or ``ASH_EXT_FORCE_FALLBACK``).
FAST_SHAPE: Optional[Callable[[Tensor, object, int, object, bool], Optional[Tensor]]] = (
    None if _C is None or _FORCE_FALLBACK else _C.shape
)


def fallback_forced() -> bool:
    """Whether ``ASH_EXT_FORCE_FALLBACK`` was set when ash_ext was imported."""
    return _FORCE_FALLBACK


def implementation_for(x: Tensor) -> str:
    """Name the implementation that serves ``x``: ``"cpu-kernel"``, ``"cuda-kernel"`` or ``"fallback"``."""
    if _C is None or _FORCE_FALLBACK:
        return FALLBACK
    if x.device.type == "cpu":
        return CPU_KERNEL
    if x.device.type == "cuda" and _COMPILED_WITH_CUDA:
        return CUDA_KERNEL
    return FALLBACK


_INT64_MAX = 2**63 - 1


def _check_op_args(x, k, variant, k_per_sample, clamp_min, clamp_max, grad=None, inplace=False) -> None:
    """The argument checks of the op front end in csrc/ops.cpp (and of its kernels for non-strided
    tensors), mirrored for the fake and meta kernels below: the same order, exception types and
    messages, for everything knowable without reading data (the values in k_per_sample are
    checked by the CPU op alone). ``variant`` is None for topk_stats. Keep the two in step."""
    for name, t in (("the gradient", grad), ("the input", x), ("k_per_sample", k_per_sample)):
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"ash_ext: {name} must be a strided (dense) tensor, got layout {t.layout}")
    if x.dim() < 2:
        raise ValueError(
            "ash_ext: the input must have at least 2 dimensions (batch, features...), "
            f"got a {x.dim()}-D tensor of shape {list(x.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"ash_ext: the input must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if variant is not None and not 0 <= variant <= 3:
        raise ValueError(f"ash_ext: variant must be 0 (ASH-P), 1 (ASH-B), 2 (ASH-S) or 3 (SCALE), got {variant}")
    n = math.prod(x.shape[1:])
    if k_per_sample is not None:
        if k_per_sample.dtype != torch.int64:
            raise TypeError(f"ash_ext: k_per_sample must be int64, got {k_per_sample.dtype}")
        torch._check_with(
            ValueError,
            k_per_sample.dim() == 1 and k_per_sample.shape[0] == x.shape[0],
            f"ash_ext: k_per_sample must have shape [{x.shape[0]}] (one k per sample), got {list(k_per_sample.shape)}",
        )
        if k_per_sample.device != x.device:
            raise ValueError(f"ash_ext: k_per_sample is on {k_per_sample.device} but the input is on {x.device}")
    else:
        elements = n if n < _INT64_MAX else f"at least {_INT64_MAX}"
        message = (
            f"ash_ext: k (the number of values kept per sample) must be in [0, {min(n, _INT64_MAX)}] "
            f"for samples of {elements} elements, got {k}"
        )
        torch._check_with(ValueError, k >= 0, message)
        torch._check_with(ValueError, k <= n, message)
    if clamp_min is not None or clamp_max is not None:
        low = -math.inf if clamp_min is None else clamp_min
        high = math.inf if clamp_max is None else clamp_max
        if math.isnan(low) or math.isnan(high):
            raise ValueError(f"ash_ext: the clamp bounds must not be NaN, got [{low:g}, {high:g}]")
        if low > high:
            raise ValueError(f"ash_ext: clamp_min must not exceed clamp_max, got [{low:g}, {high:g}]")
    if inplace:
        check_writable_in_place(x)
    if grad is not None:
        torch._check_with(
            ValueError,
            grad.shape == x.shape,
            f"ash_ext: the gradient's shape {list(grad.shape)} differs from the input's {list(x.shape)}",
        )
        if grad.dtype != x.dtype:
            raise TypeError(f"ash_ext: the gradient's dtype {grad.dtype} differs from the input's {x.dtype}")
        if grad.device != x.device:
            raise ValueError(f"ash_ext: the gradient is on {grad.device} but the input is on {x.device}")


def _empty_like(x: Tensor) -> Tensor:
    """The op's output for x: empty_like(x), whose strides are x's for an empty x, as ATen's."""
    if x.numel() == 0:  # torch's Python empty_like would make them contiguous
        return x.new_empty_strided(x.shape, x.stride())
    return torch.empty_like(x)


if _C is not None:

    @torch.library.register_fake("ash_ext::ash")
    def _ash_fake(x, k, variant, k_per_sample=None, clamp_min=None, clamp_max=None) -> Tensor:
        _check_op_args(x, k, variant, k_per_sample, clamp_min, clamp_max)
        return _empty_like(x)

    @torch.library.register_fake("ash_ext::ash_")
    def _ash_inplace_fake(x, k, variant, k_per_sample=None, clamp_min=None, clamp_max=None) -> None:
        _check_op_args(x, k, variant, k_per_sample, clamp_min, clamp_max, inplace=True)
        return None

    @torch.library.register_fake("ash_ext::ash_backward")
    def _ash_backward_fake(grad, x, k, variant, k_per_sample=None) -> Tensor:
        _check_op_args(x, k, variant, k_per_sample, None, None, grad=grad)
        return _empty_like(x)

    @torch.library.register_fake("ash_ext::topk_stats")
    def _topk_stats_fake(x, k, k_per_sample=None, clamp_min=None, clamp_max=None):
        _check_op_args(x, k, None, k_per_sample, clamp_min, clamp_max)
        batch = x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (
            x.new_empty((batch,)),
            x.new_empty((batch,), dtype=acc),
            x.new_empty((batch,), dtype=acc),
        )

    def _setup_context(ctx, inputs, output) -> None:
        x, k, variant, k_per_sample, clamp_min, clamp_max = inputs
        # Only x (and the per-sample ks) are saved; the backward recomputes the selection from x.
        ctx.save_for_backward(x, k_per_sample)
        ctx.k = k
        ctx.variant = variant
        ctx.clamp = (clamp_min, clamp_max)

    def _backward(ctx, grad: Tensor):
        x, k_per_sample = ctx.saved_tensors
        clamp_min, clamp_max = ctx.clamp
        if clamp_min is None and clamp_max is None:
            grad_x = torch.ops.ash_ext.ash_backward(grad, x, ctx.k, ctx.variant, k_per_sample)
        else:
            # shape(clamp(x)): the kernel's gradient at the clamped x, then clamp's own gradient
            # (1 where clamp_min <= x <= clamp_max, as torch.clamp's backward).
            inside = torch.ones_like(x, dtype=torch.bool)
            if clamp_min is not None:
                inside &= x >= clamp_min
            if clamp_max is not None:
                inside &= x <= clamp_max
            x_clamped = x.clamp(clamp_min, clamp_max)
            grad_x = torch.ops.ash_ext.ash_backward(grad, x_clamped, ctx.k, ctx.variant, k_per_sample)
            grad_x = torch.where(inside, grad_x, torch.zeros((), dtype=grad_x.dtype, device=grad_x.device))
        return grad_x, None, None, None, None, None

    torch.library.register_autograd("ash_ext::ash", _backward, setup_context=_setup_context)
