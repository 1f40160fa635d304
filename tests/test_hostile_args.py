"""Hostile arguments to the raw ops: torch.ops.ash_ext.ash, ash_, ash_backward and topk_stats.

Every bad call must end in a ValueError or TypeError whose message names the bad value, with the
input untouched -- on CPU tensors (the front end in csrc/ops.cpp) and the same way, message for
message, on fake and meta tensors (the fake kernels' validator in ash_ext/_ops.py, which mirrors
it). Odd but valid layouts must give the result of a contiguous copy. k out of range and unknown
variant codes are in test_detector_and_errors.py (test_raw_op_k_out_of_range, test_raw_op_bad_variant,
through the same assert_raises_alike).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    INT64_MAX,
    INT64_MIN,
    RAW_OPS,
    args_for,
    assert_raises_alike,
    fake_args,
    first_line,
    integer_ties,
    needs_kernel,
    normal,
    raised,
    run,
    same_values,
    storage_bytes,
    tensors,
    unchanged,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from ash_ext import fallback

pytestmark = [needs_kernel, pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]

VARIANT_NAMES = ("ash-p", "ash-b", "ash-s", "scale")


def significant_strides(t):
    """The strides that matter: those of dimensions of size > 1 in a non-empty tensor."""
    return [st for st, size in zip(t.stride(), t.shape) if size > 1] if t.numel() else []


# --------------------------------------------------------------------------------------------
# Hand-written hostile calls: CPU, FakeTensorMode and meta must raise alike
# --------------------------------------------------------------------------------------------

# A builder takes the device of the call and the odd device (for mismatches) and returns
# args_for's keyword arguments. Each case: (ops, builder, exception, the bad value as the message
# names it).
X = (2, 3, 4)  # n = 12


def _x(dev, shape=X, dtype=torch.float32):
    return normal(shape, torch.float32, seed=1).to(dtype).to(dev)


def _big(dev, shape, dtype=torch.float32):
    """A zero-stride view of 2**31+ logical elements backed by one element."""
    return torch.zeros((1,) * len(shape), dtype=dtype, device=dev).expand(shape)


BIG = (2**16, 2**15 + 1)  # 2**31 + 2**16 elements, n = 32769
HUGE = (2**30, 2**30)  # 2**60 elements: materialising it cannot succeed (4 EiB)
ALL = RAW_OPS
NO_BWD = ("ash", "ash_", "topk_stats")
WITH_VARIANT = ("ash", "ash_", "ash_backward")


def _case(ops, name, build, error, token):
    return [pytest.param(op, build, error, token, id=f"{op}-{name}") for op in ops]


def _cases():
    # (k out of range and unknown variant codes: test_raw_op_k_out_of_range and
    # test_raw_op_bad_variant in test_detector_and_errors.py)
    cases = []
    # the input itself
    cases += _case(ALL, "x-1d", lambda d, o: {"x": torch.zeros(5, device=d)}, ValueError, "1-D tensor of shape [5]")
    cases += _case(ALL, "x-0d", lambda d, o: {"x": torch.zeros((), device=d)}, ValueError, "0-D tensor of shape []")
    for dtype in (torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn):
        cases += _case(
            ALL, f"x-{dtype}", lambda d, o, t=dtype: {"x": torch.zeros(X, device=d).to(t)}, TypeError, str(dtype)
        )
    sparse = {
        "torch.sparse_coo": lambda t: t.to_sparse(),
        "torch.sparse_csr": lambda t: t.to_sparse_csr(),
        "torch.sparse_csc": lambda t: t.to_sparse_csc(),
    }
    for layout, to in sparse.items():
        name = layout.split("_")[-1]
        cases += _case(
            ALL, f"x-{name}", lambda d, o, to=to: {"x": to(torch.randn(3, 4)).to(d), "k": 2}, TypeError, layout
        )
    # k_per_sample
    for dtype in (torch.int32, torch.float32, torch.bool, torch.uint64):
        cases += _case(
            ALL,
            f"kps-{dtype}",
            lambda d, o, t=dtype: {"x": _x(d), "kps": torch.ones(2, dtype=t, device=d)},
            TypeError,
            f"got {dtype}",
        )
    for shape in ((3,), (1, 2), (), (2, 1), (0,)):
        cases += _case(
            ALL,
            f"kps-shape{list(shape)}",
            lambda d, o, s=shape: {"x": _x(d), "kps": torch.ones(s, dtype=torch.int64, device=d)},
            ValueError,
            f"got {list(shape)}",
        )
    cases += _case(
        ALL,
        "kps-other-device",
        lambda d, o: {"x": _x(d), "kps": torch.ones(2, dtype=torch.int64, device=o)},
        ValueError,
        "k_per_sample is on meta",
    )
    cases += _case(
        ALL,
        "kps-coo",
        lambda d, o: {"x": _x(d), "kps": torch.ones(2, dtype=torch.int64).to_sparse().to(d)},
        TypeError,
        "k_per_sample must be a strided (dense) tensor, got layout torch.sparse_coo",
    )
    # clamp bounds
    nan, inf = math.nan, math.inf
    for cmin, cmax, token in (
        (nan, None, "[nan, inf]"),
        (None, nan, "[-inf, nan]"),
        (nan, nan, "[nan, nan]"),
        (1.0, -1.0, "got [1, -1]"),
        (inf, -inf, "got [inf, -inf]"),
        (0.5, 0.25, "got [0.5, 0.25]"),
    ):
        cases += _case(
            NO_BWD,
            f"clamp[{cmin},{cmax}]",
            lambda d, o, a=cmin, b=cmax: {"x": _x(d), "cmin": a, "cmax": b},
            ValueError,
            token,
        )
    # gradients
    grads = {
        "grad-shape": (lambda d, o: torch.ones(2, 12, device=d), ValueError, "shape [2, 12] differs"),
        "grad-rank": (lambda d, o: torch.ones(2, 3, 4, 1, device=d), ValueError, "shape [2, 3, 4, 1] differs"),
        "grad-float64": (lambda d, o: torch.ones(X, dtype=torch.float64, device=d), TypeError, "torch.float64"),
        "grad-int64": (lambda d, o: torch.ones(X, dtype=torch.int64, device=d), TypeError, "torch.int64"),
        "grad-other-device": (lambda d, o: torch.ones(X, device=o), ValueError, "the gradient is on meta"),
        "grad-coo": (lambda d, o: torch.ones(X).to_sparse().to(d), TypeError, "layout torch.sparse_coo"),
        "grad-csr": (lambda d, o: torch.ones(4, 3).to_sparse_csr().to(d), TypeError, "layout torch.sparse_csr"),
    }
    for name, (make, error, token) in grads.items():
        shape = (4, 3) if name == "grad-csr" else X
        cases += _case(
            ["ash_backward"], name, lambda d, o, m=make, s=shape: {"x": _x(d, s), "grad": m(d, o)}, error, token
        )
    # zero sizes: k is still checked against n
    for shape, k, n in (((0, 5), 6, 5), ((3, 0), 1, 0), ((0, 0), 1, 0), ((0, 3, 0), -1, 0), ((4, 2, 0), INT64_MAX, 0)):
        cases += _case(
            ALL,
            f"empty{list(shape)}-k={k}",
            lambda d, o, s=shape, k=k: {"x": torch.zeros(s, device=d), "k": k},
            ValueError,
            f"[0, {n}] for samples of {n} elements, got {k}",
        )
    cases += _case(
        ALL,
        "empty-batch-kps-shape",
        lambda d, o: {"x": torch.zeros(0, 5, device=d), "kps": torch.zeros(1, dtype=torch.int64, device=d)},
        ValueError,
        "shape [0] (one k per sample), got [1]",
    )
    # an empty batch of samples too large to count in int64
    cases += _case(
        ALL,
        "empty-batch-2**80-per-sample",
        lambda d, o: {"x": torch.zeros(0, 1, 1, device=d).expand(0, 2**40, 2**40), "k": -1},
        ValueError,
        f"[0, {INT64_MAX}] for samples of at least {INT64_MAX} elements, got -1",
    )
    # in place on memory that elements share
    overlap = "inplace=True needs an input whose elements do not share memory"
    views = {
        "expanded": lambda d: torch.randn(1, 4, device=d).expand(3, 4),
        "expanded-inner": lambda d: torch.randn(2, 1, 3, device=d).expand(2, 5, 3),
        "as_strided-rows": lambda d: torch.randn(10, device=d).as_strided((3, 4), (2, 1)),
        "as_strided-cols": lambda d: torch.randn(10, device=d).as_strided((2, 3, 2), (5, 1, 2)),
        "as_strided-equal-strides": lambda d: torch.randn(10, device=d).as_strided((2, 2, 2), (4, 1, 1)),
    }
    for name, make in views.items():
        cases += _case(["ash_"], name, lambda d, o, m=make: {"x": m(d)}, ValueError, overlap)
    # 2**31+ logical elements backed by one: every bad call raises before anything of that size
    for shape in (BIG, HUGE):
        n = shape[1]
        tag = "big" if shape == BIG else "huge"
        cases += _case(ALL, f"{tag}-k=-1", lambda d, o, s=shape: {"x": _big(d, s), "k": -1}, ValueError, "got -1")
        cases += _case(
            ALL, f"{tag}-k=n+1", lambda d, o, s=shape: {"x": _big(d, s), "k": s[1] + 1}, ValueError, f"got {n + 1}"
        )
        cases += _case(
            WITH_VARIANT, f"{tag}-variant", lambda d, o, s=shape: {"x": _big(d, s), "variant": 9}, ValueError, "got 9"
        )
        cases += _case(
            ALL,
            f"{tag}-kps-shape",
            lambda d, o, s=shape: {"x": _big(d, s), "kps": torch.ones(3, dtype=torch.int64, device=d)},
            ValueError,
            f"shape [{shape[0]}] (one k per sample), got [3]",
        )
        cases += _case(
            NO_BWD,
            f"{tag}-clamp",
            lambda d, o, s=shape: {"x": _big(d, s), "cmin": 2.0, "cmax": 1.0},
            ValueError,
            "got [2, 1]",
        )
        cases += _case(["ash_"], f"{tag}-inplace", lambda d, o, s=shape: {"x": _big(d, s)}, ValueError, overlap)
        cases += _case(
            ["ash_backward"],
            f"{tag}-grad-dtype",
            lambda d, o, s=shape: {"x": _big(d, s), "grad": _big(d, s, torch.float64)},
            TypeError,
            "torch.float64",
        )
        cases += _case(
            ["ash_backward"],
            f"{tag}-grad-shape",
            lambda d, o, s=shape: {"x": _big(d, s), "grad": _big(d, (s[0], s[1] + 1))},
            ValueError,
            f"shape [{shape[0]}, {n + 1}] differs",
        )
    return cases


CASES = _cases()


@pytest.mark.parametrize("op, build, error, token", CASES)
def test_hostile_call(op, build, error, token):
    assert_raises_alike(op, build, error, token)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no mkldnn")
@pytest.mark.parametrize("op", RAW_OPS)
def test_mkldnn_input(op):
    x = torch.randn(3, 4).to_mkldnn()
    with pytest.raises(TypeError, match="the input must be a strided .* torch._mkldnn"):
        run(op, args_for(op, x, grad=torch.ones(3, 4)))


# --------------------------------------------------------------------------------------------
# What only the data tells: the ks' values (checked by the CPU op; fake / meta cannot)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", RAW_OPS)
@pytest.mark.parametrize(
    "ks, low, high",
    [([-1, 2], -1, 2), ([13, 2], 2, 13), ([2, INT64_MAX], 2, INT64_MAX), ([INT64_MIN, 0], INT64_MIN, 0)],
    ids=["negative", "n+1", "int64-max", "int64-min"],
)
def test_k_per_sample_values(op, ks, low, high):
    x = _x("cpu")
    before = x.clone()
    args = args_for(op, x, kps=torch.tensor(ks))
    with pytest.raises(ValueError, match=rf"in \[0, 12\] .* got values in \[{low}, {high}\]"):
        run(op, args)
    assert same_values(x, before)
    with FakeTensorMode() as mode:
        run(op, fake_args(mode, args))  # accepted: the values are not known
    run(op, args_for(op, x.to("meta"), kps=torch.tensor(ks, device="meta")))


@pytest.mark.parametrize("op", RAW_OPS)
def test_k_per_sample_values_on_a_big_view(op):
    """2**31+ elements in one: the ks (one per sample) are read, nothing of x's size is made."""
    x = _big("cpu", BIG)
    ks = torch.tensor(BIG[1] + 1).expand(BIG[0])
    with pytest.raises(ValueError, match=rf"got values in \[{BIG[1] + 1}, {BIG[1] + 1}\]"):
        run(op, args_for(op, x, kps=ks))


