"""The shaping family against its references: SCALE, LTS, ReAct(+ASH), topk_stats, per-sample
percentiles, through the public API on the compiled CPU kernel and on the fallback.

References: pytorch-ood 0.4.0's own functions (``pytorch_ood.detector.{ash,scale}``,
``LTS.scaling_factor``), ``np.percentile``, and ``torch.topk``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES, bits_equal, gapped, integer_ties, needs_kernel, normal, relu_like
from hypothesis import given, settings
from hypothesis import strategies as st

import ash_ext
from ash_ext import fallback
from ash_ext.functional import shape_with

pood_ash = pytest.importorskip("pytorch_ood.detector.ash")
pood_scale = pytest.importorskip("pytorch_ood.detector.scale")
from pytorch_ood.detector import LTS as PoodLTS  # noqa: E402

BACKENDS = [pytest.param(False, id="kernel", marks=needs_kernel), pytest.param(True, id="fallback")]
REFERENCE_VARIANTS = {"ash-p": pood_ash.ash_p, "ash-b": pood_ash.ash_b, "ash-s": pood_ash.ash_s}
PERCENTILES = (0.0, 0.3, 0.65, 0.9, 0.99)


def _run(force_fallback: bool, x, percentile, variant, **kwargs):
    return shape_with(x, percentile, variant, force_fallback=force_fallback, **kwargs)


def _tolerance(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}[dtype]


def _assert_close_where_finite(got, want, dtype):
    """Equal where the reference is finite; got finite elsewhere is allowed (documented rule)."""
    finite = torch.isfinite(want)
    rtol, atol = _tolerance(dtype)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# SCALE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_fallback", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("percentile", PERCENTILES)
def test_scale_equals_pytorch_ood(force_fallback, dtype, percentile):
    x = relu_like((5, 16, 3, 3), dtype, seed=3)
    got = _run(force_fallback, x, percentile, "scale")
    want = pood_scale.scale(x, percentile)
    rtol, atol = _tolerance(dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("force_fallback", BACKENDS)
def test_scale_signed_activations_and_the_zero_kept_sum(force_fallback):
    x = normal((6, 10, 2, 2), torch.float64, seed=4)
    for percentile in PERCENTILES:
        got = _run(force_fallback, x, percentile, "scale")
        _assert_close_where_finite(got, pood_scale.scale(x, percentile), torch.float64)
    # k = 0: s2 = 0. Where s1 < 0 the reference's factor is exp(-inf) = 0 (zeros, finite: matched);
    # where s1 > 0 it is inf (not finite): the factor is 1 and the sample is left as it is.
    x = torch.tensor([[[[1.0, -3.0]]], [[[2.0, 1.0]]]], dtype=torch.float64)
    got = _run(force_fallback, x, 1.0, "scale")
    want = pood_scale.scale(x, 1.0)
    assert torch.equal(got[0], torch.zeros_like(x[0])) and torch.equal(want[0], got[0])
    assert torch.isinf(want[1]).all() and torch.equal(got[1], x[1])


@pytest.mark.parametrize("force_fallback", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scale_is_ash_s_factor_on_every_value(force_fallback, dtype):
    x = gapped((4, 50), seed=5).to(dtype)
    scaled = _run(force_fallback, x, 0.7, "scale")
    stats = ash_ext.topk_stats(x, 0.7) if not force_fallback else None
    if stats is not None:
        # (exp here is torch's, the kernel's may differ in the last bit)
        factor = torch.exp(stats.total / stats.kept).unsqueeze(1)
        torch.testing.assert_close(scaled, (x.to(factor.dtype) * factor).to(dtype), rtol=2e-7, atol=0)
    # pruning the SCALE output gives ASH-S (same factor, same rounding)
    pruned = _run(force_fallback, x, 0.7, "ash-s")
    assert bits_equal(torch.where(pruned != 0, scaled, torch.zeros((), dtype=dtype)), pruned)


# --------------------------------------------------------------------------------------------
# ReAct + ASH: clip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_fallback", BACKENDS)
@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s", "scale"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_clip_is_shape_of_the_clamped_input(force_fallback, variant, dtype):
    x = integer_ties((4, 6, 3, 3), dtype, seed=6, low=-2, high=6)  # many values at the bound
    for clip in (2.0, 0.5, -1.0, math.inf):
        got = _run(force_fallback, x, 0.65, variant, clip=clip)
        want = _run(force_fallback, x.clamp(max=clip), 0.65, variant)
        assert bits_equal(got, want), (variant, clip)
    assert bits_equal(x, integer_ties((4, 6, 3, 3), dtype, seed=6, low=-2, high=6))  # input untouched


@pytest.mark.parametrize("force_fallback", BACKENDS)
@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
def test_react_and_ash_equals_pytorch_ood(force_fallback, variant):
    # The paper code's react_and_ash: clip at the ReAct threshold, then ASH.
    x = relu_like((4, 32, 2, 2), torch.float64, seed=7)
    threshold = float(np.percentile(x.numpy(), 90))
    got = _run(force_fallback, x, 0.65, variant, clip=threshold)
    want = REFERENCE_VARIANTS[variant](x.clip(max=threshold), 0.65)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("force_fallback", BACKENDS)
@pytest.mark.parametrize("variant", ["ash-p", "ash-s", "scale"])
def test_clip_in_place_and_gradient(force_fallback, variant):
    x = gapped((3, 40), seed=8)
    out = _run(force_fallback, x, 0.5, variant, clip=0.3)
    y = x.clone()
    assert _run(force_fallback, y, 0.5, variant, clip=0.3, inplace=True) is y
    assert bits_equal(y, out)
    # The gradient is the one of shape(x.clamp(max=clip)) through torch.clamp.
    leaf = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(_run(force_fallback, leaf, 0.5, variant, clip=0.3).square().sum(), leaf)
    leaf2 = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(_run(True, leaf2.clamp(max=0.3), 0.5, variant).square().sum(), leaf2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# LTS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.01, 0.05, 0.3, 1.0])
def test_lts_factor_equals_pytorch_ood(dtype, p):
    z = normal((7, 300), dtype, seed=9)  # signed: the ReLU matters
    got = ash_ext.lts_factor(z, p)
    want = PoodLTS.scaling_factor(z, p)
    assert got.dtype == z.dtype and got.shape == (7,)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert bits_equal(z, normal((7, 300), dtype, seed=9))


def test_lts_factor_on_the_fallback_and_its_zero_rule():
    z = relu_like((3, 64), torch.float64, seed=10)
    torch.testing.assert_close(
        fallback_lts(z, 0.1), PoodLTS.scaling_factor(z, 0.1), rtol=1e-12, atol=0
    )
    # No positive feature: the reference's 0 / 0 is NaN; the factor is 1 (logits unscaled).
    z = torch.tensor([[-1.0, -2.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    assert torch.isnan(PoodLTS.scaling_factor(z, 0.5)[0])
    got = ash_ext.lts_factor(z, 0.5)
    assert got[0] == 1.0 and got[1] == PoodLTS.scaling_factor(z, 0.5)[1]


def fallback_lts(z, p):
    k = max(1, ash_ext.kept_count(z.shape[1], 1 - p))
    _, total, kept = fallback.topk_stats(z, k, 0.0, None)
    return (total / kept).square()


# --------------------------------------------------------------------------------------------
# topk_stats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("percentile", PERCENTILES + (1.0,))
def test_topk_stats_against_torch_topk(dtype, percentile):
    x = normal((5, 4, 5, 5), dtype, seed=11)
    stats = ash_ext.topk_stats(x, percentile)
    n = 100
    k = ash_ext.kept_count(n, percentile)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flat = x.reshape(5, n)
    assert stats.threshold.dtype == dtype and stats.total.dtype == acc and stats.kept.dtype == acc
    assert torch.equal(stats.k, torch.full((5,), k))
    top = torch.topk(flat.to(acc), k, dim=1).values
    if k == 0:
        assert torch.isnan(stats.threshold).all()
    else:
        assert torch.equal(stats.threshold, top[:, -1].to(dtype))
    tol = 1e-4 if dtype != torch.float64 else 1e-12
    torch.testing.assert_close(stats.total, flat.to(acc).sum(1), rtol=tol, atol=tol)
    torch.testing.assert_close(stats.kept, top.sum(1), rtol=tol, atol=tol)
    for name, a, b in zip(("threshold", "total", "kept"), stats[:3], fallback.topk_stats(x, k)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=name)


def test_topk_stats_clip_ties_and_signed_zero():
    x = torch.tensor([[3.0, -0.0, -0.0, -1.0, 5.0]])
    stats = ash_ext.topk_stats(x, 0.4)  # k = 3: 5, 3, -0.0
    assert stats.threshold.item() == 0.0 and not torch.signbit(stats.threshold).item()
    assert stats.kept.item() == 8.0 and stats.total.item() == 7.0
    clipped = ash_ext.topk_stats(x, 0.4, clip=1.0)  # 1, 1, -0.0, -0.0, -1
    assert clipped.kept.item() == 2.0 and clipped.total.item() == 1.0 and clipped.threshold.item() == 0.0


@pytest.mark.parametrize("force_fallback", BACKENDS)
def test_ash_s_factor_is_exp_of_the_stats(force_fallback):
    x = gapped((4, 3000), seed=12)
    out = _run(force_fallback, x, 0.9, "ash-s")
    if force_fallback:
        threshold, total, kept = fallback.topk_stats(x, ash_ext.kept_count(3000, 0.9))
    else:
        threshold, total, kept, _ = ash_ext.topk_stats(x, 0.9)
    want = torch.where(x >= threshold.unsqueeze(1), x * torch.exp(total / kept).unsqueeze(1), 0.0)
    # The same sums: equal up to the last bit of exp (torch's here, the kernel's there).
    torch.testing.assert_close(out, want, rtol=2.5e-7, atol=0)
    assert torch.equal(out != 0, want != 0)


# --------------------------------------------------------------------------------------------
# Per-sample percentiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_fallback", BACKENDS)
@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s", "scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_sample_percentiles_shape_each_sample_as_its_own_call(force_fallback, variant, dtype):
    x = integer_ties((6, 3, 4, 4), torch.float32, seed=13).to(dtype)
    fractions = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0, 0.65], dtype=dtype)
    got = _run(force_fallback, x, fractions, variant)
    for b, p in enumerate(fractions.tolist()):
        assert bits_equal(got[b : b + 1], _run(force_fallback, x[b : b + 1], p, variant)), (b, p)
    stats = ash_ext.topk_stats(x, fractions)
    assert torch.equal(stats.k, torch.tensor([48 - round(48 * p) for p in fractions.tolist()]))


@pytest.mark.parametrize("force_fallback", BACKENDS)
def test_zero_dim_tensor_percentile_like_pytorch_ood(force_fallback):
    x = relu_like((3, 7, 3, 3), torch.float64, seed=14)
    for value in (0.65, 0.9):
        percentile = torch.tensor(value)  # float32, as pytorch-ood's users pass it
        got = _run(force_fallback, x, percentile, "ash-s")
        torch.testing.assert_close(got, pood_ash.ash_s(x, percentile), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            _run(force_fallback, x, percentile, "scale"), pood_scale.scale(x, percentile), rtol=1e-12, atol=1e-12
        )


def test_zero_dim_float32_percentile_rounds_in_float32():
    # n * p is rounded in the tensor's precision, as in the reference's n * percentile: for n = 100
    # and p = 0.295, the float32 product is 29.5 (k = 71), the float64 one 29.499999... (k = 70).
    x = torch.arange(100, dtype=torch.float64).reshape(1, 4, 5, 5)
    p = torch.tensor(0.295, dtype=torch.float32)
    assert ash_ext.topk_stats(x, p).k.item() == 71
    assert ash_ext.topk_stats(x, 0.295).k.item() == 70
    assert torch.equal(ash_ext.ash_p(x, p), pood_ash.ash_p(x, p))
    assert torch.equal(ash_ext.ash_p(x, 0.295), pood_ash.ash_p(x, 0.295))
    assert (ash_ext.ash_p(x, p) != 0).sum() == 71


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    clip=st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5])),
)
def test_per_sample_kernel_equals_fallback(batch, n, seed, clip):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (batch, n), generator=g).float()
    fractions = torch.rand(batch, generator=g)
    for variant in ("ash-p", "ash-b", "ash-s", "scale"):
        got = _run(False, x, fractions, variant, clip=clip)
        want = _run(True, x, fractions, variant, clip=clip)
        if variant in ("ash-p", "ash-b"):
            # integer data: every sum is exact, so the two implementations agree bit for bit
            assert bits_equal(got, want)
        else:
            # the same kept set and sums; exp may differ in the last bit (libm's vs torch's)
            assert torch.equal(got != 0, want != 0)
            torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0)


def test_bad_percentile_tensors_and_clips():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"\[B\] tensor .*B = 3.*\(2,\)"):
        ash_ext.ash_s(x, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"1.5 for sample 1"):
        ash_ext.ash_s(x, torch.tensor([0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match=r"nan for sample 2"):
        ash_ext.scale(x, torch.tensor([0.5, 0.5, float("nan")]))
    with pytest.raises(TypeError, match="int64"):
        ash_ext.ash_p(x, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="meta"):
        ash_ext.ash_p(x, torch.full((3,), 0.5, device="meta"))
    with pytest.raises(ValueError, match="2.0"):
        ash_ext.topk_stats(x, torch.tensor(2.0))
    with pytest.raises(ValueError, match="NaN"):
        ash_ext.ash_s(x, 0.5, clip=float("nan"))
    with pytest.raises(TypeError, match="clip"):
        ash_ext.ash_s(x, 0.5, clip="1.0")
    with pytest.raises(TypeError, match="clip"):
        ash_ext.scale(x, 0.5, clip=True)
    with pytest.raises(ValueError, match="p must be a fraction"):
        ash_ext.lts_factor(x, 1.5)


@needs_kernel
def test_raw_op_checks_per_sample_ks_and_bounds():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\].*\[-1, 2\]"):
        torch.ops.ash_ext.ash(x, 0, 0, torch.tensor([2, -1, 0]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        torch.ops.ash_ext.topk_stats(x, 0, torch.tensor([2, 1]))
    with pytest.raises(TypeError, match="int64"):
        torch.ops.ash_ext.ash(x, 0, 0, torch.tensor([2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.ash_ext.ash(x, 2, 0, None, None, float("nan"))
    with pytest.raises(ValueError, match="must not exceed"):
        torch.ops.ash_ext.topk_stats(x, 2, None, 1.0, 0.0)


# --------------------------------------------------------------------------------------------
# ReAct's fit: np.percentile from two selections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", [1, 2, 7, 1000, 70001])
def test_react_threshold_equals_np_percentile(dtype, size):
    g = torch.Generator().manual_seed(size)
    data = torch.randn(size, generator=g, dtype=torch.float64).to(dtype).relu()  # ties at 0
    for percentile in (0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.333, 1.0):
        want = float(np.percentile(data.numpy(), percentile * 100))
        assert ash_ext.react_threshold(data, percentile) == want, percentile


def test_react_threshold_any_shape_nan_and_errors():
    data = normal((10, 8, 3, 3), torch.float32, seed=15)
    assert ash_ext.react_threshold(data, 0.9) == float(np.percentile(data.numpy(), 90))
    data.view(-1)[17] = float("nan")
    assert math.isnan(ash_ext.react_threshold(data, 0.5))
    with pytest.raises(ValueError, match="empty"):
        ash_ext.react_threshold(torch.empty(0), 0.5)
    with pytest.raises(ValueError, match="percentile"):
        ash_ext.react_threshold(data, 90)


# --------------------------------------------------------------------------------------------
# The ops under torch.library.opcheck and torch.compile
# --------------------------------------------------------------------------------------------


@needs_kernel
def test_opcheck_new_arguments():
    x = gapped((3, 12), seed=16).requires_grad_()
    ks = torch.tensor([0, 5, 12])
    torch.library.opcheck(torch.ops.ash_ext.ash.default, (x, 0, 3, ks, None, 0.2))
    torch.library.opcheck(torch.ops.ash_ext.ash.default, (x, 4, 2, None, -0.1, None))
    # (k >= 1 here: opcheck compares outputs without equal_nan, and k = 0's threshold is NaN)
    torch.library.opcheck(torch.ops.ash_ext.topk_stats.default, (x.detach(), 0, ks.clamp(min=1), 0.0, None))
    grad = torch.ones(3, 12, dtype=x.dtype)
    torch.library.opcheck(torch.ops.ash_ext.ash_backward.default, (grad, x.detach(), 0, 3, ks))


@needs_kernel
def test_compile_with_per_sample_percentiles_and_clip():
    def f(x, p):
        return ash_ext.ash_s(x, p, clip=0.5) + ash_ext.scale(x, p)

    x = gapped((4, 30), seed=17)
    p = torch.tensor([0.1, 0.5, 0.65, 0.9])
    compiled = torch.compile(f, fullgraph=True)
    assert bits_equal(compiled(x, p), f(x, p))
