"""``ash-ext bench --methods family``: the rest of the shaping family against its references.

Each method is timed against the function its users call today, in one process and interleaved
round-robin on rotating inputs, with :mod:`ash_ext.bench`'s timer, rotations and warm-up rules:

=============  ==============================================  ==============================================
method         ash_ext                                         reference
=============  ==============================================  ==============================================
``scale``      ``ash_ext.scale(x, p)``                         ``pytorch_ood.detector.scale.scale(x, p)``
``react-ash``  ``ash_ext.ash_s(x, p, clip=t)``                 ``pytorch_ood.detector.ash.ash_s(x.clip(max=t), p)``
``lts``        ``ash_ext.lts_factor(z, p)``                    ``pytorch_ood.detector.LTS.scaling_factor(z, p)``
``topk-stats`` ``ash_ext.topk_stats(x, p)``                    ``torch.topk`` of each sample, its last value and
                                                               the sums of the sample and of the top k
``per-sample`` ``ash_ext.ash_s(x, ps)``, ``ps`` a ``[B]``      ASH-S with one k per sample from one
               tensor of fractions                             ``torch.sort`` of the batch, a rank mask
                                                               ``scatter``-ed back and ``torch.where`` (no
                                                               loop; pytorch-ood takes one percentile only)
``react-fit``  ``ash_ext.react_threshold(acts, p)``            ``float(np.percentile(acts.numpy(), 100 p))``,
                                                               ReAct's fit in pytorch-ood
=============  ==============================================  ==============================================

2-D inputs go to pytorch-ood's 4-D-only functions as the free view ``[B, C, 1, 1]``. Without
pytorch-ood the same algorithms in torch (copied from pytorch-ood 0.4.0) stand in, and the results
say so. Beside the reference and ash_ext each case times ash_ext's pure-PyTorch fallback (not for
``react-fit``, whose fallback sorts all N values) and a roofline: ``x.clone()`` (one read and one
write) for the methods that return a tensor like ``x``, ``x.sum(dim=1)`` (one read) for those that
return statistics. ``per-sample`` also times ``ash_ext.ash_s`` with one float percentile on the
same data, to show what the ``[B]`` tensor costs.

Every case records ash_ext's deviation from the reference on an input where the result is unique
(the k largest values of each sample raised by 1.0, as in :mod:`ash_ext.bench`; for ``react-ash`` a
clip value above every sample's k-th largest value, so the clipped values are all kept), and flags
it when it exceeds :func:`ash_ext.bench.deviation_tolerance`, so that a fast wrong result cannot hide.

ReAct's clip value in the timed ``react-ash`` cases is the 0.9-quantile of the data's distribution
(the ReAct paper's percentile). LTS runs at its default ``p = 0.05`` and ReAct's fit at 0.9;
``--percentiles`` sets the others' ASH percentile (per-sample: ``[B]`` fractions spread evenly over
``p - 0.05 .. p + 0.05``).
"""

from __future__ import annotations

import datetime
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from . import bench, fallback
from ._ops import implementation_for
from ._semantics import kept_count
from .functional import _lts_kept_counts, ash_s, lts_factor, scale, topk_stats
from .percentile import react_threshold

# --------------------------------------------------------------------------------------------
# Methods, shapes and cases
# --------------------------------------------------------------------------------------------

#: The family's methods, in the order of the table (``ash``, the ASH variants, is :mod:`ash_ext.bench`'s).
METHODS: tuple[str, ...] = ("scale", "react-ash", "lts", "topk-stats", "per-sample", "react-fit")

#: ``--methods`` groups.
METHOD_GROUPS: dict[str, tuple[str, ...]] = {"family": METHODS, "all": ("ash", *METHODS)}

#: What each method's reference is, written into the results and the table.
REFERENCES: dict[str, str] = {
    "scale": "pytorch_ood.detector.scale.scale(x, p)",
    "react-ash": "pytorch_ood.detector.ash.ash_s(x.clip(max=t), p)",
    "lts": "pytorch_ood.detector.LTS.scaling_factor(z, p)",
    "topk-stats": "torch.topk(x, k).values: its last column, x.sum(1) and its sum(1)",
    "per-sample": (
        "ASH-S with one k per sample, loop-free in torch: torch.sort of each row (descending), ranks < k "
        "scattered back into a mask, s1 / s2 from the row and the masked sorted values, torch.where"
    ),
    "react-fit": "float(np.percentile(acts.numpy(), 100 * p)) (pytorch-ood's ReAct fit)",
}

#: Short names of the references for the table.
REFERENCE_LABELS: dict[str, str] = {
    "scale": "pytorch-ood scale",
    "react-ash": "clip + pytorch-ood ash_s",
    "lts": "pytorch-ood LTS",
    "topk-stats": "torch.topk + sums",
    "per-sample": "torch.sort + scatter",
    "react-fit": "np.percentile",
}

