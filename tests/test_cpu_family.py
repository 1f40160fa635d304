"""The CPU kernel's shaping family on the raw ops: per-sample k, clamp bounds, SCALE (variant 3)
and topk_stats, against a reference written here in plain PyTorch from the kernel spec.

The reference selects with a stable descending sort (NaN first, -0.0 tied with +0.0, ties kept
in logical order) and sums in float64. Where the kernel's own sums decide the result (ASH-S's
and SCALE's factor), the exact check rebuilds the output from topk_stats' total and kept with
libm's exp -- what the kernel calls -- so that it is bit for bit; the float64 reference then
bounds the sums themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import pytest
import torch
from conftest import FLOAT_DTYPES, bits_equal, gapped, integer_ties, normal, same_values, with_specials
from hypothesis import given, settings
from hypothesis import strategies as st

import ash_ext  # noqa: F401  (registers the ops)

OPS = torch.ops.ash_ext
PRUNE, BINARIZE, SCALE_S, SCALE_UNPRUNED = 0, 1, 2, 3
ALL_VARIANTS = (PRUNE, BINARIZE, SCALE_S, SCALE_UNPRUNED)

pytestmark = pytest.mark.skipif(
    not ash_ext.extension_loaded(), reason="the compiled extension is not built: no CPU kernel to test"
)

_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
_LIBM.expf.restype = ctypes.c_float
_LIBM.expf.argtypes = [ctypes.c_float]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as [B, n] float64 in logical (row-major) order, whatever its memory layout."""
    return x.to(torch.float64).reshape(x.shape[0], -1)


def ref_mask(x: torch.Tensor, ks) -> torch.Tensor:
    """[B, n] bool: the k_b largest of each sample, ties to the smaller logical index."""
    rows = rows_of(x)
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    for b, k in enumerate(ks):
        order = torch.sort(rows[b], descending=True, stable=True).indices
        mask[b, order[: int(k)]] = True
    return mask


def ref_factor(s1: float, s2: float) -> float:
    """scale_factor: exp(s1 / s2), or for s2 == 0 the constant 0 (s1 < 0) or 1."""
    if s2 == 0:
        return 0.0 if s1 < 0 else 1.0
    return libm_exp(s1 / s2)


def libm_exp(q: float) -> float:
    """exp as C's exp gives it (math.exp calls it, but raises where C returns inf)."""
    try:
        return math.exp(q)
    except OverflowError:
        return math.inf