# --------------------------------------------------------------------------------------------
# Odd but valid arguments: the result of contiguous copies, the input untouched
# --------------------------------------------------------------------------------------------


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def _check_like_contiguous(op, x, k=5, variant=2, kps=None, grad=None, cmin=None, cmax=None):
    """``op`` on these (odd) tensors equals ``op`` on contiguous copies and leaves them alone."""
    args = args_for(op, x, k, variant, kps, cmin, cmax, grad)
    plain = tuple(a.contiguous().clone() if isinstance(a, torch.Tensor) else a for a in args)
    before = [storage_bytes(t) for t in tensors(args)]
    if op == "ash_":
        assert run(op, args) is None and run(op, plain) is None
        got, expected = [x], [plain[0]]
        before = before[1:]  # x is written
        touched = tensors(args)[1:]
    else:
        got, expected = _outputs(run(op, args)), _outputs(run(op, plain))
        touched = tensors(args)
        if op != "topk_stats":
            assert got[0].stride() == torch.empty_like(x).stride()  # what the fake kernel promises
    for g, e in zip(got, expected):
        assert same_values(g, e)
    for b, t in zip(before, touched):
        assert unchanged(b, t)


# Integer values: every sum is exact, so a layout that sums in another order must still give the
# contiguous copy's bits (with ties too, broken by logical index whatever the layout).
def _ints(shape, seed):
    return integer_ties(shape, torch.float32, seed=seed)


