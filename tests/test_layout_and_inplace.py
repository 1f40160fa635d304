"""Memory layouts (channels_last, strided and expanded views), the input left alone, and in-place."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    VARIANTS,
    assert_matches_oracle,
    backend_params,
    bits_equal,
    integer_ties,
    kernel_available,
    normal,
    same_values,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PERCENTILES = (0.3, 0.65, 0.9)


# --------------------------------------------------------------------------------------------
# channels_last
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, memory_format",
    [
        ((3, 5, 4, 3), torch.channels_last),
        ((2, 3, 1, 4), torch.channels_last),  # size-1 dims in a permuted layout
        ((2, 1, 3, 3), torch.channels_last),
        ((2, 4, 3, 1), torch.channels_last),
        ((1, 6, 2, 2), torch.channels_last),
        ((2, 3, 2, 3, 4), torch.channels_last_3d),
        ((3, 2, 1, 2, 3), torch.channels_last_3d),
    ],
    ids=str,
)
def test_channels_last(backend, variant, dtype, shape, memory_format):
    # integer data: many ties, so the tie rule must follow the logical order, not memory order;
    # sums are exact, so every layout gives the same bits
    x = integer_ties(shape, dtype, seed=sum(shape))
    xc = x.to(memory_format=memory_format)
    assert not xc.is_contiguous() or shape[1] == 1
    for percentile in PERCENTILES:
        out = backend(xc, percentile, variant)
        assert out.is_contiguous(memory_format=memory_format)
        assert out.stride() == xc.stride()
        assert bits_equal(out, backend(x, percentile, variant))
        assert_matches_oracle(out, x, percentile, variant)


@pytest.mark.parametrize("backend", backend_params())
def test_channels_last_ties_use_logical_order(backend):
    # all equal: the kept ones are the first k in row-major (logical) order, which in
    # channels_last memory are scattered
    x = torch.ones(1, 3, 2, 2).to(memory_format=torch.channels_last)
    out = backend(x, 1 - 5 / 12, "ash-p")  # k = 5
    assert torch.equal(out.contiguous().flatten(), torch.tensor([1.0] * 5 + [0.0] * 7))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_continuous(backend, variant):
    x = normal((4, 8, 5, 5), torch.float32, seed=2).abs()
    xc = x.to(memory_format=torch.channels_last)
    for percentile in PERCENTILES:
        out = backend(xc, percentile, variant)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, backend(x, percentile, variant), rtol=2e-6, atol=1e-6)
        assert_matches_oracle(out, x, percentile, variant)


# --------------------------------------------------------------------------------------------
# Non-contiguous inputs
# --------------------------------------------------------------------------------------------


def _views():
    """(name, make) pairs: make(dtype, seed) returns a non-contiguous tensor."""

    def sliced(dtype, seed):
        return integer_ties((4, 10, 3), dtype, seed)[:, ::2]

    def sliced_inner(dtype, seed):
        return integer_ties((3, 4, 9), dtype, seed)[:, 1:, 2:7]

    def batch_strided(dtype, seed):
        return integer_ties((8, 5, 3), dtype, seed)[::3]

    def transposed(dtype, seed):
        return integer_ties((3, 4, 5), dtype, seed).transpose(1, 2)

    def permuted_4d(dtype, seed):
        return integer_ties((2, 3, 4, 5), dtype, seed).permute(0, 3, 1, 2)

    def batch_inner(dtype, seed):
        # dense, but the batch dimension is not outermost in memory
        return integer_ties((4, 3, 5), dtype, seed).transpose(0, 1).contiguous().transpose(0, 1)

    def batch_innermost(dtype, seed):
        return integer_ties((6, 3, 3), dtype, seed).permute(1, 2, 0).contiguous().permute(2, 0, 1)

    def expanded_batch(dtype, seed):
        return integer_ties((1, 4, 5), dtype, seed).expand(3, 4, 5)

    def expanded_inner(dtype, seed):
        return integer_ties((3, 4, 1), dtype, seed).expand(3, 4, 6)

    def expanded_middle(dtype, seed):
        return integer_ties((2, 1, 6), dtype, seed).expand(2, 5, 6)

    def column(dtype, seed):
        return integer_ties((7, 5), dtype, seed).t()

    def many_permuted_dims(dtype, seed):
        # a dense permuted layout with more sample dimensions than the kernels describe (8)
        return integer_ties((2,) + (2,) * 9, dtype, seed, low=0, high=3).transpose(1, 9)

    return [
        (f.__name__, f)
        for f in (
            sliced,
            sliced_inner,
            batch_strided,
            transposed,
            permuted_4d,
            batch_inner,
            batch_innermost,
            expanded_batch,
            expanded_inner,
            expanded_middle,
            column,
            many_permuted_dims,
        )
    ]


VIEWS = _views()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name, make", VIEWS, ids=[v[0] for v in VIEWS])
def test_non_contiguous_same_as_contiguous(backend, variant, dtype, name, make):
    x = make(dtype, seed=len(name))
    assert not x.is_contiguous()
    x_before = x.clone()
    for percentile in PERCENTILES:
        out = backend(x, percentile, variant)
        assert out.shape == x.shape
        assert bits_equal(out, backend(x.contiguous(), percentile, variant)), percentile
        assert_matches_oracle(out, x, percentile, variant)
    assert bits_equal(x, x_before)


# --------------------------------------------------------------------------------------------
# The input is never modified
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "expanded", "2d"])
def test_input_not_modified(backend, variant, dtype, layout):
    if layout == "2d":
        x = normal((5, 17), dtype, seed=3)
    else:
        x = normal((3, 4, 3, 5), dtype, seed=3)
    x[..., 0] = float("nan")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, ::2]
    elif layout == "expanded":
        x = x[:1].expand(3, 4, 3, 5)
    before = x.clone()
    strides = x.stride()
    for percentile in (0.0, 0.5, 1.0):
        out = backend(x, percentile, variant)
        assert out.data_ptr() != x.data_ptr()
        assert same_values(x, before)
        assert x.stride() == strides


# --------------------------------------------------------------------------------------------
# inplace=True
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "2d", "3d"])
def test_inplace_dense(backend, variant, dtype, layout):
    shapes = {
        "contiguous": (3, 4, 3, 5),
        "channels_last": (3, 4, 3, 5),
        "channels_last_3d": (2, 3, 2, 2, 3),
        "2d": (4, 19),
        "3d": (3, 5, 4),
    }
    base = integer_ties(shapes[layout], dtype, seed=4)
    if layout == "channels_last":
        base = base.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        base = base.to(memory_format=torch.channels_last_3d)
    for percentile in PERCENTILES:
        x = base.clone()
        strides, ptr = x.stride(), x.data_ptr()
        expected = backend(base.contiguous(), percentile, variant)
        out = backend(x, percentile, variant, inplace=True)
        assert out is x
        assert x.data_ptr() == ptr and x.stride() == strides
        assert bits_equal(x, expected)
        assert_matches_oracle(x, base, percentile, variant)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "index",
    [
        (slice(None), slice(None, None, 2)),  # x[:, ::2]
        (slice(1, None, 2),),  # every other sample
        (slice(None), slice(1, 4), slice(2, 5)),  # an inner box
        (slice(None), slice(None), slice(None, None, 3)),
    ],
    ids=["every-other-channel", "every-other-sample", "inner-box", "strided-last"],
)
def test_inplace_slice_writes_only_the_slice(backend, variant, index):
    parent = integer_ties((5, 6, 7), torch.float32, seed=5)
    original = parent.clone()
    view = parent[index]
    assert not view.is_contiguous()
    expected = backend(view.contiguous(), 0.65, variant)
    out = backend(view, 0.65, variant, inplace=True)
    assert out is view
    assert bits_equal(parent[index], expected)
    outside = torch.ones_like(parent, dtype=torch.bool)
    outside[index] = False
    assert torch.equal(parent[outside], original[outside])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
def test_inplace_transposed_view(backend, variant):
    parent = integer_ties((3, 4, 5), torch.float32, seed=6)
    view = parent.transpose(1, 2)
    expected = backend(view.contiguous(), 0.5, variant)
    out = backend(view, 0.5, variant, inplace=True)
    assert out is view
    assert bits_equal(view, expected)


@pytest.mark.parametrize("backend", backend_params())
def test_inplace_expanded_input_raises(backend):
    # writing one result into elements that share memory is not possible
    x = torch.randn(1, 4).expand(3, 4)
    with pytest.raises((ValueError, RuntimeError)):
        backend(x, 0.5, "ash-p", inplace=True)


@pytest.mark.parametrize("backend", backend_params())
def test_inplace_under_no_grad_on_leaf_requiring_grad(backend):
    x = normal((2, 10), torch.float32, seed=7).requires_grad_()
    expected = backend(x.detach(), 0.5, "ash-s")
    with torch.no_grad():
        out = backend(x, 0.5, "ash-s", inplace=True)
    assert out is x
    assert bits_equal(x.detach(), expected)


# --------------------------------------------------------------------------------------------
# Shapes: empty batch, 2-D and 3-D
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 4), (0, 2, 3, 3), (3, 0), (2, 3, 0, 4)], ids=str)
def test_empty(backend, variant, shape):
    x = torch.randn(shape)
    out = backend(x, 0.65, variant)
    assert out.shape == x.shape and out.dtype == x.dtype
    out = backend(x, 0.65, variant, inplace=True)
    assert out is x


@pytest.mark.parametrize("backend", backend_params())
def test_empty_batch_channels_last(backend):
    x = torch.randn(0, 3, 4, 5).to(memory_format=torch.channels_last)
    out = backend(x, 0.5, "ash-p")
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 13), (6, 2), (7, 33), (1, 1, 1), (4, 3, 11), (5, 1, 8), (2, 9, 1)], ids=str
)
def test_2d_and_3d(backend, variant, dtype, shape):
    for data in (normal(shape, dtype, seed=8).abs(), integer_ties(shape, dtype, seed=8)):
        for percentile in (0.0, 0.5, 0.65, 1.0):
            out = backend(data, percentile, variant)
            assert out.is_contiguous()
            assert_matches_oracle(out, data, percentile, variant)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 4), min_size=4, max_size=5).map(tuple),
    batch=st.integers(0, 4),
    percentile=st.floats(0.0, 1.0),
    dtype=st.sampled_from(FLOAT_DTYPES),
    variant=st.sampled_from(VARIANTS),
    backend=st.sampled_from([p.values[0] for p in backend_params() if not p.marks or kernel_available()]),
    seed=st.integers(0, 2**16),
)
def test_property_channels_last(shape, batch, percentile, dtype, variant, backend, seed):
    shape = (batch,) + shape[1:]
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = integer_ties(shape, dtype, seed=seed)
    xc = x.to(memory_format=memory_format)
    out = backend(xc, percentile, variant)
    assert out.stride() == xc.stride()
    assert bits_equal(out, backend(x, percentile, variant))
    assert_matches_oracle(out, x, percentile, variant)
    y = xc.clone(memory_format=torch.preserve_format)
    assert backend(y, percentile, variant, inplace=True) is y
    assert bits_equal(y, out)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_large_samples_with_ties(backend, batch):
    # samples large enough to be split over threads, ties cut in logical (not memory) order
    x = integer_ties((batch, 48, 30, 30), torch.float32, seed=12, low=0, high=4)
    xc = x.to(memory_format=torch.channels_last)
    for percentile in (0.5, 0.8):
        for variant in VARIANTS:
            out = backend(xc, percentile, variant)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert_matches_oracle(out, x, percentile, variant)