def kernel_factor(total: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """scale_factor evaluated as the kernel does, in the accumulation dtype of total and kept."""
    quotient = total / kept  # IEEE division in that dtype, as in C++
    values = []
    for s1, s2, q in zip(total.tolist(), kept.tolist(), quotient.tolist()):
        if s2 == 0:
            values.append(0.0 if s1 < 0 else 1.0)
        elif total.dtype == torch.float32:
            values.append(_LIBM.expf(q))
        else:
            values.append(libm_exp(q))
    return torch.tensor(values, dtype=total.dtype)


def ref_stats(x: torch.Tensor, ks):
    """(threshold, s1, s2) per sample in float64 (threshold: NaN where k == 0, -0.0 as +0.0)."""
    rows = rows_of(x)
    mask = ref_mask(x, ks)
    thresholds = []
    for b, k in enumerate(ks):
        if int(k) == 0:
            thresholds.append(math.nan)
        else:
            kth = torch.sort(rows[b], descending=True, stable=True).values[int(k) - 1].item()
            thresholds.append(kth + 0.0)  # -0.0 + 0.0 == +0.0
    s1 = rows.sum(1)
    s2 = torch.where(mask, rows, torch.zeros((), dtype=torch.float64)).sum(1)
    return torch.tensor(thresholds, dtype=torch.float64), s1, s2


def expected_from_stats(x: torch.Tensor, ks, variant: int) -> torch.Tensor:
    """The exact output of ASH-S or SCALE given the kernel's own total and kept (topk_stats)."""
    _, total, kept = OPS.topk_stats(x, 0, torch.tensor(ks, dtype=torch.long))
    factor = kernel_factor(total, kept)
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    scaled = (x.to(total.dtype) * factor.reshape(shape)).to(x.dtype)
    if variant == SCALE_UNPRUNED:
        return scaled
    mask = ref_mask(x, ks).reshape(x.shape)
    return torch.where(mask, scaled, torch.zeros((), dtype=x.dtype))


def ref_output(x: torch.Tensor, ks, variant: int) -> torch.Tensor:
    """float64 reference output, in x's shape (logical order)."""
    rows = rows_of(x)
    mask = ref_mask(x, ks)
    zero = torch.zeros((), dtype=torch.float64)
    _, s1, s2 = ref_stats(x, ks)
    out = torch.empty_like(rows)
    for b, k in enumerate(ks):
        k = int(k)
        if variant == PRUNE:
            out[b] = torch.where(mask[b], rows[b], zero)
        elif variant == BINARIZE:
            out[b] = torch.where(mask[b], s1[b] / k, zero) if k else zero
        else:
            factor = ref_factor(s1[b].item(), s2[b].item())
            scaled = rows[b] * factor
            out[b] = scaled if variant == SCALE_UNPRUNED else torch.where(mask[b], scaled, zero)
    return out.reshape(x.shape)


def tolerance(dtype: torch.dtype, n: int) -> dict:
    """Room for the kernel's rounding: sums in float32 over n values, one rounding to dtype."""
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23, torch.float64: 2**-52}[dtype]
    acc_eps = 2**-52 if dtype == torch.float64 else 2**-23
    return dict(rtol=2 * eps + 64 * acc_eps * math.sqrt(n), atol=1e-6 if dtype != torch.float64 else 1e-12)


def assert_close_to_reference(actual: torch.Tensor, x: torch.Tensor, ks, variant: int) -> None:
    expected = ref_output(x, ks, variant)
    n = x[0].numel()
    torch.testing.assert_close(actual.to(torch.float64), expected, equal_nan=True, **tolerance(x.dtype, n))


