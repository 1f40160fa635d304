"""Determinism as the README's reliability section states it, for the claims no other file
tests: layouts, in place, the backward, and the backends against each other.

Bit-identical: run to run, thread counts, concurrent threads, batch composition and CPU ISAs on
the CPU kernel (tests/test_semantics.py, tests/test_cpu_isa.py, tests/test_soak.py); in place vs
out of place, dense vs staged (sliced, expanded) inputs, and ASH-P's result on every layout and
backend (here). Within the accumulation dtype's tolerance only: the sums of ASH-B, ASH-S and
SCALE between memory layouts (a channels_last sample is summed in memory order), between the
CPU kernel and the fallback, and between CPU and CUDA (and between CUDA regimes, which the batch
size chooses).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, bits_equal, integer_ties, needs_kernel, normal

import ash_ext
from ash_ext.functional import shape_with

VARIANTS = ("ash-p", "ash-b", "ash-s", "scale")


def sums_tolerance(dtype: torch.dtype) -> dict:
    """What two summation orders may change: a few ulps of the accumulation dtype in the factor
    (float32 for 16-bit inputs), then one rounding to the dtype."""
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return {"rtol": max(64 * acc_eps, 2 * torch.finfo(dtype).eps), "atol": 0.0}


def assert_same_selection(got: torch.Tensor, want: torch.Tensor, variant: str) -> None:
    """What two summation orders leave: ASH-P bit-identical, the summing variants within
    sums_tolerance (compared contiguous, whatever the layouts)."""
    if variant == "ash-p":
        assert bits_equal(got, want)
    else:
        torch.testing.assert_close(got.contiguous(), want.contiguous(), **sums_tolerance(want.dtype))


def inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    x = normal((4, 64, 7, 7), dtype, seed=3)
    ties = integer_ties((3, 32, 5, 5), dtype, seed=4)
    return [x, ties, x.relu()]


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layouts(dtype: torch.dtype, variant: str) -> None:
    for x in inputs(dtype):
        dense = ash_ext.shape(x, 0.65, variant)
        channels_last = ash_ext.shape(x.contiguous(memory_format=torch.channels_last), 0.65, variant)
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        assert_same_selection(channels_last, dense, variant)
        # A sliced or expanded input is staged into the output's (contiguous) layout: the same bits.
        wider = torch.cat([x, x[:, :1]], dim=1)
        assert bits_equal(ash_ext.shape(wider[:, : x.shape[1]], 0.65, variant), dense)
        expanded = x[:1].expand(3, *x.shape[1:])
        assert bits_equal(ash_ext.shape(expanded, 0.65, variant), dense[:1].expand(3, *x.shape[1:]))


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_equals_out_of_place(dtype: torch.dtype, variant: str) -> None:
    for x in inputs(dtype):
        for layout in (torch.contiguous_format, torch.channels_last):
            source = x.contiguous(memory_format=layout)
            y = source.clone()
            ash_ext.shape(y, 0.65, variant, inplace=True)
            assert bits_equal(y, ash_ext.shape(source, 0.65, variant))


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_run_to_run_and_thread_count(dtype: torch.dtype) -> None:
    x = normal((2, 40000), dtype, seed=5)  # 2 samples split over threads when there are more
    grad = normal(x.shape, dtype, seed=6)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append([torch.ops.ash_ext.ash_backward(grad, x, 14000, code) for code in range(4)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(bits_equal(a, b) for a, b in zip(results[0], other))


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_and_fallback(dtype: torch.dtype, variant: str) -> None:
    for x in inputs(dtype):
        kernel = ash_ext.shape(x, 0.65, variant)
        assert_same_selection(kernel, shape_with(x, 0.65, variant, force_fallback=True), variant)


@pytest.mark.skipif(not torch.cuda.is_available() or not ash_ext.compiled_with_cuda(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_and_cuda_and_batch_composition_on_cuda(dtype: torch.dtype, variant: str) -> None:
    # The batch size picks the CUDA regime (and so the summation order): a sample alone and in a
    # batch of 64 may take different regimes.
    x = normal((64, 2048, 7, 7), dtype, seed=7)
    cuda = ash_ext.shape(x.cuda(), 0.65, variant).cpu()
    alone = ash_ext.shape(x[:1].cuda(), 0.65, variant).cpu()
    cpu = ash_ext.shape(x, 0.65, variant)
    assert_same_selection(cuda, cpu, variant)
    assert_same_selection(alone, cpu[:1], variant)
    assert bits_equal(ash_ext.shape(x.cuda(), 0.65, variant).cpu(), cuda)  # run to run