INPUTS = {
    "expanded-batch": lambda: _ints((1, 3, 4), 2).expand(3, 3, 4),
    "expanded-inner": lambda: _ints((3, 1, 4), 3).expand(3, 5, 4),
    "expanded-all": lambda: torch.tensor(1.5).expand(4, 2, 3),
    "transposed": lambda: _ints((3, 4, 5), 4).transpose(1, 2),
    "batch-inner": lambda: _ints((6, 3), 5).t(),
    "sliced": lambda: _ints((3, 4, 10), 6)[:, :, ::2],
    "channels_last": lambda: _ints((2, 3, 2, 2), 7).to(memory_format=torch.channels_last),
    "overlap-free-as_strided": lambda: _ints((40,), 8).as_strided((3, 2, 2), (7, 3, 1)),
}


@pytest.mark.parametrize(
    "op, name",
    # an expanded input is refused in place (test_hostile_call)
    [(op, name) for op in RAW_OPS for name in INPUTS if not (op == "ash_" and name.startswith("expanded"))],
)
def test_odd_input_layouts(op, name):
    x = INPUTS[name]()
    for variant in range(4):
        _check_like_contiguous(op, x, k=x[0].numel() // 2, variant=variant, cmin=-1.0, cmax=1.25)


KS = {
    "expanded": lambda: torch.tensor(3).expand(4),
    "strided": lambda: torch.tensor([3, 0, 12, 0, 0, 9, 7, 1])[::2],
    "k=0-and-n": lambda: torch.tensor([0, 12, 0, 12]),
}


@pytest.mark.parametrize("op", RAW_OPS)
@pytest.mark.parametrize("name", KS)
def test_odd_k_per_sample(op, name):
    _check_like_contiguous(op, _ints((4, 3, 4), 9), kps=KS[name]())


GRADS = {
    "expanded": lambda: torch.tensor(0.5).expand(2, 3, 2, 2),
    "strided": lambda: _ints((2, 3, 2, 4), 10)[..., 1::2],
    "transposed": lambda: _ints((2, 3, 2, 2), 11).transpose(2, 3),
    "channels_last": lambda: _ints((2, 3, 2, 2), 12).to(memory_format=torch.channels_last),
    "contiguous": lambda: _ints((2, 3, 2, 2), 12),
}


@pytest.mark.parametrize(
    "name, x_layout",
    [(name, x) for name in GRADS for x in ("contiguous", "channels_last") if (name, x) != ("contiguous", "contiguous")],
)
def test_odd_gradient_layouts(name, x_layout):
    x = _ints((2, 3, 2, 2), 13)
    if x_layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    grad = GRADS[name]()
    for variant in range(4):
        _check_like_contiguous("ash_backward", x, k=7, variant=variant, grad=grad)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("variant", range(4), ids=VARIANT_NAMES)
def test_gradient_of_sum_is_zero_stride(variant, memory_format):
    """y.sum().backward() hands the backward an expanded (zero-stride) gradient."""
    x = normal((2, 3, 2, 2), torch.float64, seed=14).to(memory_format=memory_format).requires_grad_()
    y = torch.ops.ash_ext.ash(x, 5, variant)
    seen = []
    y.register_hook(seen.append)
    y.sum().backward()
    assert set(seen[0].stride()) == {0}
    expected = torch.ops.ash_ext.ash_backward(torch.ones(x.shape, dtype=x.dtype), x.detach(), 5, variant)
    assert same_values(x.grad, expected)
    assert x.grad.stride() == x.stride()


def test_inplace_k_per_sample_sharing_memory_with_x():
    """ks that alias x's memory (x viewed as int64): the kernel must not read ks it has written."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one sample after the other: sample 0 is written before 1 is read
    try:
        x = torch.tensor([[0.0, 0.0], [4.0, 6.0]], dtype=torch.float64)
        x.view(torch.int64)[0] = torch.tensor([1, 2])  # x[0] holds the ks [1, 2] (two subnormals)
        for variant in range(4):
            expected = torch.ops.ash_ext.ash(x, 0, variant, x.view(torch.int64)[0].clone())
            y = x.clone()
            torch.ops.ash_ext.ash_(y, 0, variant, y.view(torch.int64)[0])
            assert same_values(y, expected), (variant, y, expected)
    finally:
        torch.set_num_threads(threads)


EMPTY = {
    "batch-0": (lambda: torch.zeros(0, 5), 5),
    "n-0": (lambda: torch.zeros(3, 0), 0),
    "both-0": (lambda: torch.zeros(0, 0), 0),
    "batch-0-n-0-3d": (lambda: torch.zeros(0, 3, 0), 0),
    "batch-0-2**80-per-sample": (lambda: torch.zeros(1, 1, 1).expand(0, 2**40, 2**40), INT64_MAX),
}


@pytest.mark.parametrize("op", RAW_OPS)
@pytest.mark.parametrize("name", EMPTY)
def test_empty_tensors(op, name):
    make, k = EMPTY[name]
    x = make()
    shape = x.shape
    results = [run(op, args_for(op, x, k))]
    with FakeTensorMode() as mode:
        results.append(run(op, fake_args(mode, args_for(op, x, k))))
    results.append(run(op, args_for(op, x.to("meta"), k)))
    for result in results:
        if op == "ash_":
            assert result is None
        elif op == "topk_stats":
            assert [tuple(t.shape) for t in result] == [(shape[0],)] * 3
        else:
            assert result.shape == shape and result.dtype == x.dtype


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _causes(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@pytest.mark.parametrize(
    "fn, token",
    [
        (lambda y: torch.ops.ash_ext.ash(y, 13, 0) * 2, "got 13"),
        (lambda y: torch.ops.ash_ext.topk_stats(y, -1, None, 1.0, 2.0)[1], "got -1"),
    ],
    ids=["ash-k=13", "topk_stats-k=-1"],
)
def test_compile_fullgraph_bad_k(fn, token):
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        with pytest.raises(RuntimeError, match=token) as info:  # dynamo's TorchRuntimeError
            compiled(_x("cpu"))
        assert any(type(e) is ValueError and token in str(e) for e in _causes(info.value))
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Property test: random (often hostile) calls
# --------------------------------------------------------------------------------------------


def _expected_error(op, x, k, variant, kps, cmin, cmax, grad, know_data=True):
    """(exception, the bad value as the message names it, the rule), or None for a valid call.

    Written from the documented rules in their order, independently of the validators; without
    ``know_data`` (fake tensors) the values in k_per_sample are not checked.
    """
    if x.dtype not in FLOAT_DTYPES:
        return TypeError, str(x.dtype), "x-dtype"
    if op != "topk_stats" and variant not in range(4):
        return ValueError, f"got {variant}", "variant"
    n = math.prod(x.shape[1:])
    if kps is not None:
        if kps.dtype != torch.int64:
            return TypeError, f"got {kps.dtype}", "kps-dtype"
        if tuple(kps.shape) != (x.shape[0],):
            return ValueError, f"got {list(kps.shape)}", "kps-shape"
        if know_data and kps.numel() and (int(kps.min()) < 0 or int(kps.max()) > n):
            return ValueError, f"got values in [{int(kps.min())}, {int(kps.max())}]", "kps-values"
    elif not 0 <= k <= n:
        return ValueError, f"got {k}", "k"
    if op != "ash_backward" and (cmin is not None or cmax is not None):
        low = -math.inf if cmin is None else cmin
        high = math.inf if cmax is None else cmax
        if math.isnan(low) or math.isnan(high):
            return ValueError, "must not be NaN", "clamp-nan"
        if low > high:
            return ValueError, "clamp_min must not exceed clamp_max", "clamp-order"
    if op == "ash_" and x.numel() and any(s == 0 and z > 1 for s, z in zip(x.stride(), x.shape)):
        return ValueError, f"strides {list(x.stride())}", "overlap"
    if op == "ash_backward":
        if grad.shape != x.shape:
            return ValueError, f"shape {list(grad.shape)} differs", "grad-shape"
        if grad.dtype != x.dtype:
            return TypeError, f"dtype {grad.dtype} differs", "grad-dtype"
    return None


def _layout(draw, shape, dtype, seed, rank):
    """A tensor of logical ``shape`` in a drawn layout, and the layout's name."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "channels_last"]))
    if kind == "transposed":
        base = integer_ties(shape[:-2] + (shape[-1], shape[-2]), dtype, seed=seed, low=-1, high=2)
        return base.transpose(-1, -2), kind
    if kind == "sliced":
        return integer_ties(shape[:-1] + (2 * shape[-1],), dtype, seed=seed, low=-1, high=2)[..., ::2], kind
    if kind == "expanded":
        dim = draw(st.integers(0, rank - 1))
        small = shape[:dim] + (1,) + shape[dim + 1 :]
        return integer_ties(small, dtype, seed=seed, low=-1, high=2).expand(shape), kind
    x = integer_ties(shape, dtype, seed=seed, low=-1, high=2)
    if kind == "channels_last" and rank == 4:
        return x.to(memory_format=torch.channels_last), kind
    return x, "contiguous"


@st.composite
def hostile_calls(draw):
    op = draw(st.sampled_from(RAW_OPS))
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES + FLOAT_DTYPES + (torch.int32,)))
    seed = draw(st.integers(0, 2**16))
    x, _ = _layout(draw, shape, dtype, seed, rank)
    batch, n = shape[0], math.prod(shape[1:])
    good_k = st.integers(0, n)
    k = draw(st.one_of(good_k, good_k, st.integers(-2, n + 2), st.sampled_from([2**62, INT64_MAX, INT64_MIN])))
    good_variant = st.integers(0, 3)
    variant = draw(st.one_of(good_variant, good_variant, good_variant, st.sampled_from([-1, 4, 2**62, INT64_MIN])))
    g = torch.Generator().manual_seed(seed)
    kps_kind = draw(st.sampled_from([None, None, "valid", "expanded", "strided", "out-of-range", "int32", "long"]))
    kps = None
    if kps_kind is not None:
        values = torch.randint(0, n + 1, (2 * batch,), generator=g)
        kps = {
            "valid": values[:batch],
            "expanded": values[:1].expand(batch) if batch else values[:0],
            "strided": values[::2],
            "out-of-range": torch.cat([values[: batch - 1], torch.tensor([draw(st.sampled_from([-1, n + 1]))])])
            if batch
            else values[:0],
            "int32": values[:batch].int(),
            "long": values[: batch + 1] if batch else torch.zeros(1, dtype=torch.int64),
        }[kps_kind]
    bounds = st.sampled_from([None, None, -1.0, 0.0, 0.5, 2.0, math.inf, -math.inf, math.nan])
    cmin, cmax = (None, None) if op == "ash_backward" else (draw(bounds), draw(bounds))
    grad = None
    if op == "ash_backward":
        gkind = draw(st.sampled_from(["layout", "layout", "layout", "layout", "float64", "wrong-shape"]))
        if gkind == "layout":
            grad, _ = _layout(draw, shape, dtype, seed + 1, rank)
            grad = grad if x.dtype in FLOAT_DTYPES else grad.float()
        elif gkind == "float64":
            grad = torch.ones(shape, dtype=torch.float64 if dtype != torch.float64 else torch.float32)
        else:
            grad = torch.ones(shape[:-1] + (shape[-1] + 1,), dtype=dtype)
    return op, x, k, variant, kps, cmin, cmax, grad


