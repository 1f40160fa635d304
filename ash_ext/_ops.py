"""Loads the compiled kernels, registers what torch needs to trace and differentiate them, and
chooses which implementation serves a tensor."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

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


if _C is not None:

    @torch.library.register_fake("ash_ext::ash")
    def _ash_fake(x, k, variant, k_per_sample=None, clamp_min=None, clamp_max=None) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("ash_ext::ash_")
    def _ash_inplace_fake(x, k, variant, k_per_sample=None, clamp_min=None, clamp_max=None) -> None:
        return None

    @torch.library.register_fake("ash_ext::ash_backward")
    def _ash_backward_fake(grad, x, k, variant, k_per_sample=None) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("ash_ext::topk_stats")
    def _topk_stats_fake(x, k, k_per_sample=None, clamp_min=None, clamp_max=None):
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
