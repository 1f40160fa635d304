"""The public shaping functions: argument checks, k, and the hand-off to the implementation that
serves the tensor (compiled CPU or CUDA kernel, or the pure-PyTorch fallback)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.compiler import is_dynamo_compiling

from . import fallback
from ._ops import FALLBACK, FAST_SHAPE, implementation_for
from ._semantics import (
    VARIANT_CODES,
    KeptCounts,
    Percentile,
    check_clip,
    check_fraction,
    check_inplace_allowed,
    check_input,
    check_variant,
    resolve_kept_counts,
)
from .scripting import scripted_shape, scripted_variant_code

# The variants' codes, for the public functions' fast path.
_ASH_P, _ASH_B, _ASH_S, _SCALE = (VARIANT_CODES[name] for name in ("ash-p", "ash-b", "ash-s", "scale"))


def _op_k(k: KeptCounts) -> tuple[int, Optional[Tensor]]:
    """The compiled op's (k, k_per_sample) arguments for ``k``."""
    return (0, k) if isinstance(k, Tensor) else (k, None)


def shape_with(
    x: Tensor,
    percentile: Percentile,
    variant: str,
    *,
    inplace: bool = False,
    clip: Optional[float] = None,
    force_fallback: bool = False,
) -> Tensor:
    """:func:`shape`, optionally forced onto the pure-PyTorch fallback (for comparisons)."""
    check_input(x)
    variant = check_variant(variant)
    clamp_max = check_clip(clip)
    k = resolve_kept_counts(x, percentile)
    use_fallback = force_fallback or implementation_for(x) == FALLBACK
    if inplace:
        check_inplace_allowed(x)
        if use_fallback:
            return fallback.shape_(x, k, variant, None, clamp_max)
        op_k, ks = _op_k(k)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            # Exporters get the out-of-place op and an aten copy_, which they functionalise (and
            # torch.onnx translates); the mutable op would reach torch.onnx's dynamo exporter as
            # auto_functionalized_v2, which it cannot translate, and the TorchScript exporter
            # would not see x change.
            return x.copy_(torch.ops.ash_ext.ash(x, op_k, VARIANT_CODES[variant], ks, None, clamp_max))
        torch.ops.ash_ext.ash_(x, op_k, VARIANT_CODES[variant], ks, None, clamp_max)
        return x
    if use_fallback:
        return fallback.shape(x, k, variant, None, clamp_max)
    op_k, ks = _op_k(k)
    return torch.ops.ash_ext.ash(x, op_k, VARIANT_CODES[variant], ks, None, clamp_max)


def _shape(
    x: Tensor, percentile: Percentile, variant: str, code: int, inplace: bool, clip: Optional[float]
) -> Tensor:
    """:func:`shape` with the variant's ``code``: the compiled fast path where it serves the call
    (a plain eager call, see ``FAST_SHAPE``), else the general path (checks, fallback, autograd).

    Dynamo (torch.compile, strict torch.export) traces the general path: ``is_dynamo_compiling()``
    is True there, so it never meets the opaque compiled call. The tracers that run this code
    eagerly (make_fx, non-strict export, AOTAutograd) pass fake or functional tensors or have a
    mode active, for which the fast path returns None; ``is_compiling()`` would cost twice as much.
    """
    if FAST_SHAPE is not None and not is_dynamo_compiling():
        out = FAST_SHAPE(x, percentile, code, clip, inplace)
        if out is not None:
            return out
    return shape_with(x, percentile, variant, inplace=inplace, clip=clip)


def shape(
    x: Tensor,
    percentile: Percentile = 0.65,
    variant: str = "ash-s",
    inplace: bool = False,
    clip: Optional[float] = None,
) -> Tensor:
    """Apply the shaping ``variant`` (``"ash-p"``, ``"ash-b"``, ``"ash-s"`` or ``"scale"``, in any case,
    ``_`` or ``-``) to ``x``.

    ``x`` is ``[B, ...]``: each of the B samples keeps its ``k = n - round(n * percentile)``
    largest values (n = values per sample); ASH zeroes the rest, SCALE only uses them for its
    factor. ``percentile`` is a number, a 0-d tensor, or a ``[B]`` tensor of fractions on x's
    device (one k per sample). ``clip`` (ReAct) clamps every value at ``clip`` first, in the same
    pass: the result equals ``shape(x.clamp(max=clip), ...)``. Out of place unless
    ``inplace=True``, which writes into ``x`` and returns it (not differentiable).
    """
    if torch.jit.is_scripting():
        return scripted_shape(x, percentile, scripted_variant_code(variant), inplace, clip)
    code = VARIANT_CODES.get(variant) if type(variant) is str else None
    if code is None:  # another spelling of a variant, or a ValueError naming the valid ones
        variant = check_variant(variant)
        code = VARIANT_CODES[variant]
    return _shape(x, percentile, variant, code, inplace, clip)


def ash_p(x: Tensor, percentile: Percentile = 0.65, inplace: bool = False, clip: Optional[float] = None) -> Tensor:
    """ASH-P: keep each sample's ``k`` largest values as they are and zero the rest.

    :param x: activations ``[B, ...]`` (float16, bfloat16, float32 or float64, rank >= 2)
    :param percentile: fraction of each sample's values that is pruned, in [0, 1]: a number, a
        0-d tensor or a ``[B]`` tensor (one per sample, on x's device)
    :param inplace: write the result into ``x`` and return ``x``
    :param clip: ReAct's threshold: values are clamped at ``clip`` before selection and sums
    """
    if torch.jit.is_scripting():
        return scripted_shape(x, percentile, scripted_variant_code("ash-p"), inplace, clip)
    return _shape(x, percentile, "ash-p", _ASH_P, inplace, clip)


