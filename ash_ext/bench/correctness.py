"""ash_ext's deviation from the reference algorithm, on inputs whose kept set is unique, so that
a fast wrong result cannot hide."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .cases import DTYPES, Case
from .impls import ASH_EXT, REFERENCE
from .timing import draw, seed_for


def deviation_input(case: Case, device: torch.device | str, seed: int = 0) -> Tensor:
    """An input of ``case`` whose kept set is unique: the shape's data with 1.0 added to the k largest
    of each sample (before the cast to the case's dtype), so ties at the threshold cannot occur."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(seed_for(seed, "deviation", case.shape, case.batch, case.percentile))
    x = draw(case.spec.data, case.numel, g, device).view(case.batch, case.spec.sample_size)
    k = case.k
    if 0 < k < x.shape[1]:
        idx = torch.topk(x, k, dim=1, sorted=False).indices
        x.scatter_add_(1, idx, torch.ones_like(idx, dtype=x.dtype))
    return x.view(case.size).to(DTYPES[case.dtype])


def _max_abs(t: Tensor) -> float:
    return float(t.float().abs().max()) if t.numel() else 0.0  # NaN if t has a NaN


def compare(out: Tensor, ref: Tensor) -> dict[str, Any]:
    """``max_abs_dev``, ``max_rel_dev`` (over max |ref|), ``mask_mismatch`` (positions zero in one and
    not the other; NaN counts as non-zero) and which of the two has NaN or inf."""
    ref_finite = math.isfinite(_max_abs(ref))
    out_finite = math.isfinite(_max_abs(out))
    mismatch = int(((ref != 0) ^ (out != 0)).sum())
    result: dict[str, Any] = {"reference_nonfinite": not ref_finite, "ash_ext_nonfinite": not out_finite}
    if not (ref_finite and out_finite):
        return {"max_abs_dev": math.nan, "max_rel_dev": math.nan, "mask_mismatch": mismatch, **result}
    max_abs = float((out.float() - ref.float()).abs_().max()) if ref.numel() else 0.0
    scale = _max_abs(ref)
    rel = max_abs / scale if scale > 0 else max_abs
    return {"max_abs_dev": max_abs, "max_rel_dev": rel, "mask_mismatch": mismatch, **result}


def deviation(case: Case, device: torch.device | str, seed: int = 0, x: Tensor | None = None) -> dict[str, Any]:
    """ash_ext's deviation from the reference algorithm on ``x`` (default: :func:`deviation_input`).

    Returns ``max_abs_dev`` (max |ash_ext - reference|), ``max_rel_dev`` (that over max |reference|)
    and ``mask_mismatch`` (positions zero in one output and not in the other); NaN or inf in either
    output makes the deviations NaN, and ``reference_nonfinite`` / ``ash_ext_nonfinite`` say which
    (the reference gives NaN for ASH-S with k = 0, where ash_ext documents zeros).

    For float16 and bfloat16 the reference runs on the input in float32 and its output is rounded to
    the dtype (ash_ext accumulates in float32 too; the reference's own half-precision sums lose
    precision and overflow float16 on feature maps); ``same_dtype_reference`` then holds the
    comparison with the reference run in the dtype itself.
    """
    if x is None:
        x = deviation_input(case, device, seed)
    with torch.no_grad():
        out = ASH_EXT[case.variant](x, case.percentile)
        same = REFERENCE[case.variant](x, case.percentile)
        half = x.dtype in (torch.float16, torch.bfloat16)
        exact = REFERENCE[case.variant](x.float(), case.percentile).to(x.dtype) if half else same
    result = compare(out, exact)
    result["deviation_baseline"] = (
        f"reference in float32, rounded to {case.dtype}" if half else f"reference in {case.dtype}"
    )
    if half:
        result["same_dtype_reference"] = compare(out, same)
    return result


def deviation_tolerance(dtype: str) -> float:
    """The largest relative deviation (of max |reference|) of ash_ext from the reference that is not flagged."""
    # relative to max |reference|: a few ulp of the dtype (float32: sum-order effects through exp in ASH-S)
    return {"float64": 1e-10, "float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}.get(dtype, 1e-2)


def dev_too_large(row: dict[str, Any]) -> bool:
    """Whether a result row's deviation is flagged: a kept-set mismatch, NaN where the reference is
    finite, or more than :func:`deviation_tolerance` (the reference's own inf/NaN is not flagged)."""
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return False  # reported on its own line
    if row.get("mask_mismatch"):
        return True
    rel = row.get("max_rel_dev")
    return rel is None or math.isnan(rel) or rel > deviation_tolerance(row["dtype"])
