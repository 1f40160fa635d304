"""ASH's semantics: how many values are kept, which ones, and what the variants make of them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    KERNEL,
    LOW_PRECISION,
    VARIANTS,
    assert_matches_oracle,
    backend_params,
    bits_equal,
    distinct,
    integer_ties,
    kernel_available,
    needs_kernel,
    normal,
    oracle,
    oracle_k,
    relu_like,
    round_to,
    same_values,
    to_rows,
    with_specials,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ash_ext
from ash_ext import fallback

NAN = float("nan")
INF = float("inf")

# --------------------------------------------------------------------------------------------
# k
# --------------------------------------------------------------------------------------------

ROUNDING_CASES = [
    # (n, percentile, k) with n * percentile exactly at .5: half to even
    (10, 0.25, 8),  # 2.5 -> 2
    (6, 0.25, 4),  # 1.5 -> 2
    (2, 0.25, 2),  # 0.5 -> 0
    (14, 0.25, 10),  # 3.5 -> 4
    (1, 0.5, 1),  # 0.5 -> 0
    (3, 0.5, 1),  # 1.5 -> 2
    (5, 0.5, 3),  # 2.5 -> 2
    (7, 0.5, 3),  # 3.5 -> 4
    # ordinary cases
    (100, 0.65, 35),
    (2048, 0.9, 205),  # 1843.2 -> 1843
    (10, 0.0, 10),
    (10, 1.0, 0),
    (3, 0.9, 0),  # 2.7 -> 3: k == 0 below percentile 1
    (1, 0.49, 1),
]


@pytest.mark.parametrize("n, percentile, k", ROUNDING_CASES)
def test_kept_count_known_values(n, percentile, k):
    assert oracle_k(n, percentile) == k  # the table itself agrees with numpy
    assert ash_ext.kept_count(n, percentile) == k


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 10**7), percentile=st.floats(0.0, 1.0))
def test_kept_count_matches_numpy_round(n, percentile):
    assert ash_ext.kept_count(n, percentile) == n - int(np.round(n * percentile))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2000), numerator=st.integers(0, 4000))
def test_kept_count_at_exact_halves(n, numerator):
    # percentiles of the form j / (2n) put n * percentile at or near .5 boundaries
    percentile = min(1.0, numerator / (2 * n))
    assert ash_ext.kept_count(n, percentile) == n - int(np.round(n * percentile))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("n, percentile, k", ROUNDING_CASES)
def test_kernels_keep_exactly_k(backend, n, percentile, k):
    # strictly positive distinct data: the kept positions are exactly the nonzeros
    x = distinct((3, n), torch.float32, seed=n, positive=True)
    out = backend(x, percentile, "ash-p")
    assert (out != 0).sum(dim=1).tolist() == [k] * 3
    out = backend(x, percentile, "ash-b")
    assert (out != 0).sum(dim=1).tolist() == [k] * 3


# --------------------------------------------------------------------------------------------
# Which values are kept: handcrafted cases
# --------------------------------------------------------------------------------------------

# (row, k, kept indices)
SELECTION_CASES = [
    ([3, 1, 1, 1, 0], 2, [0, 1]),
    ([3, 1, 1, 1, 0], 3, [0, 1, 2]),
    ([1, 1, 1, 1], 2, [0, 1]),
    ([0, 2, 2, 5, 2], 3, [1, 2, 3]),
    ([2, 2, 5, 2, 2], 2, [0, 2]),
    ([5, 4, 3, 2, 1], 2, [0, 1]),
    ([1, 2, 3, 4, 5], 2, [3, 4]),
    ([1, NAN, INF, 5], 1, [1]),
    ([1, NAN, INF, 5], 2, [1, 2]),
    ([1, NAN, INF, 5], 3, [1, 2, 3]),
    ([NAN, 1, NAN, NAN], 2, [0, 2]),
    ([INF, NAN, INF, INF], 3, [0, 1, 2]),
    ([-INF, -1, -INF, -2], 3, [0, 1, 3]),
    ([-INF, -INF, -INF], 2, [0, 1]),
    ([-0.0, 0.0, -1], 1, [0]),
    ([0.0, -0.0, -1], 1, [0]),
    ([-1, -0.0, 0.0, -0.0], 2, [1, 2]),
    ([-2, -1, -3], 1, [1]),
    ([7, 7, 7], 0, []),
    ([7, 7, 7], 3, [0, 1, 2]),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("row, k, kept", SELECTION_CASES)
def test_selection_handcrafted(backend, dtype, row, k, kept):
    n = len(row)
    x = torch.tensor([row, row[::-1]], dtype=torch.float64).to(dtype)
    # a percentile that gives exactly k
    percentile = (n - k) / n
    assert oracle_k(n, percentile) == k
    res = oracle(x, percentile, "ash-p")
    expected_mask = np.zeros(n, dtype=bool)
    expected_mask[kept] = True
    assert np.array_equal(res.mask[0], expected_mask), "the oracle disagrees with the handcrafted case"
    out = backend(x, percentile, "ash-p")
    got = to_rows(out)
    # kept values are the input's bits (NaN stays NaN, -0.0 stays -0.0); the rest +0.0
    expected = np.where(expected_mask, np.array(row, dtype=np.float64), 0.0)
    np.testing.assert_array_equal(got[0], expected)
    assert np.array_equal(np.signbit(got[0]), np.signbit(expected))
    assert_matches_oracle(out, x, percentile, "ash-p")
    for variant in ("ash-b", "ash-s"):
        assert_matches_oracle(backend(x, percentile, variant), x, percentile, variant)


@pytest.mark.parametrize("backend", backend_params())
def test_ties_in_higher_rank_follow_logical_order(backend):
    x = torch.ones(2, 2, 3, 2)
    out = backend(x, 1 - 5 / 12, "ash-p")  # k = 5
    flat = out.reshape(2, -1)
    expected = torch.tensor([1.0] * 5 + [0.0] * 7)
    assert torch.equal(flat[0], expected) and torch.equal(flat[1], expected)


# --------------------------------------------------------------------------------------------
# k == 0, k == n
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape, percentile", [((3, 7), 1.0), ((2, 3, 1), 0.9), ((2, 4, 2, 2), 1.0)])
def test_k_zero_gives_positive_zeros(backend, variant, dtype, shape, percentile):
    x = with_specials(shape, dtype, seed=3)
    assert oracle_k(math.prod(shape[1:]), percentile) == 0
    out = backend(x, percentile, variant)
    assert out.shape == x.shape
    assert torch.all(out == 0)
    assert not torch.any(torch.signbit(out))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_k_equals_n(backend, variant, dtype):
    x = normal((4, 3, 5), dtype, seed=4)
    out = backend(x, 0.0, variant)
    assert_matches_oracle(out, x, 0.0, variant)
    if variant == "ash-p":
        assert bits_equal(out, x)


def test_k_equals_n_ash_s_is_e_times_x():
    x = relu_like((3, 6, 4), torch.float64, seed=5) + 0.5
    expected = x * math.e
    for backend_fn in (fallback.ash_s,) + ((ash_ext.ash_s,) if kernel_available() else ()):
        torch.testing.assert_close(backend_fn(x, 0.0), expected, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------------------------
# ASH-B and ASH-S constants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_ash_b_fill_is_mean_over_kept(backend, dtype):
    x = torch.tensor([[4.0, 1.0, 2.0, 3.0, -2.0, 0.0]], dtype=dtype)  # s1 = 8, k = 2 -> fill 4
    out = backend(x, 4 / 6, "ash-b")
    assert torch.equal(out, torch.tensor([[4.0, 0, 0, 4.0, 0, 0]], dtype=dtype))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_ash_s_known_factor(backend, dtype):
    # s1 = 4, kept {2, 2}: s2 = 4, factor e
    x = torch.tensor([[2.0, 1.0, -1.0, 2.0, 0.0]], dtype=dtype)
    out = backend(x, 0.6, "ash-s")
    e2 = torch.tensor(2 * math.e, dtype=torch.float64).to(dtype)
    assert torch.equal(
        out, torch.stack([e2, *[torch.zeros((), dtype=dtype)] * 2, e2, torch.zeros((), dtype=dtype)]).view(1, 5)
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_ash_s_zero_kept_sum_gives_factor_one(backend, dtype):
    # kept {2, -2} cancel: s2 == 0, the factor is 1 (not exp(-7 / 0) = 0, not NaN)
    x = torch.tensor([[2.0, -2.0, -3.0, -4.0], [-4.0, -3.0, -2.0, 2.0]], dtype=dtype)
    out = backend(x, 0.5, "ash-s")
    assert torch.equal(out, torch.tensor([[2.0, -2.0, 0, 0], [0, 0, -2.0, 2.0]], dtype=dtype))
    # every kept value zero
    x = torch.tensor([[0.0, 0.0, -1.0, -5.0]], dtype=dtype)
    out = backend(x, 0.5, "ash-s")
    assert torch.equal(out, torch.zeros_like(x)) and not torch.any(torch.isnan(out))
    assert not torch.any(torch.signbit(out))


@pytest.mark.parametrize("backend", backend_params())
def test_ash_s_half_factor_overflows_half_but_result_fits(backend):
    # k = 1 of 20 values near 1e-4: s1 / s2 ~ 19.8, exp(...) ~ 4e8 > 65504, but x * factor ~ 4e4
    values = [1e-4 * (1 - 0.002 * i) for i in range(20)]
    x = torch.tensor([values], dtype=torch.float16)
    res = oracle(x, 0.95, "ash-s")
    assert res.k == 1
    assert math.exp(res.s1[0] / res.s2[0]) > 65504
    expected = round_to(res.values, torch.float16)
    assert np.all(np.isfinite(expected)) and expected.max() > 1e4
    out = backend(x, 0.95, "ash-s")
    assert torch.all(torch.isfinite(out))
    np.testing.assert_array_equal(to_rows(out), expected)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("variant", ["ash-b", "ash-s"])
def test_half_precision_within_one_ulp(backend, dtype, variant):
    # positive distinct values: well-conditioned sums, the oracle selects the same set
    x = distinct((6, 4, 5, 5), dtype, seed=11, positive=True)
    for percentile in (0.5, 0.65, 0.9):
        assert_matches_oracle(backend(x, percentile, variant), x, percentile, variant, ulps=1.0, condition_aware=False)


# --------------------------------------------------------------------------------------------
# Larger samples (the kernel's multi-pass and multi-thread paths)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(1, 40000), (3, 70, 90)], ids=["one-big-sample", "batch"])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_large_samples(backend, shape, kind):
    if kind == "normal":
        x = normal(shape, torch.float32, seed=12)
    else:
        x = integer_ties(shape, torch.float32, seed=12, low=0, high=5)
    for variant in VARIANTS:
        assert_matches_oracle(backend(x, 0.65, variant), x, 0.65, variant)


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_samples_dtypes_kernel(dtype):
    x = integer_ties((2, 33000), dtype, seed=13, low=0, high=9)
    x[1] = relu_like((33000,), dtype, seed=14)
    for variant in VARIANTS:
        assert_matches_oracle(ash_ext.shape(x, 0.8, variant), x, 0.8, variant)


@pytest.mark.parametrize("backend", backend_params())
def test_large_value_threshold_float64(backend):
    # the k-th largest value lies in the top bucket of the float64 key space (>= 2**1023), where
    # a radix select's "first key above this digit" is 2**64 (wraps in uint64)
    x = torch.tensor([[9e307, -8e307, 1.0]], dtype=torch.float64)
    assert_matches_oracle(backend(x, 2 / 3, "ash-s"), x, 2 / 3, "ash-s")
    y = torch.tensor([[1e308, 1.7e308, -1e308, 3.0, 1.5e308]], dtype=torch.float64)
    for percentile in (0.2, 0.4, 0.6):
        for variant in VARIANTS:
            assert_matches_oracle(backend(y, percentile, variant), y, percentile, variant)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_extreme_magnitudes(backend, dtype):
    fi = torch.finfo(dtype)
    # no partial sum can overflow in any order (ASH-B sums the sample)
    values = [fi.max, -fi.max, fi.tiny, -fi.tiny, fi.tiny * fi.eps, -fi.tiny * fi.eps, 2.0, 1.0, -1.0, 0.0]
    x = torch.tensor([values, values[::-1]], dtype=torch.float64).to(dtype)
    for percentile in (0.1, 0.3, 0.5, 0.8):
        assert_matches_oracle(backend(x, percentile, "ash-p"), x, percentile, "ash-p")
        assert_matches_oracle(backend(x, percentile, "ash-b"), x, percentile, "ash-b")


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(1, 50000), (5, 3000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic(backend, shape, dtype):
    x = normal(shape, dtype, seed=15)
    for variant in VARIANTS:
        a = backend(x, 0.65, variant)
        b = backend(x.clone(), 0.65, variant)
        assert bits_equal(a, b), variant


def _mixed_batch(dtype, n, seed):
    """Samples at very different scales next to similar ones, so that a selection that reuses
    the previous sample's threshold digit both hits and misses."""
    rows = [
        normal((1, n), dtype, seed=seed),
        normal((1, n), dtype, seed=seed + 1),
        normal((1, n), dtype, seed=seed + 2, scale=300.0),
        relu_like((1, n), dtype, seed=seed + 3),
        normal((1, n), dtype, seed=seed + 4, scale=1e-3),
        integer_ties((1, n), dtype, seed=seed + 5),
        normal((1, n), dtype, seed=seed + 6),
        with_specials((1, n), dtype, seed=seed + 7),
        -relu_like((1, n), dtype, seed=seed + 8),
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n", [37, 5000])
def test_sample_result_independent_of_batch(backend, dtype, n):
    # "a sample's result depends on nothing but the sample": row b of a batch is bit-identical
    # to the sample alone, and to the sample in a batch in another order
    x = _mixed_batch(dtype, n, seed=n)
    perm = torch.tensor([5, 2, 8, 0, 7, 1, 4, 6, 3])
    for variant in VARIANTS:
        full = backend(x, 0.65, variant)
        shuffled = backend(x[perm], 0.65, variant)
        for b in range(x.shape[0]):
            alone = backend(x[b : b + 1], 0.65, variant)
            assert same_values(full[b : b + 1], alone), (variant, b)
        assert same_values(shuffled, full[perm]), variant
        assert_matches_oracle(full, x, 0.65, variant)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 70000), (2, 40000), (5, 3000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_independent_of_thread_count(restore_threads, shape, dtype):
    x = normal(shape, dtype, seed=16)
    x[:, ::7] = integer_ties((shape[0], len(range(0, shape[1], 7))), dtype, seed=17)
    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results[threads] = [ash_ext.shape(x, 0.65, v) for v in VARIANTS]
    for threads in (2, 3):
        for variant, a, b in zip(VARIANTS, results[1], results[threads]):
            assert bits_equal(a, b), (variant, threads)
    for variant, out in zip(VARIANTS, results[1]):
        assert_matches_oracle(out, x, 0.65, variant)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

DATA_GENERATORS = {
    "normal": normal,
    "relu": relu_like,
    "ties": integer_ties,
    "specials": with_specials,
}


@st.composite
def cases(draw, kinds=tuple(DATA_GENERATORS)):
    rank = draw(st.integers(2, 5))
    batch = draw(st.integers(0, 5))
    sample = tuple(draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)))
    if rank == 2:
        sample = (draw(st.integers(1, 40)),)
    percentile = draw(
        st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.65, 0.9, 1.0]), st.floats(0.0, 1.0, allow_nan=False))
    )
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**16))
    x = DATA_GENERATORS[kind]((batch,) + sample, dtype, seed=seed)
    return x, percentile, kind


