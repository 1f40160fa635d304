"""The CPU kernel's AVX-512 loops (float32) against its portable loops: identical results.

The AVX-512 loops compare floats instead of keys where that is exact, gather values instead of
keys, and carry a window guess from one call to the next; each of those has edge cases (NaN
and infinite thresholds or window bounds, -0.0, ties cut at any lane, partial last registers,
misses), which the inputs below reach. Outputs are compared bit for bit, signed zeros included;
only a NaN's payload may differ between the two versions (x86 keeps the first operand's payload
when adding two NaNs, and the compiler may order the portable loop's operands either way), so
NaN compares equal to NaN.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_matches_oracle, bits_equal, same_values
from hypothesis import given, settings
from hypothesis import strategies as st

import ash_ext

pytestmark = pytest.mark.skipif(
    not ash_ext.cpu_simd_available(),
    reason="the CPU has no AVX-512F (or the extension is not built): only the portable loops exist",
)

FUNCTIONS = {"ash-p": ash_ext.ash_p, "ash-b": ash_ext.ash_b, "ash-s": ash_ext.ash_s}


def run_both(variant: str, x: torch.Tensor, percentile: float, inplace: bool = False) -> tuple[torch.Tensor, ...]:
    """The variant's output with the AVX-512 loops and with the portable ones."""
    fn = FUNCTIONS[variant]
    outputs = []
    for simd in (True, False):
        previous = ash_ext.set_cpu_simd(simd)
        try:
            assert ash_ext.cpu_simd_enabled() == simd
            source = x.clone() if inplace else x
            outputs.append(fn(source, percentile, inplace=inplace))
        finally:
            ash_ext.set_cpu_simd(previous)
    return tuple(outputs)


def assert_same_bits(x: torch.Tensor, percentile: float, variant: str) -> None:
    simd, portable = run_both(variant, x, percentile)
    assert simd.stride() == portable.stride()
    assert same_values(simd, portable), (variant, percentile, x.shape)