def per_sample_ks(batch: int, n: int, seed: int = 0) -> list[int]:
    """Mixed ks: 0, n, 1 and random ones."""
    g = torch.Generator().manual_seed(seed)
    fixed = [0, n, 1, n // 2]
    rest = torch.randint(0, n + 1, (max(0, batch - len(fixed)),), generator=g).tolist()
    return (fixed + rest)[:batch]


def ks_tensor(ks) -> torch.Tensor:
    return torch.tensor(ks, dtype=torch.long)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Per-sample k
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("data", [integer_ties, normal, with_specials])
def test_per_sample_k_matches_reference(dtype, variant, data):
    batch, n = 9, 300
    x = data((batch, n), dtype=dtype, seed=3)
    ks = per_sample_ks(batch, n, seed=1)
    out = OPS.ash(x, 0, variant, ks_tensor(ks))
    mask = ref_mask(x, ks)
    if variant == PRUNE:
        assert bits_equal(out, torch.where(mask, x, torch.zeros((), dtype=dtype)))
    elif variant in (SCALE_S, SCALE_UNPRUNED):
        assert same_values(out, expected_from_stats(x, ks, variant))
    if data is not with_specials:  # the float64 sums of infinities and NaN are compared elsewhere
        assert_close_to_reference(out, x, ks, variant)
    # Dropped elements are +0.0 (ASH-P/B/S), k == 0 samples included.
    if variant != SCALE_UNPRUNED:
        dropped = out.masked_select(~mask)
        assert bits_equal(dropped, torch.zeros_like(dropped))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_per_sample_k_rows_are_independent(dtype, variant):
    """Sample b's result is the result of that sample alone with k = k_b (uniform k path)."""
    batch, n = 7, 513
    x = with_specials((batch, n), dtype=dtype, seed=5)
    ks = per_sample_ks(batch, n, seed=2)
    out = OPS.ash(x, 0, variant, ks_tensor(ks))
    threshold, total, kept = OPS.topk_stats(x, 0, ks_tensor(ks))
    for b, k in enumerate(ks):
        alone = OPS.ash(x[b : b + 1], k, variant)
        assert same_values(out[b : b + 1], alone), (b, k)
        t, s1, s2 = OPS.topk_stats(x[b : b + 1], k)
        assert same_values(threshold[b : b + 1], t) and same_values(total[b : b + 1], s1)
        assert same_values(kept[b : b + 1], s2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_uniform_ks_equal_uniform_k(dtype, variant):
    batch, n = 6, 1000
    x = normal((batch, n), dtype=dtype, seed=7)
    for k in (0, 1, 137, n):
        ks = torch.full((batch,), k, dtype=torch.long)
        assert same_values(OPS.ash(x, 0, variant, ks), OPS.ash(x, k, variant))
        assert same_values(OPS.ash_backward(x, x, 0, variant, ks), OPS.ash_backward(x, x, k, variant))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_per_sample_k_in_place(variant):
    batch, n = 5, 400
    x = integer_ties((batch, n), seed=11)
    ks = per_sample_ks(batch, n, seed=4)
    expected = OPS.ash(x, 0, variant, ks_tensor(ks))
    y = x.clone()
    OPS.ash_(y, 0, variant, ks_tensor(ks))
    assert same_values(y, expected)


def test_per_sample_k_range_is_checked():
    x = normal((3, 10))
    with pytest.raises(ValueError):
        OPS.ash(x, 0, 0, ks_tensor([1, 11, 2]))
    with pytest.raises(ValueError):
        OPS.topk_stats(x, 0, ks_tensor([1, -1, 2]))


# --------------------------------------------------------------------------------------------
# Clamp
# --------------------------------------------------------------------------------------------

CLAMPS = [
    (None, 1.0),
    (-0.5, None),
    (-0.5, 1.0),
    (0.0, None),
    (None, 0.0),
    (-0.0, 0.0),
    (0.3, 0.3),
    (-math.inf, math.inf),  # given, but clamping nothing
    (-math.inf, 2.0),
]


def clamp_input(dtype: torch.dtype, seed: int = 0, shape=(6, 700)) -> torch.Tensor:
    """Specials (NaN, +-inf, -0.0), values equal to the bounds used here, and ties."""
    x = with_specials(shape, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(shape, generator=g)
    for bound, (lo, hi) in zip((1.0, -0.5, 0.3, -0.0), ((0.0, 0.04), (0.04, 0.08), (0.08, 0.12), (0.12, 0.16))):
        x = torch.where((u >= lo) & (u < hi), torch.tensor(bound, dtype=dtype), x)
    return x


def torch_clamp(x: torch.Tensor, low, high) -> torch.Tensor:
    return x if low is None and high is None else x.clamp(min=low, max=high)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("low,high", CLAMPS)
def test_clamp_is_clamp_then_ash(dtype, variant, low, high):
    """ash(x, clamp) == ash(x.clamp(lo, hi)) bit for bit, out of place and in place."""
    x = clamp_input(dtype, seed=2)
    ks = per_sample_ks(x.shape[0], x.shape[1], seed=6)
    clamped = torch_clamp(x, low, high)
    expected = OPS.ash(clamped, 0, variant, ks_tensor(ks))
    assert same_values(OPS.ash(x, 0, variant, ks_tensor(ks), low, high), expected)
    y = x.clone()
    OPS.ash_(y, 0, variant, ks_tensor(ks), low, high)
    assert same_values(y, expected)
    # Uniform k too (the path without k_per_sample).
    assert same_values(OPS.ash(x, 50, variant, None, low, high), OPS.ash(clamped, 50, variant))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("low,high", CLAMPS)
def test_clamp_keeps_the_clamped_values(dtype, low, high):
    """ASH-P's output is the clamped input where kept; NaN stays NaN, -0.0 stays -0.0."""
    x = clamp_input(dtype, seed=4)
    n = x.shape[1]
    out = OPS.ash(x, n, PRUNE, None, low, high)  # everything kept
    assert same_values(out, torch_clamp(x, low, high))
    assert torch.isnan(out).equal(torch.isnan(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("low,high", CLAMPS)
def test_clamped_stats(dtype, low, high):
    x = clamp_input(dtype, seed=8)
    ks = per_sample_ks(x.shape[0], x.shape[1], seed=9)
    stats = OPS.topk_stats(x, 0, ks_tensor(ks), low, high)
    expected = OPS.topk_stats(torch_clamp(x, low, high), 0, ks_tensor(ks))
    for got, want in zip(stats, expected):
        assert same_values(got, want)
    # topk_stats does not write its input.
    assert same_values(x, clamp_input(dtype, seed=8))


def test_clamp_bounds_round_as_torch_clamp():
    # 0.1 is not a float16: the bound is rounded to float, then to half, as torch.clamp does it.
    x = torch.tensor([[0.0999, 0.1, 0.10001, 0.2, -1.0]], dtype=torch.float16)
    assert same_values(OPS.ash(x, 5, PRUNE, None, None, 0.1), x.clamp(max=0.1))
    assert same_values(OPS.ash(x, 5, PRUNE, None, 0.1, None), x.clamp(min=0.1))


# --------------------------------------------------------------------------------------------
# SCALE and ASH-S's factor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", [SCALE_S, SCALE_UNPRUNED])
def test_factor_is_exp_total_over_kept(dtype, variant):
    """ASH-S's output == keep * x * exp(total / kept) and SCALE's == x * exp(total / kept), bit
    for bit, with total and kept from topk_stats."""
    for shape, seed in (((8, 2048), 0), ((3, 64, 7, 7), 1), ((2, 40000), 2)):
        x = normal(shape, dtype=dtype, seed=seed).relu() - 0.1
        n = x[0].numel()
        ks = per_sample_ks(shape[0], n, seed=seed)
        out = OPS.ash(x, 0, variant, ks_tensor(ks))
        assert same_values(out, expected_from_stats(x, ks, variant)), shape
        # Against float64 only where exp(s1 / s2) is in the float32 range (k = 1 samples are
        # not: their factor is inf in float32, which the exact check above covers).
        _, s1, s2 = ref_stats(x, ks)
        in_range = [b for b in range(shape[0]) if s2[b] == 0 or abs(s1[b] / s2[b]) < 80]
        assert len(in_range) >= shape[0] - 2
        assert_close_to_reference(out[in_range], x[in_range], [ks[b] for b in in_range], variant)


def test_scale_zero_kept_sum_rule():
    """A kept sum of 0 makes the factor 0 where s1 < 0, else 1 (k == 0 included)."""
    x = torch.tensor(
        [
            [0.0, 0.0, -1.0, -2.0],  # k = 2 keeps {0, 0}: s1 < 0 -> 0
            [0.0, 0.0, 0.0, 0.0],  # k = 2: s1 = 0 -> 1
            [1.0, -1.0, -1.0, -5.0],  # k = 2 keeps {1, -1}, which cancel: s1 < 0 -> 0
            [-1.0, 2.0, -3.0, 0.5],  # k = 0: s1 < 0 -> 0
            [1.0, 2.0, -3.0, 0.5],  # k = 0: s1 > 0 -> 1
        ]
    )
    ks = ks_tensor([2, 2, 2, 0, 0])
    factors = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]).unsqueeze(1)
    assert same_values(OPS.ash(x, 0, SCALE_UNPRUNED, ks), x * factors)
    mask = ref_mask(x, ks.tolist())
    assert same_values(OPS.ash(x, 0, SCALE_S, ks), torch.where(mask, x * factors, torch.zeros(())))
    _, total, kept = OPS.topk_stats(x, 0, ks)
    assert bits_equal(kept, torch.zeros(5)) and total.tolist() == [-3.0, 0.0, -6.0, -1.5, 0.5]


def test_scale_nonfinite_factor_follows_ieee():
    # k = 1 keeps one 1.0 of 199: s1 / s2 = 199, exp overflows float32 -> inf; 0 * inf = NaN.
    x = torch.cat([torch.ones(199), torch.zeros(1)]).unsqueeze(0)
    out = OPS.ash(x, 1, SCALE_UNPRUNED)
    assert torch.isinf(out[0, :199]).all() and torch.isnan(out[0, 199])
    assert same_values(out, expected_from_stats(x, [1], SCALE_UNPRUNED))
    s = OPS.ash(x, 1, SCALE_S)
    assert torch.isinf(s[0, 0]) and bits_equal(s[0, 1:], torch.zeros(199))
    # The other way: exp(-199) underflows to 0.
    assert same_values(OPS.ash(-x, 1, SCALE_UNPRUNED), expected_from_stats(-x, [1], SCALE_UNPRUNED))


# --------------------------------------------------------------------------------------------
# topk_stats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("data", [integer_ties, normal, with_specials])
def test_stats_match_reference(dtype, data):
    batch, n = 10, 777
    x = data((batch, n), dtype=dtype, seed=12)
    ks = per_sample_ks(batch, n, seed=13)
    threshold, total, kept = OPS.topk_stats(x, 0, ks_tensor(ks))
    assert threshold.dtype == dtype and total.dtype == acc_dtype(dtype) and kept.dtype == acc_dtype(dtype)
    ref_threshold, s1, s2 = ref_stats(x, ks)
    assert same_values(threshold, ref_threshold.to(dtype))
    assert torch.isnan(threshold[0]) and kept[0].item() == 0  # k == 0
    if data is not with_specials:
        tol = tolerance(dtype, n)
        torch.testing.assert_close(total.double(), s1, rtol=tol["rtol"], atol=1e-4)
        torch.testing.assert_close(kept.double(), s2, rtol=tol["rtol"], atol=1e-4)
    else:
        assert torch.isnan(total).equal(torch.isnan(s1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_threshold_canonical(dtype):
    x = torch.tensor([[-0.0, -0.0, -1.0], [float("nan"), 1.0, 2.0], [-0.0, 0.0, -0.0]], dtype=dtype)
    threshold, _, _ = OPS.topk_stats(x, 1)
    assert bits_equal(threshold[0:1], torch.zeros(1, dtype=dtype))  # -0.0 reads +0.0
    assert torch.isnan(threshold[1])
    threshold, _, _ = OPS.topk_stats(x, 0, ks_tensor([2, 3, 0]))
    assert threshold[0].item() == 0.0 and not torch.signbit(threshold[0])
    assert threshold[1].item() == 1.0 and torch.isnan(threshold[2])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stats_total_and_kept_are_ash_s_sums(dtype):
    """ASH-B's fill is total / k: the same s1 (bit for bit)."""
    batch, n = 6, 5000
    x = normal((batch, n), dtype=dtype, seed=14)
    ks = [1, 10, 100, 2500, 4999, 5000]
    _, total, _ = OPS.topk_stats(x, 0, ks_tensor(ks))
    out = OPS.ash(x, 0, BINARIZE, ks_tensor(ks))
    mask = ref_mask(x, ks)
    for b, k in enumerate(ks):
        fill = (total[b] / k).to(dtype)
        assert same_values(out[b][mask[b]], fill.expand(k))


def test_stats_k_equal_n():
    x = normal((4, 16))
    threshold, total, kept = OPS.topk_stats(x, 16)
    assert same_values(total, kept)  # everything kept: the same sums in the same order
    assert same_values(threshold, rows_of(x).min(1).values.float())


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


class AshKernel(torch.autograd.Function):
    """The raw forward op with the raw backward op as its gradient."""

    @staticmethod
    def forward(ctx, x, ks, variant):
        ctx.save_for_backward(x, ks)
        ctx.variant = variant
        return OPS.ash(x, 0, variant, ks)

    @staticmethod
    def backward(ctx, grad):
        x, ks = ctx.saved_tensors
        return OPS.ash_backward(grad.contiguous(), x, 0, ctx.variant, ks), None, None


def ref_differentiable(x: torch.Tensor, ks, variant: int) -> torch.Tensor:
    """The shaping as a differentiable PyTorch expression, the mask fixed at x's selection."""
    rows = x.reshape(x.shape[0], -1)
    mask = ref_mask(x.detach(), ks).to(x.dtype)
    s1 = rows.sum(1, keepdim=True)
    s2 = (rows * mask).sum(1, keepdim=True)
    out = []
    for b, k in enumerate(ks):
        if variant == PRUNE:
            out.append(rows[b] * mask[b])
        elif variant == BINARIZE:
            out.append(mask[b] * (s1[b] / k) if k else rows[b] * 0)
        elif s2[b].item() == 0:
            # The constant factor (0 or 1): no gradient through it.
            factor = ref_factor(s1[b].item(), 0.0)
            out.append(rows[b] * factor * (mask[b] if variant == SCALE_S else 1))
        else:
            scaled = rows[b] * torch.exp(s1[b] / s2[b])
            out.append(scaled * mask[b] if variant == SCALE_S else scaled)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_backward_gradcheck(variant):
    """float64: the kernel's backward against finite differences of its forward."""
    x = gapped((5, 24), seed=21).requires_grad_()
    ks = ks_tensor([0, 1, 7, 24, 12])
    assert torch.autograd.gradcheck(lambda t: AshKernel.apply(t, ks, variant), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_formula(variant, dtype):
    batch, n = 6, 300
    # float32: data centred on 0, so that exp(s1 / s2) stays well inside float32's range.
    x = gapped((batch, n), seed=22, positive_bias=dtype == torch.float64).to(dtype)
    grad = normal((batch, n), dtype=dtype, seed=23)
    ks = per_sample_ks(batch, n, seed=24)
    got = OPS.ash_backward(grad, x, 0, variant, ks_tensor(ks))
    x64 = x.double().requires_grad_()
    (expected,) = torch.autograd.grad(ref_differentiable(x64, ks, variant), x64, grad.double())
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_zero_kept_sum(dtype):
    """s2 == 0: ASH-S's gradient is factor * m * g, SCALE's factor * g (factor 0 or 1)."""
    x = torch.tensor(
        [
            [0.0, 0.0, -1.0, -2.0],  # k = 2 keeps {0, 0}: s1 < 0 -> factor 0
            [0.0, 0.0, 0.0, 0.0],  # k = 2: s1 = 0 -> 1
            [0.0, 0.0, 1.0, -2.0],  # k = 0: s1 < 0 -> 0
            [0.0, 0.0, 1.0, 2.0],  # k = 0: s1 > 0 -> 1
        ],
        dtype=dtype,
    )
    ks = ks_tensor([2, 2, 0, 0])
    grad = torch.tensor([[1.0, -2.0, 3.0, 4.0]], dtype=dtype).expand(4, 4).contiguous()
    factors = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype).unsqueeze(1)
    mask = ref_mask(x, ks.tolist())
    g_s = OPS.ash_backward(grad, x, 0, SCALE_S, ks)
    assert same_values(g_s, torch.where(mask, grad * factors, torch.zeros((), dtype=dtype)))
    g_u = OPS.ash_backward(grad, x, 0, SCALE_UNPRUNED, ks)
    assert same_values(g_u, grad * factors)


# --------------------------------------------------------------------------------------------
# Layouts, long samples split over threads, short samples
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_channels_last(dtype, variant):
    x = integer_ties((5, 16, 6, 7), dtype=dtype, seed=31)
    xc = x.contiguous(memory_format=torch.channels_last)
    n = x[0].numel()
    ks = per_sample_ks(5, n, seed=32)
    out = OPS.ash(xc, 0, variant, ks_tensor(ks), -2.0, 2.0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert same_values(out.contiguous(), OPS.ash(x, 0, variant, ks_tensor(ks), -2.0, 2.0))
    clamped = torch_clamp(x, -2.0, 2.0)
    if variant == PRUNE:  # the tie rule in logical order, not memory order
        expected = torch.where(ref_mask(clamped, ks).reshape(x.shape), clamped, torch.zeros((), dtype=dtype))
        assert same_values(out.contiguous(), expected)
    y = xc.clone()
    OPS.ash_(y, 0, variant, ks_tensor(ks), -2.0, 2.0)
    assert same_values(y.contiguous(), out.contiguous())
    stats = OPS.topk_stats(xc, 0, ks_tensor(ks), -2.0, 2.0)
    for got, want in zip(stats, OPS.topk_stats(x, 0, ks_tensor(ks), -2.0, 2.0)):
        # threshold and s2 depend only on the values and the logical tie rule; s1's order is the
        # memory order, so compare within rounding.
        torch.testing.assert_close(got, want, equal_nan=True)
    grad = normal(x.shape, dtype=dtype, seed=33)
    gx = OPS.ash_backward(grad.contiguous(memory_format=torch.channels_last), xc, 0, variant, ks_tensor(ks))
    mask = ref_mask(x, ks).reshape(x.shape)
    if variant == PRUNE:
        assert same_values(gx.contiguous(), torch.where(mask, grad, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_long_samples_split_over_threads(two_threads, dtype, variant):
    """A batch smaller than the thread count splits each sample over the threads: the result is
    the one the sample gets unsplit (in a batch of several samples)."""
    n = 16384 * 2 * 2 + 777
    x = clamp_input(dtype, seed=41, shape=(3, n))
    ks = [n // 10, 0, n]
    for b, k in enumerate(ks):
        split = OPS.ash(x[b : b + 1], k, variant, None, -0.5, 1.0)  # one sample: split
        whole = OPS.ash(x, 0, variant, ks_tensor(ks), -0.5, 1.0)[b : b + 1]
        assert same_values(split, whole), (b, k)
        for got, want in zip(
            OPS.topk_stats(x[b : b + 1], k, None, -0.5, 1.0), OPS.topk_stats(x, 0, ks_tensor(ks), -0.5, 1.0)
        ):
            assert same_values(got, want[b : b + 1])
        y = x[b : b + 1].clone()
        OPS.ash_(y, k, variant, None, -0.5, 1.0)
        assert same_values(y, whole)
    clamped = torch_clamp(x, -0.5, 1.0)
    mask = ref_mask(clamped, ks)
    if variant == PRUNE:
        out = OPS.ash(x, 0, variant, ks_tensor(ks), -0.5, 1.0)
        assert same_values(out, torch.where(mask, clamped, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_long_sample_scale_split(two_threads, dtype):
    n = 16384 * 2 * 2 + 5
    x = normal((1, n), dtype=dtype, seed=42)
    for k in (0, 1, n // 3, n):
        out = OPS.ash(x, k, SCALE_UNPRUNED)
        assert same_values(out, expected_from_stats(x, [k], SCALE_UNPRUNED))
        assert_close_to_reference(out, x, [k], SCALE_UNPRUNED)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 17])
def test_short_samples(dtype, n):
    x = with_specials((40, n), dtype=dtype, seed=n)
    ks = torch.randint(0, n + 1, (40,), generator=torch.Generator().manual_seed(n)).tolist()
    for variant in ALL_VARIANTS:
        out = OPS.ash(x, 0, variant, ks_tensor(ks), -1.0, None)
        assert same_values(out, OPS.ash(torch_clamp(x, -1.0, None), 0, variant, ks_tensor(ks)))
        if variant == PRUNE:
            c = torch_clamp(x, -1.0, None)
            assert same_values(out, torch.where(ref_mask(c, ks), c, torch.zeros((), dtype=dtype)))
    threshold, _, _ = OPS.topk_stats(x, 0, ks_tensor(ks), -1.0, None)
    assert same_values(threshold, ref_stats(torch_clamp(x, -1.0, None), ks)[0].to(dtype))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_BOUNDS = st.one_of(st.none(), st.sampled_from([-1.0, -0.0, 0.0, 0.5, 1.0, 2.0]))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5),
    n=st.integers(1, 300),
    dtype=st.sampled_from(FLOAT_DTYPES),
    variant=st.sampled_from(ALL_VARIANTS),
    low=_BOUNDS,
    high=_BOUNDS,
    seed=st.integers(0, 2**16),
    inplace=st.booleans(),
)
def test_property_clamped_per_sample(batch, n, dtype, variant, low, high, seed, inplace):
    if low is not None and high is not None and low > high:
        low, high = high, low
    x = clamp_input(dtype, seed=seed, shape=(batch, n))
    ks = torch.randint(0, n + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
    if inplace:
        out = x.clone()
        OPS.ash_(out, 0, variant, ks_tensor(ks), low, high)
    else:
        out = OPS.ash(x, 0, variant, ks_tensor(ks), low, high)
    clamped = torch_clamp(x, low, high)
    assert same_values(out, OPS.ash(clamped, 0, variant, ks_tensor(ks)))
    if variant == PRUNE:
        assert same_values(out, torch.where(ref_mask(clamped, ks), clamped, torch.zeros((), dtype=dtype)))
    elif variant in (SCALE_S, SCALE_UNPRUNED):
        assert same_values(out, expected_from_stats(clamped, ks, variant))
    threshold, _, _ = OPS.topk_stats(x, 0, ks_tensor(ks), low, high)
    assert same_values(threshold, ref_stats(clamped, ks)[0].to(dtype))


# --------------------------------------------------------------------------------------------
# The AVX-512 loops against the portable ones (CPUs with AVX-512F only)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ash_ext.cpu_simd_available(), reason="the CPU has no AVX-512F: only the portable loops exist")
@pytest.mark.parametrize("n", [37, 2048, 16384 * 2 * 2 + 19])
def test_family_simd_matches_portable(two_threads, n):
    """Per-sample k, clamp, SCALE, topk_stats and the backward: bit for bit on both paths."""
    x = clamp_input(torch.float32, seed=n, shape=(3, n))
    ks = ks_tensor([n // 7, 0, n])
    grad = normal((3, n), seed=n + 1)

    def run_all():
        results = []
        for variant in ALL_VARIANTS:
            results.append(OPS.ash(x, 0, variant, ks))
            results.append(OPS.ash(x, 0, variant, ks, -0.5, 1.0))
            results.append(OPS.ash(x[:1], n // 3, variant, None, -0.0, None))  # one sample: split
            results.append(OPS.ash_backward(grad, torch_clamp(x, -0.5, 1.0), 0, variant, ks))
        results.extend(OPS.topk_stats(x, 0, ks, -0.5, 1.0))
        results.extend(OPS.topk_stats(x[:1], n // 3, None, None, 0.3))
        return results

    outputs = []
    for simd in (True, False):
        previous = ash_ext.set_cpu_simd(simd)
        try:
            outputs.append(run_all())
        finally:
            ash_ext.set_cpu_simd(previous)
    for i, (a, b) in enumerate(zip(*outputs)):
        assert same_values(a, b), i