#: Methods whose output is a tensor like x (roofline: x.clone()); the others return statistics (x.sum(dim=1)).
SHAPING_METHODS: frozenset[str] = frozenset({"scale", "react-ash", "per-sample"})

#: The family's per-sample shapes: :data:`ash_ext.bench.SHAPES` and ResNet-18's pooled features.
SHAPES: dict[str, bench.ShapeSpec] = {
    **bench.SHAPES,
    "resnet18-pooled": bench.ShapeSpec("resnet18-pooled", (512,), "ResNet-18 pooled features (ImageNet)", "abs"),
}

#: ``(shape, batch sizes)`` of each method on a CPU, default and ``--quick``. For ``react-fit`` the
#: batch is the number of in-distribution samples whose features are pooled into one fit
#: (25000 x 2048 = 51.2M values; ImageNet-val's 50000 x 2048 is 102.4M).
DEFAULT_PLAN: dict[str, dict[str, tuple[int, ...]]] = {
    "scale": {"resnet50-pooled": (1, 64, 256), "resnet50-l4": (1, 16), "vit-b16-cls": (256,)},
    "react-ash": {"resnet50-pooled": (64, 256), "resnet50-l4": (1, 16)},
    "lts": {"resnet50-pooled": (1, 256), "resnet18-pooled": (64,), "vit-b16-cls": (512,)},
    "topk-stats": {"resnet50-pooled": (256,), "resnet50-l4": (1, 16), "vit-b16-cls": (256,)},
    "per-sample": {"resnet50-pooled": (256,), "resnet50-l4": (16,), "vit-b16-cls": (256,)},
    "react-fit": {"resnet50-pooled": (5000, 25000, 50000)},
}
QUICK_PLAN: dict[str, dict[str, tuple[int, ...]]] = {
    "scale": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "react-ash": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "lts": {"resnet50-pooled": (256,), "resnet18-pooled": (64,), "vit-b16-cls": (512,)},
    "topk-stats": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "per-sample": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "react-fit": {"resnet50-pooled": (5000,)},
}

#: The fixed percentile of the methods that do not take ASH's (LTS's p, the fraction of top
#: activations used; ReAct's fit percentile).
FIXED_PERCENTILES: dict[str, float] = {"lts": 0.05, "react-fit": 0.9}

#: ReAct's percentile, at which the timed ``react-ash`` cases clip (the data's quantile there).
CLIP_QUANTILE = 0.9

#: Half width of the spread of the per-sample percentiles around the case's p.
PER_SAMPLE_SPREAD = 0.05

#: dtypes ``react-fit`` runs in (numpy has no bfloat16; react_threshold reads 16-bit input as float32).
REACT_FIT_DTYPES: tuple[str, ...] = ("float32", "float64")


@dataclass(frozen=True)
class FamilyCase:
    """One case: ``method`` on ``batch`` samples of shape ``shape`` in ``dtype`` at ``percentile``."""

    method: str
    shape: str
    batch: int
    dtype: str
    percentile: float

    @property
    def spec(self) -> bench.ShapeSpec:
        """The :class:`ash_ext.bench.ShapeSpec` of :attr:`shape`."""
        return SHAPES[self.shape]

    @property
    def n(self) -> int:
        """Values per sample."""
        return self.spec.sample_size

    @property
    def size(self) -> tuple[int, ...]:
        """The full tensor shape ``(batch, *dims)``."""
        return (self.batch, *self.spec.dims)

    @property
    def numel(self) -> int:
        """Number of values of the tensor."""
        return self.batch * self.n

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return self.numel * bench.DTYPES[self.dtype].itemsize

    @property
    def id(self) -> str:
        """A stable name, e.g. ``lts-vit-b16-cls-B512-float32-p0.05``."""
        return f"{self.method}-{self.shape}-B{self.batch}-{self.dtype}-p{self.percentile:g}"


def expand_methods(names: Sequence[str]) -> list[str]:
    """``names`` with the groups ``family`` and ``all`` expanded, in :data:`METHODS` order (``ash`` first).

    Raises ``ValueError`` naming any unknown method.
    """
    wanted: set[str] = set()
    for name in names:
        key = name.strip().lower().replace("_", "-")
        if key in METHOD_GROUPS:
            wanted.update(METHOD_GROUPS[key])
        elif key == "ash" or key in METHODS:
            wanted.add(key)
        else:
            choices = ", ".join(("ash", *METHODS, *METHOD_GROUPS))
            raise ValueError(f"unknown method(s) {name!r}; choose from {choices}")
    return [m for m in ("ash", *METHODS) if m in wanted]


