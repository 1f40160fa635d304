"""The public functions' compiled fast path (``ash_ext._ops.FAST_SHAPE``) against the general path.

A plain eager call (an ordinary tensor, a float percentile, no clip or a float one, nothing to
differentiate) skips the Python checks and the autograd key; every other call must reach the
general path (``functional.shape_with``), which raises the documented errors, serves the fallback
and records autograd. These tests check that both give the same bits, that the fast path declines
whatever it does not serve, and that tracers and modes still see the op.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bits_equal, distinct, integer_ties, needs_kernel, normal, with_specials
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ash_ext
from ash_ext import _ops, functional
from ash_ext._semantics import VARIANT_CODES

pytestmark = needs_kernel

PUBLIC = {"ash-p": ash_ext.ash_p, "ash-b": ash_ext.ash_b, "ash-s": ash_ext.ash_s, "scale": ash_ext.scale}
ALL_VARIANTS = tuple(PUBLIC)


def fast(x, percentile=0.65, variant="ash-s", clip=None, inplace=False):
    assert _ops.FAST_SHAPE is not None
    return _ops.FAST_SHAPE(x, percentile, VARIANT_CODES[variant], clip, inplace)


def _inputs():
    base = normal((3, 4, 5, 6), torch.float32, seed=3)
    yield "contiguous", base
    yield "channels_last", base.to(memory_format=torch.channels_last)
    yield "slice", normal((3, 70), torch.float32, seed=4)[:, 5:65:2]
    yield "expanded", normal((1, 40), torch.float32, seed=5).expand(3, 40)
    yield "ties", integer_ties((4, 50), torch.float32, seed=6)
    yield "specials", with_specials((3, 64), torch.float32, seed=7)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        yield str(dtype).replace("torch.", ""), normal((2, 33), dtype, seed=8)
    yield "empty batch", torch.zeros(0, 7)
    yield "empty samples", torch.zeros(3, 0)


INPUTS = list(_inputs())


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("name, x", INPUTS, ids=[name for name, _ in INPUTS])
@pytest.mark.parametrize("percentile", [0.0, 0.5, 0.65, 0.9, 1.0])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_fast_path_equals_general_path(variant, name, x, percentile, clip):
    out = fast(x, percentile, variant, clip)
    assert out is not None
    expected = functional.shape_with(x, percentile, variant, clip=clip)
    assert bits_equal(out, expected)
    assert out.stride() == expected.stride()
    assert bits_equal(PUBLIC[variant](x, percentile, clip=clip), expected)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("name, x", INPUTS[:3] + INPUTS[4:], ids=[n for n, _ in INPUTS[:3] + INPUTS[4:]])
def test_fast_path_inplace(variant, name, x):
    y = x.clone(memory_format=torch.preserve_format)
    y_version = y._version
    assert fast(y, 0.65, variant, None, True) is y
    general = x.clone(memory_format=torch.preserve_format)
    general_version = general._version
    assert functional.shape_with(general, 0.65, variant, inplace=True) is general
    assert bits_equal(y, general)
    assert y._version - y_version == general._version - general_version
    z = x.clone(memory_format=torch.preserve_format)
    assert PUBLIC[variant](z, 0.65, inplace=True) is z
    assert bits_equal(z, y)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10, 20, 50, 77, 768, 1000, 2048, 4097])
def test_fast_path_k_is_kept_count(n):
    """k = n - round(n * p) rounded half to even on the double product, as kept_count."""
    x = distinct((1, n), torch.float64, seed=n, positive=True)
    fractions = {0.5, 0.25, 0.75, 0.1, 0.3, 0.65, 0.9, 0.99, 1e-300, 1 - 2**-53}
    fractions |= {(i + 0.5) / n for i in range(0, n, max(1, n // 8))}  # products of exactly i + 0.5
    fractions |= {np.nextafter((i + 0.5) / n, 0.0) for i in range(0, n, max(1, n // 8))}
    for p in sorted(f for f in fractions if 0.0 <= f <= 1.0):
        kept = int((fast(x, float(p), "ash-p") != 0).sum())
        assert kept == ash_ext.kept_count(n, float(p)), p


class Float(float):
    pass


class Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "percentile",
    [
        1,
        0,
        True,
        np.float64(0.5),
        np.float32(0.5),
        Float(0.5),
        torch.tensor(0.5),
        torch.full((3,), 0.5),
        "0.5",
        None,
        -0.1,
        1.5,
        float("nan"),
        float("inf"),
        -0.0 - 1e-300,
    ],
    ids=repr,
)
def test_fast_path_declines_percentile(percentile):
    assert fast(normal((3, 8)), percentile) is None


@pytest.mark.parametrize("clip", [1, True, np.float64(0.5), Float(0.5), torch.tensor(0.5), float("nan"), "1"], ids=repr)
def test_fast_path_declines_clip(clip):
    assert fast(normal((3, 8)), 0.5, "ash-s", clip) is None


@pytest.mark.parametrize(
    "x",
    [
        normal((8,)),
        torch.tensor(1.0),
        torch.zeros(2, 4, dtype=torch.int32),
        torch.zeros(2, 4, dtype=torch.complex64),
        torch.zeros(2, 4, device="meta"),
        normal((3, 8)).as_subclass(Subclass),
        normal((3, 8)).to_sparse(),
        [[1.0, 2.0]],
        np.ones((2, 3)),
        None,
    ],
    ids=["1d", "0d", "int32", "complex", "meta", "subclass", "sparse", "list", "numpy", "None"],
)
def test_fast_path_declines_input(x):
    assert fast(x, 0.5) is None


def test_fast_path_and_grad():
    x = normal((3, 8)).requires_grad_()
    assert fast(x) is None  # autograd: the general path
    assert fast(x, inplace=True) is None  # the general path raises
    out = ash_ext.ash_s(x)
    assert out.grad_fn is not None
    with torch.no_grad():
        out = fast(x)
        assert out is not None and out.grad_fn is None and not out.requires_grad
        assert bits_equal(out, functional.shape_with(x, 0.65, "ash-s"))
    with torch.inference_mode():
        out = fast(x.detach())
        assert out is not None and out.is_inference()
    # A Parameter is an ordinary tensor to the fast path.
    p = torch.nn.Parameter(normal((3, 8)), requires_grad=False)
    assert bits_equal(fast(p), functional.shape_with(p, 0.65, "ash-s"))


class SeenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class SeenFunctions(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.functions: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.functions.append(str(func))
        return func(*args, **(kwargs or {}))


def test_modes_see_the_op():
    x = normal((3, 8))
    with SeenOps() as mode:
        assert fast(x) is None
        out = ash_ext.ash_s(x)
    assert mode.ops == ["ash_ext.ash.default"]
    assert bits_equal(out, ash_ext.ash_s(x))
    with SeenFunctions() as function_mode:
        assert fast(x) is None
        ash_ext.ash_s(x)
    assert "ash_ext.ash" in function_mode.functions


def _targets(graph: torch.fx.Graph) -> list:
    return [node.target for node in graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_records_the_op(tracing_mode):
    x = normal((3, 8))
    graph = make_fx(lambda y: ash_ext.ash_s(y, 0.6, clip=1.0), tracing_mode=tracing_mode)(x)
    assert _targets(graph.graph) == [torch.ops.ash_ext.ash.default]
    assert bits_equal(graph(x), ash_ext.ash_s(x, 0.6, clip=1.0))


@pytest.mark.parametrize("strict", [False, True])
def test_export_records_the_op(strict):
    class Shaped(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return ash_ext.scale(y, 0.6)

    x = normal((3, 8))
    exported = torch.export.export(Shaped(), (x,), strict=strict)
    assert _targets(exported.graph) == [torch.ops.ash_ext.ash.default]
    assert bits_equal(exported.module()(x), ash_ext.scale(x, 0.6))
