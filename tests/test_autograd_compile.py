"""Gradients, saved tensors, torch.compile and torch.library.opcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    FALLBACK,
    KERNEL,
    VARIANTS,
    backend_params,
    bits_equal,
    gapped,
    integer_ties,
    needs_kernel,
    normal,
    oracle_k,
)

import ash_ext
from ash_ext import reference

REF = {"ash-p": reference.ash_p, "ash-b": reference.ash_b, "ash-s": reference.ash_s}


# --------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "shape, percentile, layout",
    [
        ((3, 7), 0.5, "contiguous"),
        ((2, 3, 4), 0.65, "contiguous"),
        ((2, 3, 2, 2), 0.3, "channels_last"),
        ((2, 6, 3), 0.65, "sliced"),
        ((2, 3, 4), 0.0, "contiguous"),
    ],
    ids=["2d", "3d", "channels_last", "sliced", "k=n"],
)
def test_gradcheck(backend, variant, shape, percentile, layout):
    x = gapped(shape, seed=len(shape) + int(percentile * 100))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, ::2]
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: backend(t, percentile, variant), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_k_zero(backend, variant):
    x = gapped((2, 5), seed=1).requires_grad_()
    backend(x, 1.0, variant).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# Gradients vs autograd through the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_gradient_matches_reference(backend, variant, dtype, layout):
    x0 = gapped((3, 4, 3, 5), seed=2).to(dtype)  # tie-free
    if layout == "channels_last":
        x0 = x0.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x0 = x0.transpose(2, 3)
    g = normal(x0.shape, dtype, seed=3)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for percentile in (0.0, 0.3, 0.65, 0.9):
        x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        out = backend(x, percentile, variant)
        (grad,) = torch.autograd.grad(out, x, g)
        xr = x0.detach().contiguous().requires_grad_()
        (grad_ref,) = torch.autograd.grad(REF[variant](xr, percentile), xr, g.contiguous())
        torch.testing.assert_close(grad, grad_ref, **tol)
        assert grad.shape == x.shape


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_half_precision_close_to_float64(variant):
    x64 = gapped((2, 3, 8), seed=4, gap=0.125)
    x = x64.to(torch.float16).requires_grad_()
    g = normal(x.shape, torch.float64, seed=5)
    (grad,) = torch.autograd.grad(ash_ext.shape(x, 0.6, variant), x, g.to(torch.float16))
    xr = x64.requires_grad_()
    (grad_ref,) = torch.autograd.grad(REF[variant](xr, 0.6), xr, g)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-2, atol=1e-2)


# Regression: the kernels' ASH-S backward once computed G * s1 / (s2 * s2), which overflows to
# inf / inf = NaN once |x| is about sqrt(max of the accumulation type) although the gradient is
# finite.
BACKENDS_FOR_OVERFLOW = [
    pytest.param(KERNEL, id="kernel", marks=[needs_kernel]),
    pytest.param(FALLBACK, id="fallback"),
]


@pytest.mark.parametrize("backend", BACKENDS_FOR_OVERFLOW)
def test_ash_s_gradient_large_magnitudes_float32(backend):
    # forward values are finite (~8e19) and so is the gradient (e everywhere for g = 1)
    x0 = torch.tensor([[3e19, 1e19, 2e19, -1e19]], dtype=torch.float32)
    g = torch.ones_like(x0)
    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(backend(x, 0.5, "ash-s"), x, g)
    xr = x0.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(REF["ash-s"](xr, 0.5), xr, g.double())
    assert torch.isfinite(grad_ref).all()
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_FOR_OVERFLOW)
def test_ash_s_gradient_large_threshold_float64(backend):
    # see test_semantics.test_large_value_threshold_float64: values >= 2**1023
    x0 = torch.tensor([[9e307, -8e307, 1.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, 0.5, -0.25]], dtype=torch.float64)
    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(backend(x, 2 / 3, "ash-s"), x, g)
    xr = x0.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(REF["ash-s"](xr, 2 / 3), xr, g)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Saved tensors
# --------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_saves_at_most_one_input_sized_tensor(variant, layout):
    x = normal((4, 8, 5, 5), torch.float32, seed=6)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = KERNEL(x, 0.65, variant)
    assert saved, "nothing was saved for the backward"
    big = [numel for numel in saved if numel >= x.numel()]
    assert len(big) <= 1, saved
    assert sum(saved) <= x.numel() + 64 * x.shape[0], saved
    out.sum().backward()
    assert x.grad is not None


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _program(y):
    return ash_ext.ash_s(y, 0.6) * 2 + ash_ext.ash_b(torch.relu(y), 0.3) - ash_ext.ash_p(y, 0.5)


@pytest.fixture(autouse=False)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@needs_kernel
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph(fresh_dynamo, compile_backend, layout):
    compiled = torch.compile(_program, backend=compile_backend, fullgraph=True)
    for seed in range(2):
        y = normal((2, 3, 4, 5), torch.float32, seed=seed)
        if layout == "channels_last":
            y = y.to(memory_format=torch.channels_last)
        expected = _program(y)
        out = compiled(y)
        assert bits_equal(out, expected)
        assert out.stride() == expected.stride()


@needs_kernel
def test_compile_fullgraph_backward(fresh_dynamo):
    def loss(y):
        return (ash_ext.ash_s(y, 0.6) * torch.arange(y.shape[1], dtype=y.dtype).view(1, -1, 1)).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    y = gapped((3, 4, 5), seed=7).float().requires_grad_()
    (g_eager,) = torch.autograd.grad(loss(y), y)
    (g_compiled,) = torch.autograd.grad(compiled(y), y)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_compile_dynamic_shapes(fresh_dynamo):
    compiled = torch.compile(lambda y: ash_ext.ash_p(y, 0.65), backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 3, 4), (3, 5, 4), (4, 7, 2)]:
        y = normal(shape, torch.float32, seed=8)
        assert bits_equal(compiled(y), ash_ext.ash_p(y, 0.65))


@needs_kernel
def test_compile_inductor(fresh_dynamo):
    compiled = torch.compile(lambda y: ash_ext.ash_s(y, 0.6), backend="inductor", fullgraph=True)
    y = normal((2, 3, 4), torch.float32, seed=9)
    assert bits_equal(compiled(y), ash_ext.ash_s(y, 0.6))


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_inplace(fresh_dynamo, variant):
    def f(y):
        return ash_ext.shape(y, 0.5, variant, inplace=True)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = integer_ties((2, 3, 4), torch.float32, seed=10)
    expected = ash_ext.shape(y, 0.5, variant)
    out = compiled(y)
    assert bits_equal(y, expected)
    assert bits_equal(out, expected)


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


def _op_samples():
    x32 = normal((2, 3, 4), torch.float32, seed=11)
    x64 = gapped((3, 10), seed=12).requires_grad_()
    x_cl = normal((2, 3, 2, 2), torch.float32, seed=13).to(memory_format=torch.channels_last)
    x_sl = normal((2, 8, 3), torch.float64, seed=14)[:, ::2]
    x_half = normal((2, 9), torch.float16, seed=15)
    return [
        ("f32", x32, 5),
        ("f64-grad", x64, 3),
        ("channels_last", x_cl, 4),
        ("sliced", x_sl, 6),
        ("half", x_half, 2),
        ("k=0", x32, 0),
        ("k=n", x32, 12),
    ]


OP_SAMPLES = _op_samples()


@needs_kernel
@pytest.mark.parametrize("variant", range(3), ids=VARIANTS)
@pytest.mark.parametrize("name, x, k", OP_SAMPLES, ids=[s[0] for s in OP_SAMPLES])
def test_opcheck_ash(variant, name, x, k):
    torch.library.opcheck(torch.ops.ash_ext.ash.default, (x, k, variant))


@needs_kernel
@pytest.mark.parametrize("variant", range(3), ids=VARIANTS)
@pytest.mark.parametrize("name, x, k", OP_SAMPLES[:4], ids=[s[0] for s in OP_SAMPLES[:4]])
def test_opcheck_ash_backward_and_inplace(variant, name, x, k):
    x = x.detach()
    grad = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(k))
    torch.library.opcheck(torch.ops.ash_ext.ash_backward.default, (grad, x, k, variant))
    torch.library.opcheck(torch.ops.ash_ext.ash_.default, (x.clone(memory_format=torch.preserve_format), k, variant))


@needs_kernel
@pytest.mark.parametrize("variant", range(3), ids=VARIANTS)
def test_raw_op_matches_public_api(variant):
    x = normal((3, 4, 5), torch.float32, seed=16)
    k = oracle_k(20, 0.65)
    assert bits_equal(torch.ops.ash_ext.ash(x, k, variant), ash_ext.shape(x, 0.65, VARIANTS[variant]))
    y = x.clone()
    assert torch.ops.ash_ext.ash_(y, k, variant) is None
    assert bits_equal(y, ash_ext.shape(x, 0.65, VARIANTS[variant]))
    g = normal(x.shape, torch.float32, seed=17)
    xg = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.ops.ash_ext.ash(xg, k, variant), xg, g)
    assert bits_equal(torch.ops.ash_ext.ash_backward(g, x, k, variant), expected)
    assert np.isfinite(expected.numpy()).all()