def suite(
    device: torch.device | str = "cpu",
    *,
    methods: Sequence[str] = METHODS,
    quick: bool = False,
    shapes: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
    percentiles: Sequence[float] | None = None,
) -> list[FamilyCase]:
    """The family's cases: per method, the shapes and batches of :data:`DEFAULT_PLAN` (or
    :data:`QUICK_PLAN`), float32 unless ``dtypes``, ASH percentiles 0.65 and 0.9 (0.65 when ``quick``)
    except for LTS and ReAct's fit (:data:`FIXED_PERCENTILES`). ``shapes`` keeps the listed shapes of
    each method's plan; ``batches`` replaces the plan's batch sizes. ``ash`` in ``methods`` is ignored.
    The plan is the CPU's on every device (a GPU would run them in milliseconds).
    """
    del device  # one plan for now; the argument keeps the signature of ash_ext.bench.suite
    plan = QUICK_PLAN if quick else DEFAULT_PLAN
    dtype_names = list(dtypes) if dtypes is not None else ["float32"]
    ash_percentiles = (
        list(percentiles)
        if percentiles is not None
        else list(bench.QUICK_PERCENTILES if quick else bench.DEFAULT_PERCENTILES)
    )
    cases = []
    for method in METHODS:
        if method not in methods:
            continue
        method_dtypes = [d for d in dtype_names if method != "react-fit" or d in REACT_FIT_DTYPES]
        fixed = FIXED_PERCENTILES.get(method)
        for shape, default_batches in plan[method].items():
            if shapes is not None and shape not in shapes:
                continue
            for batch in batches if batches is not None else default_batches:
                for dtype in method_dtypes:
                    for p in [fixed] if fixed is not None else ash_percentiles:
                        cases.append(FamilyCase(method, shape, int(batch), dtype, float(p)))
    return cases


def pytest_cases(device: torch.device | str = "cpu", all_cases: bool = False) -> list[FamilyCase]:
    """The cases of the pytest-benchmark suite: the default suite when ``all_cases``, else ``--quick``'s."""
    return suite(device, quick=not all_cases)


def clip_value(data: str) -> float:
    """ReAct's clip for the timed ``react-ash`` cases: the :data:`CLIP_QUANTILE` quantile of the data kind."""
    normal = statistics.NormalDist()
    if data == "relu":  # P(relu(Z) <= t) = P(Z <= t) for t >= 0
        return normal.inv_cdf(CLIP_QUANTILE)
    if data == "abs":  # P(|Z| <= t) = 2 P(Z <= t) - 1
        return normal.inv_cdf((1 + CLIP_QUANTILE) / 2)
    return normal.inv_cdf(CLIP_QUANTILE)


def per_sample_percentiles(case: FamilyCase, device: torch.device | str) -> Tensor:
    """The ``[B]`` float64 fractions of a ``per-sample`` case: evenly over ``p +- PER_SAMPLE_SPREAD``, in [0, 1]."""
    spread = torch.linspace(-1.0, 1.0, case.batch, dtype=torch.float64) if case.batch > 1 else torch.zeros(1)
    return (case.percentile + PER_SAMPLE_SPREAD * spread.double()).clamp(0.0, 1.0).to(device)