def _reference(op, x, k, variant, kps, cmin, cmax):
    """ash_ext.fallback's answer for ops that have one: ASH-P and the statistics exactly."""
    ks = k if kps is None else kps
    if op in ("ash", "ash_") and variant == 0:
        return [fallback.shape(x, ks, "ash-p", cmin, cmax)]
    if op == "topk_stats":
        return list(fallback.topk_stats(x, ks, cmin, cmax))
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=hostile_calls())
def test_property_hostile_calls(call):
    op, x, k, variant, kps, cmin, cmax, grad = call
    args = args_for(op, x, k, variant, kps, cmin, cmax, grad)
    expected = _expected_error(op, x, k, variant, kps, cmin, cmax, grad)
    expected_fake = _expected_error(op, x, k, variant, kps, cmin, cmax, grad, know_data=False)
    snapshot = x.clone()  # x's logical values (the base of an expanded x is tiny)
    plain = tuple(a.contiguous().clone() if isinstance(a, torch.Tensor) else a for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode() as mode:
            fake = fake_args(mode, args)
            fake_error = raised(op, fake)
            fake_out = None if fake_error else run(op, fake)
    event(f"{op}: " + ("valid" if expected is None else f"{expected[0].__name__} ({expected[2]})"))
    if expected is not None:
        error, token, _ = expected
        real = raised(op, args)
        assert type(real) is error and token in str(real), (expected, repr(real))
        assert same_values(x, snapshot)  # untouched
        if expected_fake is None:  # only the data was wrong
            assert fake_error is None, repr(fake_error)
        elif expected_fake == expected:
            assert type(fake_error) is error and first_line(fake_error) == first_line(real), repr(fake_error)
        else:
            assert type(fake_error) is expected_fake[0] and expected_fake[1] in str(fake_error), repr(fake_error)
        return
    assert fake_error is None, repr(fake_error)
    result = run(op, args)
    if op == "ash_":
        assert result is None
        got, want = [x], [run("ash", plain)]
    else:
        got, want = _outputs(result), _outputs(run(op, plain))
        assert same_values(x, snapshot)
    for g, w, f in zip(got, want, _outputs(fake_out) if op != "ash_" else [x]):
        assert same_values(g, w)
        assert g.shape == f.shape and g.dtype == f.dtype
        if op != "ash_":
            assert significant_strides(g) == significant_strides(f)
    reference = _reference(op, snapshot, k, variant, kps, cmin, cmax)
    if reference is not None:
        for g, r in zip(got, reference):
            assert same_values(g, r), (g, r)


@pytest.mark.parametrize("force_fallback", [False, True], ids=["kernel", "fallback"])
def test_public_in_place_refuses_overlapping_views_on_every_implementation(force_fallback: bool) -> None:
    # The public functions check before choosing an implementation: the fallback, which would
    # write through the view element by element, refuses the same views as the raw op.
    from ash_ext.functional import shape_with

    storage = torch.arange(4.0)
    for view in (storage.as_strided((3, 2), (1, 1)), storage[:1].expand(3, 4)):
        with pytest.raises(ValueError, match="do not share memory"):
            shape_with(view, 0.5, "ash-p", inplace=True, force_fallback=force_fallback)
        assert torch.equal(storage, torch.arange(4.0))