def _ash_s_in_range(x: torch.Tensor, percentile: float) -> bool:
    """Whether ASH-S stays clear of overflow for x: |s1/s2| small enough that exp is finite in
    float32 and results well below the dtype's largest value."""
    res = oracle(x, percentile, "ash-s")
    with np.errstate(all="ignore"):
        ratio = np.where(res.s2 == 0, 0.0, res.s1 / res.s2)
    finite_ratio = ratio[np.isfinite(ratio)]
    if finite_ratio.size and np.abs(finite_ratio).max() > 60:
        return False
    finite_vals = np.abs(res.values[np.isfinite(res.values)])
    return not (finite_vals.size and finite_vals.max() > 0.25 * torch.finfo(x.dtype).max)


@needs_kernel
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_property_kernel_matches_oracle_and_fallback(case):
    x, percentile, _ = case
    x_before = x.clone()
    p_kernel = ash_ext.ash_p(x, percentile)
    p_fallback = fallback.ash_p(x, percentile)
    assert same_values(p_kernel, p_fallback), "ASH-P: kernel and fallback differ"
    assert_matches_oracle(p_kernel, x, percentile, "ash-p")
    assert_matches_oracle(ash_ext.ash_b(x, percentile), x, percentile, "ash-b")
    if _ash_s_in_range(x, percentile):
        assert_matches_oracle(ash_ext.ash_s(x, percentile), x, percentile, "ash-s")
    assert same_values(x, x_before), "the input was modified"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_property_fallback_matches_oracle(case):
    x, percentile, _ = case
    assert_matches_oracle(fallback.ash_p(x, percentile), x, percentile, "ash-p")
    assert_matches_oracle(fallback.ash_b(x, percentile), x, percentile, "ash-b")
    if _ash_s_in_range(x, percentile):
        assert_matches_oracle(fallback.ash_s(x, percentile), x, percentile, "ash-s")


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(case=cases(kinds=("normal", "relu", "ties")), variant=st.sampled_from(VARIANTS))
def test_property_kernel_inplace_matches_out_of_place(case, variant):
    x, percentile, _ = case
    expected = ash_ext.shape(x, percentile, variant)
    y = x.clone()
    out = ash_ext.shape(y, percentile, variant, inplace=True)
    assert out is y
    assert same_values(y, expected)


def test_kernel_backend_is_the_compiled_kernel():
    if not kernel_available():
        pytest.skip("the compiled extension is not loaded")
    assert KERNEL.ash_p is ash_ext.ash_p
    assert ash_ext.implementation_for(torch.zeros(2, 2)) == "cpu-kernel"


@needs_kernel
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    n=st.integers(1, 12000),
    percentile=st.floats(0.0, 1.0),
    dtype=st.sampled_from(FLOAT_DTYPES),
    kind=st.sampled_from(["normal", "relu", "ties"]),
    seed=st.integers(0, 2**16),
)
def test_property_kernel_longer_samples(batch, n, percentile, dtype, kind, seed):
    # samples over several of the kernel's summation blocks
    x = DATA_GENERATORS[kind]((batch, n), dtype, seed=seed)
    p_kernel = ash_ext.ash_p(x, percentile)
    assert same_values(p_kernel, fallback.ash_p(x, percentile))
    assert_matches_oracle(p_kernel, x, percentile, "ash-p")
    assert_matches_oracle(ash_ext.ash_b(x, percentile), x, percentile, "ash-b")
    if _ash_s_in_range(x, percentile):
        assert_matches_oracle(ash_ext.ash_s(x, percentile), x, percentile, "ash-s")