def kept_counts(case: FamilyCase, device: torch.device | str = "cpu") -> Tensor:
    """k of each sample (int64 ``[B]``), as ash_ext and the reference count it for ``case``."""
    if case.method == "per-sample":
        ps = per_sample_percentiles(case, device)
        return case.n - torch.round(ps * case.n).to(torch.int64)
    if case.method == "lts":
        k = max(1, case.n - round(case.n * (1 - case.percentile)))
    elif case.method == "react-fit":
        k = 1  # one order statistic of all values; not per sample
    else:
        k = kept_count(case.n, case.percentile)
    return torch.full((case.batch,), k, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# The references (pytorch-ood's when importable, else the same algorithms in torch)
# --------------------------------------------------------------------------------------------


def _as_maps(x: Tensor) -> Tensor:
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
    if bench.pytorch_ood_version() is not None:
        from pytorch_ood.detector import LTS
        from pytorch_ood.detector import ash as ood_ash
        from pytorch_ood.detector import scale as ood_scale

        return {"scale": ood_scale.scale, "ash_s": ood_ash.ash_s, "lts": LTS.scaling_factor}
    from . import reference

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
    """ASH-S with one percentile per sample, vectorised in torch: see :data:`REFERENCES` ``["per-sample"]``.

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


# --------------------------------------------------------------------------------------------
# The implementations of a case
# --------------------------------------------------------------------------------------------

#: The implementations, in the order of the table and the CSV.
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "fallback", "ash_ext", "ash_ext_scalar_p", "roofline")


def implementations(
    case: FamilyCase, device: torch.device | str, names: Sequence[str] = IMPLEMENTATIONS
) -> dict[str, bench.Implementation]:
    """The functions timed for ``case``, by name (see :data:`IMPLEMENTATIONS`; each takes the input)."""
    device = torch.device(device)
    refs = reference_functions()
    p = case.percentile
    m = case.method
    fns: dict[str, Callable[[Tensor], object]] = {}
    if m == "scale":
        fns = {
            "reference": lambda x: refs["scale"](_as_maps(x), p),
            "fallback": lambda x: fallback.scale(x, p),
            "ash_ext": lambda x: scale(x, p),
        }
    elif m == "react-ash":
        t = clip_value(case.spec.data)
        fns = {
            "reference": lambda x: refs["ash_s"](_as_maps(x).clip(max=t), p),
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
    return {name: bench.Implementation(name, fns[name]) for name in IMPLEMENTATIONS if name in names and name in fns}


# --------------------------------------------------------------------------------------------
# Deviation from the reference
# --------------------------------------------------------------------------------------------


def deviation_input(case: FamilyCase, device: torch.device | str, seed: int = 0) -> Tensor:
    """An input of ``case`` whose result is unique: the shape's data with 1.0 added to each sample's k
    largest values (its own k for ``per-sample``; in float32, before the cast), so ties at the
    threshold cannot occur. ``react-fit`` takes the plain data (a percentile has no ties to break)."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(bench._seed_for(seed, "family-deviation", case.method, case.shape, case.batch, case.percentile))
    x = bench._draw(case.spec.data, case.numel, g, device).view(case.batch, case.n)
    if case.method != "react-fit":
        ks = kept_counts(case, device)
        top = int(ks.max()) if ks.numel() else 0
        if 0 < top:
            idx = torch.topk(x, min(top, case.n), dim=1, sorted=True).indices
            raise_by = (torch.arange(idx.shape[1], device=device).unsqueeze(0) < ks.unsqueeze(1)).to(x.dtype)
            x.scatter_add_(1, idx, raise_by)
    return x.view(case.size).to(bench.DTYPES[case.dtype])


def deviation_clip(x: Tensor, case: FamilyCase) -> float:
    """The clip of a ``react-ash`` deviation check: 0.25 above the largest k-th largest value of any
    sample of ``x``, so that every clipped value is kept and the kept set stays unique."""
    k = kept_count(case.n, case.percentile)
    if k == 0:
        return clip_value(case.spec.data)
    flat = x.reshape(x.shape[0], -1).float()
    return float(torch.topk(flat, k, dim=1).values[:, -1].max()) + 0.25


def _rel(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """(max |out - ref|, that over max |ref|), NaN where either has a NaN or inf."""
    if not out.numel():
        return 0.0, 0.0
    big = float(ref.double().abs().max())
    if not (math.isfinite(big) and math.isfinite(float(out.double().abs().max()))):
        return math.nan, math.nan
    dev = float((out.double() - ref.double()).abs().max())
    return dev, dev / big if big > 0 else dev


def deviation(
    case: FamilyCase,
    device: torch.device | str,
    seed: int = 0,
    x: Tensor | None = None,
    ash_ext_fn: Callable[[Tensor], Any] | None = None,
) -> dict[str, Any]:
    """ash_ext's deviation from the reference on ``x`` (default: :func:`deviation_input`).

    Returns ``max_abs_dev``, ``max_rel_dev`` (over max |reference|; for ``topk-stats`` the worst of
    threshold, total and kept), ``mismatch`` (what must agree exactly: positions zero in one output
    and not in the other for the shaping methods, samples whose threshold differs for
    ``topk-stats``, 1 if the two percentiles differ at all for ``react-fit``), ``reference_nonfinite`` /
    ``ash_ext_nonfinite`` and ``ok`` (within :func:`ash_ext.bench.deviation_tolerance` and no
    mismatch; ``react-fit``'s mismatch alone is reported, not failed). 16-bit inputs are compared
    with the reference run in float32 (rounded to the dtype where it returns a tensor like x).
    ``ash_ext_fn`` replaces ash_ext's function of the case (to check that the check catches errors).
    """
    device = torch.device(device)
    if x is None:
        x = deviation_input(case, device, seed)
    fn = ash_ext_fn
    result: dict[str, Any] = {}
    half = x.dtype in (torch.float16, torch.bfloat16)
    xr = x.float() if half else x
    refs = reference_functions()
    p = case.percentile
    mismatch = 0
    with torch.no_grad():
        if case.method == "react-fit":
            out_value = float((fn or (lambda a: react_threshold(a, p)))(x))
            ref_value = react_fit_reference(xr, p)
            out, ref = torch.tensor([out_value]), torch.tensor([ref_value])
            mismatch = int(out_value != ref_value and not (math.isnan(out_value) and math.isnan(ref_value)))
            result.update(ash_ext_value=out_value, reference_value=ref_value)
        elif case.method == "topk-stats":
            got = (fn or (lambda a: topk_stats(a, p)))(x)
            threshold, total, kept = got[0], got[1], got[2]
            k = kept_count(case.n, p)
            r_threshold, r_total, r_kept = topk_stats_reference(xr, k)
            mismatch = int((threshold.float() != r_threshold.to(x.dtype).float()).sum())
            devs = [_rel(threshold, r_threshold.to(x.dtype)), _rel(total, r_total), _rel(kept, r_kept)]
            out, ref = torch.stack([total, kept]), torch.stack([r_total, r_kept])
            result.update(
                _finite(out, ref, threshold),
                max_abs_dev=max(d[0] for d in devs),
                max_rel_dev=max(d[1] for d in devs),
                mismatch=mismatch,
            )
            result["deviation_baseline"] = _baseline(case, half)
            result["ok"] = _ok(result, case)
            return result
        else:
            if case.method == "scale":
                out = (fn or (lambda a: scale(a, p)))(x)
                ref = refs["scale"](_as_maps(xr), p).view(x.shape)
            elif case.method == "react-ash":
                t = deviation_clip(x, case)
                result["deviation_clip"] = t
                out = (fn or (lambda a: ash_s(a, p, clip=t)))(x)
                ref = refs["ash_s"](_as_maps(xr).clip(max=t), p).view(x.shape)
            elif case.method == "per-sample":
                ps = per_sample_percentiles(case, device)
                out = (fn or (lambda a: ash_s(a, ps)))(x)
                ref = per_sample_ash_s_reference(xr, ps)
            elif case.method == "lts":
                out = (fn or (lambda a: lts_factor(a, p)))(x)
                ref = refs["lts"](xr, p)
            else:
                raise ValueError(f"unknown method {case.method!r}")
            if half and case.method != "lts":
                ref = ref.to(x.dtype)
            if case.method in SHAPING_METHODS:
                mismatch = int(((ref != 0) ^ (out != 0)).sum())
    dev_abs, dev_rel = _rel(out, ref)
    result.update(_finite(out, ref), max_abs_dev=dev_abs, max_rel_dev=dev_rel, mismatch=mismatch)
    result["deviation_baseline"] = _baseline(case, half)
    result["ok"] = _ok(result, case)
    return result


def _finite(out: Tensor, ref: Tensor, *more: Tensor) -> dict[str, bool]:
    def finite(t: Tensor) -> bool:
        return bool(torch.isfinite(t.double()).all()) if t.numel() else True

    return {"reference_nonfinite": not finite(ref), "ash_ext_nonfinite": not all(finite(t) for t in (out, *more))}


def _baseline(case: FamilyCase, half: bool) -> str:
    rounded = "" if case.method in ("lts", "topk-stats", "react-fit") else f", rounded to {case.dtype}"
    where = f"reference in float32{rounded}"
    return (where if half else f"reference in {case.dtype}") + f": {REFERENCES[case.method]}"


def _ok(row: dict[str, Any], case: FamilyCase) -> bool:
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return True  # the reference's inf/NaN; reported on its own
    rel = row.get("max_rel_dev")
    if rel is None or math.isnan(rel) or rel > bench.deviation_tolerance(case.dtype):
        return False
    return case.method == "react-fit" or not row.get("mismatch")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _case_weight(case: FamilyCase) -> float:
    per_value = {"react-fit": 1.5e-7, "per-sample": 3e-7}.get(case.method, 2e-7)
    return 0.15 + per_value * case.numel


def run(config: bench.BenchConfig, methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Run the family's cases of ``config`` (its ``methods`` that are in :data:`METHODS`) and return
    ``{"meta": {...}, "results": [...]}``, shaped like :func:`ash_ext.bench.run`'s.

    ``config.impls`` filters the implementations when it is not the default list: ``clone`` stands
    for the roofline and ``pytorch-ood`` for the reference; ash_ext is always timed.
    """
    device = config.resolved_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    cases = family_cases(config, methods)
    min_time = config.min_time if config.min_time is not None else bench._default_min_time(device, config.quick)
    warmup = config.warmup if config.warmup is not None else (3 if device.type == "cuda" else 1)
    cache = config.cache_bytes or bench.last_level_cache_bytes(device)
    budget = config.memory_budget_bytes or bench._default_budget(device)
    impl_names = _impl_names(config.impls)
    meta: dict[str, Any] = {
        "tool": "ash_ext bench --methods family",
        "suite": "family",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": bench.machine_info(device),
        "config": {**asdict(config), "device": str(device), "min_time": min_time, "warmup": warmup},
        "methods": sorted({c.method for c in cases}, key=METHODS.index),
        "references": dict(REFERENCES),
        "reference_source": "pytorch-ood " + bench.pytorch_ood_version()
        if bench.pytorch_ood_version()
        else "pytorch-ood not importable: its algorithms copied in torch (ash_ext.bench_family)",
        "implementations": {
            "reference": "the method's reference (see references)",
            "fallback": "ash_ext's pure-PyTorch fallback (stable sort); not for react-fit",
            "ash_ext": "ash_ext's function of the method (the compiled kernel where there is one)",
            "ash_ext_scalar_p": "per-sample only: ash_ext.ash_s with one float percentile, on the same inputs",
            "roofline": "x.clone() (one read + one write) for scale, react-ash, per-sample; "
            "x.sum(dim=1) (one read) for lts, topk-stats, react-fit",
        },
        "timed": impl_names,
        "timing": f"as ash_ext bench: time.perf_counter (CUDA events on a GPU) around each call; {warmup} warm-up "
        "call(s); implementations interleaved round-robin; each call on the next of >= max(2, ceil(2 * cache / "
        f"bytes)) distinct inputs (cache {cache} B, memory budget {budget} B per rotation)",
        "clip": f"react-ash clips at the {CLIP_QUANTILE} quantile of the data kind: "
        + ", ".join(f"{kind} {clip_value(kind):.4f}" for kind in bench.DATA_KINDS),
        "per_sample_percentiles": f"a [B] float64 tensor spread evenly over p - {PER_SAMPLE_SPREAD} .. "
        f"p + {PER_SAMPLE_SPREAD}",
        "data": {name: bench.DATA_KINDS[spec.data] for name, spec in SHAPES.items()},
        "deviation_data": bench.DEVIATION_DATA
        + "; react-ash's deviation clips 0.25 above the largest k-th value; react-fit's uses the plain data",
        "interrupted": False,
        "load_average_start": bench._load_average(),
    }
    results: list[dict[str, Any]] = []
    progress = bench._Progress([_case_weight(c) for c in cases], config.progress)  # type: ignore[arg-type]
    started = time.perf_counter()
    groups: dict[tuple[str, int, str], list[FamilyCase]] = {}
    for case in cases:
        groups.setdefault((case.shape, case.batch, case.dtype), []).append(case)
    try:
        with torch.no_grad():
            for (shape, batch, dtype), group in groups.items():
                spec = SHAPES[shape]
                size = (batch, *spec.dims)
                numel = math.prod(size)
                copies = bench._rotation_copies(numel * bench.DTYPES[dtype].itemsize, cache, budget)
                g = torch.Generator(device=device)
                g.manual_seed(bench._seed_for(config.seed, "timing", shape, batch))
                buffer = bench._draw(spec.data, numel * copies, g, device).to(bench.DTYPES[dtype])
                shared = bench.Rotation(buffer, size, copies)
                for case in group:
                    progress.update(case.id)
                    results.append(_run_case(case, impl_names, shared, device, config, min_time, warmup, copies))
                    progress.advance()
                del shared, buffer
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        progress.close()
    # Timed grouped by input (one rotation per shape, batch and dtype); reported in the suite's order.
    order = {case.id: i for i, case in enumerate(cases)}
    results.sort(key=lambda row: order[row["case"]])
    meta["wall_s"] = time.perf_counter() - started
    meta["load_average_end"] = bench._load_average()
    meta["machine"]["torch_threads"] = torch.get_num_threads()
    return {"meta": meta, "results": results}


def family_cases(config: bench.BenchConfig, methods: Sequence[str] = METHODS) -> list[FamilyCase]:
    """The family's cases of ``config``: its ``methods`` (when set) that are in ``methods``."""
    chosen = [m for m in (getattr(config, "methods", None) or methods) if m in METHODS and m in methods]
    return suite(
        config.resolved_device(),
        methods=chosen,
        quick=config.quick,
        shapes=config.shapes,
        batches=config.batches,
        dtypes=config.dtypes,
        percentiles=config.percentiles,
    )


def _impl_names(impls: Sequence[str]) -> list[str]:
    if list(impls) == list(bench.IMPLEMENTATIONS):
        return list(IMPLEMENTATIONS)
    alias = {"clone": "roofline", "pytorch-ood": "reference"}
    chosen = {alias.get(name, name) for name in impls} | {"ash_ext"}
    return [name for name in IMPLEMENTATIONS if name in chosen]


def _run_case(
    case: FamilyCase,
    impl_names: list[str],
    shared: bench.Rotation,
    device: torch.device,
    config: bench.BenchConfig,
    min_time: float,
    warmup: int,
    copies: int,
) -> dict[str, Any]:
    impls = implementations(case, device, impl_names)
    samples = bench.time_interleaved(
        impls,
        shared,
        None,
        device,
        min_time=min_time,
        min_reps=config.min_reps,
        slow_min_reps=config.slow_min_reps,
        slow_call_s=config.slow_call_s,
        max_reps=config.max_reps,
        warmup=warmup,
    )
    timings = {name: bench.summarize(s) for name, s in samples.items()}
    med = {name: t["median_ms"] for name, t in timings.items()}
    ks = kept_counts(case)
    row: dict[str, Any] = {
        "case": case.id,
        "method": case.method,
        "shape": case.shape,
        "model": case.spec.model,
        "size": list(case.size),
        "batch": case.batch,
        "dtype": case.dtype,
        "percentile": case.percentile,
        "n": case.n,
        "values": case.numel,
        "k_min": int(ks.min()) if case.method != "react-fit" else None,
        "k_max": int(ks.max()) if case.method != "react-fit" else None,
        "clip": clip_value(case.spec.data) if case.method == "react-ash" else None,
        "reference": REFERENCES[case.method],
        "bytes": case.nbytes,
        "rotation_inputs": copies,
        "ash_ext_implementation": implementation_for(shared.inputs[0]),
        "timings": timings,
    }

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med and med[b] > 0 else None

    row["speedup_vs_reference"] = ratio("reference", "ash_ext")
    row["speedup_vs_fallback"] = ratio("fallback", "ash_ext")
    row["per_sample_overhead"] = ratio("ash_ext", "ash_ext_scalar_p")
    row["roofline"] = "clone" if case.method in SHAPING_METHODS else "sum"
    pct = ratio("roofline", "ash_ext")
    row["pct_of_roofline"] = 100 * pct if pct is not None else None
    x_dev = shared.inputs[0] if case.method == "react-fit" else None
    row.update(deviation(case, device, config.seed, x=x_dev))
    return row


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS: tuple[str, ...] = (
    "method",
    "shape",
    "B",
    "values",
    "dtype",
    "p",
    "reference",
    "ref ms",
    "fallback ms",
    "ash_ext ms",
    "±IQR",
    "roofline ms",
    "speed-up vs ref",
    "% of roofline",
    "max dev (rel)",
)


def _fmt_count(n: int) -> str:
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    if n >= 10**4:
        return f"{n / 1e3:.0f}k"
    return str(n)


def _fmt_dev(row: dict[str, Any]) -> str:
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return "ref inf/NaN"
    rel = row.get("max_rel_dev")
    text = "nan" if rel is None or math.isnan(rel) else ("0" if rel == 0 else f"{rel:.1e}")
    if row.get("mismatch") and row.get("method") != "react-fit":
        text += f" ({row['mismatch']} {'samples' if row.get('method') == 'topk-stats' else 'pos'}!)"
    if not row.get("ok", True):
        text += " FAIL"
    return text


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, one list of strings per case (columns: :data:`TABLE_COLUMNS`)."""
    rows = []
    for r in results:
        t = r["timings"]
        med = {name: summary["median_ms"] for name, summary in t.items()}.get
        ext = t.get("ash_ext")
        iqr = f"{100 * ext['iqr_ms'] / ext['median_ms']:.0f}%" if ext and ext["median_ms"] > 0 else "-"
        speed = r.get("speedup_vs_reference")
        pct = r.get("pct_of_roofline")
        rows.append(
            [
                r["method"],
                r["shape"],
                str(r["batch"]),
                _fmt_count(r["values"]),
                r["dtype"],
                f"{r['percentile']:g}",
                REFERENCE_LABELS[r["method"]],
                bench._fmt_ms(med("reference")),
                bench._fmt_ms(med("fallback")),
                bench._fmt_ms(med("ash_ext")),
                iqr,
                bench._fmt_ms(med("roofline")) + (" (sum)" if r.get("roofline") == "sum" else ""),
                _fmt_x(speed) if speed is not None else "-",
                f"{pct:.0f}%" if pct is not None else "-",
                _fmt_dev(r),
            ]
        )
    return rows


def format_table(results: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table)."""
    return bench.render_table(list(TABLE_COLUMNS), table_rows(results), {0, 1, 4, 6}, markdown)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A few lines under the table: machine, geometric-mean speed-up per method, and any case to look at."""
    meta, results = data["meta"], data["results"]
    m = meta["machine"]
    lines = [
        (
            f"device {m['device']} ({m['device_name']}), torch {m['torch']} ({m['torch_threads']} threads), "
            f"ash_ext {m['ash_ext']} (CPU kernel: {m.get('ash_ext_cpu_isa', 'unknown')}), "
            f"references from {meta.get('reference_source')}; "
            f"{len(results)} family cases in {meta.get('wall_s', 0):.0f} s"
        )
    ]
    paths = sorted({r["ash_ext_implementation"] for r in results})
    if paths and paths != ["cpu-kernel"] and paths != ["cuda-kernel"]:
        lines.append(f"note: ash_ext ran as {', '.join(paths)} (the compiled kernel is not in use for every case)")
    by_method: dict[str, list[float]] = {}
    for r in results:
        if r.get("speedup_vs_reference"):
            by_method.setdefault(r["method"], []).append(r["speedup_vs_reference"])
    if by_method:
        parts = [
            f"{method} {_fmt_x(bench._geomean(v))} ({_fmt_x(min(v))} .. {_fmt_x(max(v))})"
            for method, v in by_method.items()
        ]
        lines.append("speed-up of ash_ext over the reference, geometric mean (range) per method: " + "; ".join(parts))
    overhead = [r["per_sample_overhead"] for r in results if r.get("per_sample_overhead")]
    if overhead:
        lines.append(
            f"per-sample percentiles ([B] tensor) take {bench._geomean(overhead):.2f}x the time of one float "
            f"percentile on the same data (geometric mean over {len(overhead)} case(s))"
        )
    slower = [r["case"] for r in results if r.get("speedup_vs_reference") is not None and r["speedup_vs_reference"] < 1]
    if slower:
        lines.append(f"ash_ext is SLOWER than the reference in {len(slower)} case(s): " + bench._some(slower, 8))
    bad = [r["case"] for r in results if not r.get("ok", True)]
    if bad:
        lines.append(f"ash_ext DEVIATES from the reference in {len(bad)} case(s): " + bench._some(bad))
    elif results:
        worst = max(results, key=lambda r: r.get("max_rel_dev") or 0.0)
        lines.append(
            f"largest deviation from the reference: {worst.get('max_rel_dev') or 0.0:.1e} of max |reference| "
            f"({worst['case']}); kept sets and thresholds identical in every case"
        )
    fits = [r for r in results if r["method"] == "react-fit"]
    if fits:
        exact = sum(1 for r in fits if not r.get("mismatch"))
        lines.append(f"react_threshold equals np.percentile exactly in {exact} of {len(fits)} fit case(s)")
    ref_nan = [r["case"] for r in results if r.get("reference_nonfinite") and not r.get("ash_ext_nonfinite")]
    if ref_nan:
        lines.append(
            f"the reference gives inf/NaN where ash_ext is finite in {len(ref_nan)} case(s): " + bench._some(ref_nan)
        )
    noisy = [r for r in results if _noisy(r)]
    if noisy:
        lines.append(
            f"{len(noisy)} case(s) have a spread (IQR) over half the median for ash_ext or the roofline: "
            "perhaps other processes were using the device"
        )
    cpus = m.get("cpus_usable") or m.get("cpu_count") or 1
    for key, when in (("load_average_start", "started"), ("load_average_end", "ended")):
        load = meta.get(key)
        if m["device"].startswith("cpu") and load and load[0] > max(1.0, 0.5 * cpus):
            lines.append(
                f"the 1-minute load average was {load[0]:.1f} on {cpus} CPUs as the run {when}: other processes "
                "were probably competing for the CPU, so the times are noisy"
            )
    if meta.get("interrupted"):
        lines.append("interrupted: the results are partial")
    return lines


def _fmt_x(value: float) -> str:
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


def _noisy(row: dict[str, Any]) -> bool:
    for name in ("ash_ext", "roofline"):
        t = row["timings"].get(name)
        if t and t["median_ms"] > 0 and t["iqr_ms"] > 0.5 * t["median_ms"]:
            return True
    return False


CSV_BASE: tuple[str, ...] = (
    "case",
    "method",
    "shape",
    "batch",
    "dtype",
    "percentile",
    "n",
    "values",
    "k_min",
    "k_max",
    "clip",
    "bytes",
    "rotation_inputs",
    "ash_ext_implementation",
)
CSV_TAIL: tuple[str, ...] = (
    "speedup_vs_reference",
    "speedup_vs_fallback",
    "per_sample_overhead",
    "roofline",
    "pct_of_roofline",
    "max_abs_dev",
    "max_rel_dev",
    "mismatch",
    "ok",
    "reference_nonfinite",
    "ash_ext_nonfinite",
    "deviation_clip",
    "ash_ext_value",
    "reference_value",
    "reference",
)


def csv_rows(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The CSV's header and rows: one row per case, timing summaries flattened as ``<impl>_<field>``."""
    impls = [name for name in IMPLEMENTATIONS if any(name in r["timings"] for r in data["results"])]
    header = list(CSV_BASE) + [f"{i}_{f}" for i in impls for f in bench.CSV_TIMING_FIELDS] + list(CSV_TAIL)
    header += ["device", "device_name", "torch", "ash_ext", "pytorch_ood"]
    m = data["meta"]["machine"]
    rows = []
    for r in data["results"]:
        row: dict[str, Optional[Any]] = {key: r.get(key) for key in (*CSV_BASE, *CSV_TAIL)}
        for i in impls:
            for f in bench.CSV_TIMING_FIELDS:
                row[f"{i}_{f}"] = r["timings"].get(i, {}).get(f)
        row.update(
            device=m["device"],
            device_name=m["device_name"],
            torch=m["torch"],
            ash_ext=m["ash_ext"],
            pytorch_ood=m["pytorch_ood"],
        )
        rows.append(row)
    return header, rows


def write_csv(data: dict[str, Any], path: str) -> None:
    """Write the family results as CSV, one row per case (the raw samples are in the JSON)."""
    import csv

    header, rows = csv_rows(data)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