def special_mix(n_rows: int, n: int, seed: int) -> torch.Tensor:
    """Rows mixing normal values, zeros of both signs, infinities, NaN, subnormals and repeats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n, generator=g)
    pick = torch.rand(n_rows, n, generator=g)
    x[pick < 0.05] = 0.0
    x[(pick >= 0.05) & (pick < 0.1)] = -0.0
    x[(pick >= 0.1) & (pick < 0.12)] = float("inf")
    x[(pick >= 0.12) & (pick < 0.14)] = float("-inf")
    x[(pick >= 0.14) & (pick < 0.16)] = float("nan")
    x[(pick >= 0.16) & (pick < 0.18)] = 1e-40  # subnormal
    x[(pick >= 0.18) & (pick < 0.25)] = 0.5
    return x


def test_switch_and_environment_variable() -> None:
    previous = ash_ext.set_cpu_simd(False)
    try:
        assert not ash_ext.cpu_simd_enabled()
        assert ash_ext.set_cpu_simd(True) is False
        assert ash_ext.cpu_simd_enabled()
    finally:
        ash_ext.set_cpu_simd(previous)
    code = "import ash_ext; print(ash_ext.cpu_simd_enabled())"
    off = subprocess.run([sys.executable, "-c", code], env={"ASH_EXT_CPU_SIMD": "0"}, capture_output=True, text=True)
    on = subprocess.run([sys.executable, "-c", code], env={}, capture_output=True, text=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True"), (off.stderr, on.stderr)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("percentile", [0.0, 0.3, 0.65, 0.9, 0.999])
@pytest.mark.parametrize("n", [1, 5, 16, 17, 31, 255, 2048, 4095, 4097, 16385, 20000])
def test_relu_maps_any_length(variant: str, percentile: float, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g).relu_()
    assert_same_bits(x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("percentile", [0.1, 0.5, 0.65, 0.9])
@pytest.mark.parametrize("n", [7, 100, 3000, 40000])
def test_special_values(variant: str, percentile: float, n: int) -> None:
    assert_same_bits(special_mix(5, n, seed=n), percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize(
    "fill",
    [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38],
)
def test_thresholds_at_special_values(variant: str, fill: float) -> None:
    """Most of each sample is one special value, so the threshold (and the next sample's window) is it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3001, generator=g)
    x[:, ::3] = fill
    x[:, 1::7] = fill
    for percentile in (0.2, 0.5, 0.8):
        assert_same_bits(x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("levels", [1, 2, 3, 17])
def test_partial_ties_cut_at_every_lane(variant: str, levels: int) -> None:
    """Few distinct values: the threshold's ties are cut part-way, at offsets in every lane position."""
    g = torch.Generator().manual_seed(levels)
    n = 1000
    x = torch.randint(0, levels, (40, n), generator=g).float()
    for k in range(1, 40):
        percentile = 1.0 - (k * 23 + 0.25) / n
        assert_same_bits(x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_batches_that_make_the_window_miss(variant: str) -> None:
    """Samples of wildly different scales and signs, so each sample's window guess misses; and
    every sample equals its result computed alone (which takes a different path)."""
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-30, 1.0, 1e30, -1.0, 1e-3, 1e3, 1.0, -1e20, 1e-40 / 1e-45, 5.0])
    x = torch.randn(len(scales), 2500, generator=g) * scales[:, None]
    x[8] = torch.randn(2500, generator=g).abs() * 1e-45  # subnormals
    x[3, :100] = float("nan")
    simd, portable = run_both(variant, x, 0.7)
    assert same_values(simd, portable)
    for b in range(x.shape[0]):  # results depend on the sample only
        alone, _ = run_both(variant, x[b : b + 1], 0.7)
        assert bits_equal(alone, simd[b : b + 1])


def candidate_sets_that_defeat_interpolation(n: int, seed: int) -> torch.Tensor:
    """Rows whose values near the threshold are anything but evenly spread: two clusters of
    repeats, geometric spacing, one long run of ties with a few neighbours, a steep tail.
    Pass C estimates the threshold's key by interpolation; these make its windows miss above
    and below, collapse onto ties and run out of rounds (then radix digits finish)."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 1.0 + 2.0**-20),  # two adjacent keys
        torch.where(torch.rand(n, generator=g) < 0.3, 0.75, 1.5) + torch.randn(n, generator=g) * 1e-7,
        torch.exp2(torch.randint(-60, 60, (n,), generator=g).float()),  # one value per octave
        torch.exp2(-torch.rand(n, generator=g) * 40.0),  # log-uniform: keys crowd together
        torch.full((n,), 3.0),
        torch.randn(n, generator=g).relu_() ** 6,  # a steep tail: density far from even
    ]
    rows[4][torch.randperm(n, generator=g)[:7]] = torch.tensor([2.0, 4.0, 2.5, 3.5, 1.0, 5.0, 3.0 + 2.0**-22])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("n", [40, 2048, 50_000])
def test_candidate_sets_that_defeat_interpolation(variant: str, n: int) -> None:
    x = candidate_sets_that_defeat_interpolation(n, seed=n)
    previous = ash_ext.set_cpu_simd(True)
    try:
        for percentile in (0.1, 0.5, 0.65, 0.9, 0.999):
            for order in (x, x.flip(0), x.repeat(3, 1)):  # each row after each other: warm windows
                assert_same_bits(order, percentile, variant)
            assert_matches_oracle(FUNCTIONS[variant](x, percentile), x, percentile, variant)
    finally:
        ash_ext.set_cpu_simd(previous)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_stale_guess_from_an_earlier_call(variant: str) -> None:
    """A call's first samples start from the thread's guess of the last call: whatever it was,
    the output is the same as from a fresh guess."""
    g = torch.Generator().manual_seed(4)
    first = torch.randn(16, 4000, generator=g) * 1e6
    second = torch.randn(16, 4000, generator=g).relu_() * 1e-6
    FUNCTIONS[variant](first, 0.5)  # leaves a guess far from the second call's thresholds
    after_stale = FUNCTIONS[variant](second, 0.9)
    simd, portable = run_both(variant, second, 0.9)
    assert bits_equal(after_stale, simd)
    assert same_values(simd, portable)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("percentile", [0.65, 0.9])
def test_feature_maps_layouts_and_inplace(variant: str, percentile: float) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 256, 7, 7, generator=g).relu_()
    x[:, :, 0, 0] = 1.0  # ties, cut part-way in the channels_last layout's memory order too
    assert_same_bits(x, percentile, variant)
    assert_same_bits(x.to(memory_format=torch.channels_last), percentile, variant)
    simd, portable = run_both(variant, x, percentile, inplace=True)
    assert same_values(simd, portable)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_split_samples_and_threads(variant: str) -> None:
    """A batch smaller than the thread count splits each sample over threads (chunks of whole
    sum blocks); the result equals the one-thread result and the portable loops'."""
    g = torch.Generator().manual_seed(6)
    x = special_mix(1, 150_001, seed=6)
    x[0, :5000] = torch.randn(5000, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        several = run_both(variant, x, 0.6)
        torch.set_num_threads(1)
        one = run_both(variant, x, 0.6)
    finally:
        torch.set_num_threads(threads)
    assert bits_equal(several[0], one[0])
    assert same_values(several[1], one[0]) and same_values(one[1], one[0])


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_gradients_match(variant: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3000, generator=g)
    grad = torch.randn(5, 3000, generator=g)
    results = []
    for simd in (True, False):
        previous = ash_ext.set_cpu_simd(simd)
        try:
            leaf = x.clone().requires_grad_()
            FUNCTIONS[variant](leaf, 0.8).backward(grad)
            results.append(leaf.grad)
        finally:
            ash_ext.set_cpu_simd(previous)
    assert same_values(results[0], results[1])


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_matches_the_oracle(variant: str) -> None:
    """Not only equal to the portable loops: right, against the float64 oracle."""
    x = special_mix(6, 2048, seed=8)
    x[:3] = torch.randn(3, 2048, generator=torch.Generator().manual_seed(8)).relu_()
    previous = ash_ext.set_cpu_simd(True)
    try:
        for percentile in (0.3, 0.65, 0.9):
            assert_matches_oracle(FUNCTIONS[variant](x, percentile), x, percentile, variant)
    finally:
        ash_ext.set_cpu_simd(previous)


finite_or_special = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(finite_or_special, min_size=40, max_size=40), min_size=1, max_size=4),
    percentile=st.floats(0.0, 1.0),
    variant=st.sampled_from(list(FUNCTIONS)),
)
def test_property_same_bits(rows: list[list[float]], percentile: float, variant: str) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    assert_same_bits(x, percentile, variant)