def ash_b(x: Tensor, percentile: Percentile = 0.65, inplace: bool = False, clip: Optional[float] = None) -> Tensor:
    """ASH-B: set each sample's ``k`` largest values to ``s1 / k`` (s1: the sample's sum), zero the rest.

    Arguments as for :func:`ash_p`.
    """
    if torch.jit.is_scripting():
        return scripted_shape(x, percentile, scripted_variant_code("ash-b"), inplace, clip)
    return _shape(x, percentile, "ash-b", _ASH_B, inplace, clip)


def ash_s(x: Tensor, percentile: Percentile = 0.65, inplace: bool = False, clip: Optional[float] = None) -> Tensor:
    """ASH-S: scale each sample's ``k`` largest values by ``exp(s1 / s2)``, zero the rest.

    s1 is the sample's sum, s2 the sum of the kept values. Where s2 is 0 the reference's factor
    exp(s1 / 0) is 0 for s1 < 0 (kept: the output is zeros) and inf or NaN otherwise (replaced by 1).
    Arguments as for :func:`ash_p`.
    """
    if torch.jit.is_scripting():
        return scripted_shape(x, percentile, scripted_variant_code("ash-s"), inplace, clip)
    return _shape(x, percentile, "ash-s", _ASH_S, inplace, clip)


def scale(x: Tensor, percentile: Percentile = 0.65, inplace: bool = False, clip: Optional[float] = None) -> Tensor:
    """SCALE (Xu et al., ICLR 2024): ``x * exp(s1 / s2)`` per sample, nothing pruned.

    s1 is the sample's sum, s2 the sum of its ``k = n - round(n * percentile)`` largest values;
    the zero-s2 rule is ASH-S's. Equal to ``pytorch_ood.detector.scale.scale`` where that is
    finite. Arguments as for :func:`ash_p`.
    """
    if torch.jit.is_scripting():
        return scripted_shape(x, percentile, scripted_variant_code("scale"), inplace, clip)
    return _shape(x, percentile, "scale", _SCALE, inplace, clip)


class TopkStats(NamedTuple):
    """Per-sample statistics of the k largest values, each a ``[B]`` tensor on x's device."""

    #: the k-th largest value, in x's dtype (NaN where k == 0; -0.0 reads +0.0)
    threshold: Tensor
    #: s1, the sum of all values (float32, or float64 for float64 inputs)
    total: Tensor
    #: s2, the sum of the k largest values (same dtype as ``total``)
    kept: Tensor
    #: k, int64
    k: Tensor


def _stats(x: Tensor, k: KeptCounts, clamp_min: Optional[float], clamp_max: Optional[float]) -> TopkStats:
    if implementation_for(x) == FALLBACK:
        threshold, total, kept = fallback.topk_stats(x, k, clamp_min, clamp_max)
    else:
        op_k, ks = _op_k(k)
        threshold, total, kept = torch.ops.ash_ext.topk_stats(x, op_k, ks, clamp_min, clamp_max)
    counts = k if isinstance(k, Tensor) else torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
    return TopkStats(threshold, total, kept, counts)


@torch.no_grad()
def topk_stats(x: Tensor, percentile: Percentile = 0.65, *, clip: Optional[float] = None) -> TopkStats:
    """The per-sample numbers the family is built on, in one pass over ``x``: see :class:`TopkStats`.

    k, the tie rule, ``percentile`` and ``clip`` are as for :func:`shape`; the sums are the very
    ones ASH-S uses (``ash_s``'s factor is ``exp(total / kept)``, with its zero-s2 rule). Not
    differentiable (computed under ``no_grad``).
    """
    check_input(x)
    return _stats(x, resolve_kept_counts(x, percentile), None, check_clip(clip))


def _lts_kept_counts(z: Tensor, p: object) -> KeptCounts:
    """LTS's ``k = max(1, n - round(n * (1 - p)))`` (pytorch-ood's), for a number or a tensor p."""
    if isinstance(p, Tensor):
        k = resolve_kept_counts(z, 1 - p) if p.is_floating_point() else resolve_kept_counts(z, p)
        # An invalid fraction on an accelerator stays k = -1 (a NaN sample), not k = 1.
        return torch.where(k >= 0, k.clamp(min=1), k) if isinstance(k, Tensor) else max(1, k)
    return max(1, resolve_kept_counts(z, 1 - check_fraction("p", p)))


@torch.no_grad()
def lts_factor(z: Tensor, p: Percentile = 0.05) -> Tensor:
    """LTS's per-sample logit scale ``(sum relu(z) / sum of the top-k of relu(z))**2``, ``[B]`` in z's dtype.

    ``k = max(1, n - round(n * (1 - p)))`` as in pytorch-ood's ``LTS.scaling_factor``, which this
    equals where that is finite; ``relu(z)`` is never materialised (values are clamped at 0 inside
    the selection pass). A sample with no positive value (the reference's 0 / 0) gets the factor 1.
    """
    check_input(z)
    stats = _stats(z, _lts_kept_counts(z, p), 0.0, None)
    ratio = stats.total / torch.where(stats.kept == 0, torch.ones_like(stats.kept), stats.kept)
    factor = torch.where(stats.kept == 0, torch.ones_like(ratio), ratio.square())
    return factor.to(z.dtype)
