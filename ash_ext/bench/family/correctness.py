"""The family's deviation check: ash_ext against the method's reference on inputs where the result is
unique, flagged beyond :func:`ash_ext.bench.correctness.deviation_tolerance`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..._semantics import kept_count
from ...functional import ash_s, lts_factor, scale, topk_stats
from ...percentile import react_threshold
from ..cases import DTYPES
from ..correctness import deviation_tolerance
from ..timing import draw, seed_for
from .cases import REFERENCES, SHAPING_METHODS, FamilyCase, clip_value, kept_counts, per_sample_percentiles
from .references import (
    as_maps,
    per_sample_ash_s_reference,
    react_fit_reference,
    reference_functions,
    topk_stats_reference,
)


def deviation_input(case: FamilyCase, device: torch.device | str, seed: int = 0) -> Tensor:
    """An input of ``case`` whose result is unique: the shape's data with 1.0 added to each sample's k
    largest values (its own k for ``per-sample``; in float32, before the cast), so ties at the
    threshold cannot occur. ``react-fit`` takes the plain data (a percentile has no ties to break)."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(seed_for(seed, "family-deviation", case.method, case.shape, case.batch, case.percentile))
    x = draw(case.spec.data, case.numel, g, device).view(case.batch, case.n)
    if case.method != "react-fit":
        ks = kept_counts(case, device)
        top = int(ks.max()) if ks.numel() else 0
        if 0 < top:
            idx = torch.topk(x, min(top, case.n), dim=1, sorted=True).indices
            raise_by = (torch.arange(idx.shape[1], device=device).unsqueeze(0) < ks.unsqueeze(1)).to(x.dtype)
            x.scatter_add_(1, idx, raise_by)
    return x.view(case.size).to(DTYPES[case.dtype])


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
    ``ash_ext_nonfinite`` and ``ok`` (within :func:`~ash_ext.bench.correctness.deviation_tolerance`
    and no mismatch; ``react-fit``'s mismatch alone is reported, not failed). 16-bit inputs are
    compared with the reference run in float32 (rounded to the dtype where it returns a tensor like
    x). ``ash_ext_fn`` replaces ash_ext's function of the case (to check that the check catches errors).
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
                ref = refs["scale"](as_maps(xr), p).view(x.shape)
            elif case.method == "react-ash":
                t = deviation_clip(x, case)
                result["deviation_clip"] = t
                out = (fn or (lambda a: ash_s(a, p, clip=t)))(x)
                ref = refs["ash_s"](as_maps(xr).clip(max=t), p).view(x.shape)
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
    if rel is None or math.isnan(rel) or rel > deviation_tolerance(case.dtype):
        return False
    return case.method == "react-fit" or not row.get("mismatch")
