"""Parity with the reference algorithm (ash_ext.reference), with pytorch-ood 0.4.0's functions, with
pytorch-ood 0.3.3's in-place functions (executed from the seed text), and between backends."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    VARIANTS,
    backend_params,
    bits_equal,
    distinct,
    integer_ties,
    kernel_available,
    normal,
    oracle_k,
    relu_like,
    same_values,
)

import ash_ext
from ash_ext import fallback, reference

REF = {"ash-p": reference.ash_p, "ash-b": reference.ash_b, "ash-s": reference.ash_s}
REF_INPLACE = {"ash-p": reference.ash_p_inplace, "ash-b": reference.ash_b_inplace, "ash-s": reference.ash_s_inplace}

SHAPES = [(4, 37), (3, 5, 7), (2, 6, 4, 5), (2, 2, 3, 2, 3)]
PERCENTILES = [0.0, 0.3, 0.65, 0.9, 0.99]


def _k(x: torch.Tensor, percentile: float) -> int:
    return oracle_k(int(np.prod(x.shape[1:])), percentile)


def close(dtype):
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    }[dtype]


# --------------------------------------------------------------------------------------------
# ash_ext.reference: tie-free data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_tie_free(backend, dtype, shape):
    x = distinct(shape, dtype, seed=sum(shape))
    # ASH-S on activation-like (positive) data, where s2 is far from 0
    x_pos = distinct(shape, dtype, seed=sum(shape), positive=True)
    for percentile in PERCENTILES:
        out = backend(x, percentile, "ash-p")
        assert same_values(out, REF["ash-p"](x, percentile)), percentile
        for variant, data in (("ash-b", x), ("ash-s", x_pos)):
            if variant == "ash-s" and _k(x, percentile) == 0:
                continue  # the reference divides by s2 == 0 (see test_reference_ash_s_k_zero)
            ref = REF[variant](data.double(), percentile).to(dtype)  # reference in float64
            torch.testing.assert_close(backend(data, percentile, variant), ref, **close(dtype))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_continuous_same_dtype(backend, shape):
    # continuous random data in its own dtype: the reference run in that dtype too
    x = normal(shape, torch.float32, seed=7)
    x_pos = x.abs() + 0.01
    for percentile in PERCENTILES:
        assert torch.equal(backend(x, percentile, "ash-p"), REF["ash-p"](x, percentile))
        torch.testing.assert_close(backend(x, percentile, "ash-b"), REF["ash-b"](x, percentile), rtol=2e-5, atol=1e-5)
        if _k(x, percentile) > 0:
            torch.testing.assert_close(
                backend(x_pos, percentile, "ash-s"), REF["ash-s"](x_pos, percentile), rtol=2e-5, atol=1e-5
            )


def _per_row_sorted(t: torch.Tensor) -> torch.Tensor:
    return torch.sort(t.reshape(t.shape[0], -1).double(), dim=1).values


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(6, 64), (4, 8, 3, 3)], ids=str)
def test_reference_relu_data_many_zeros(backend, dtype, shape):
    # topk's choice among tied zeros is unspecified: compare the multiset of values per sample
    x = relu_like(shape, dtype, seed=9)
    n = int(np.prod(shape[1:]))
    assert (x == 0).any()
    for percentile in (0.3, 0.5, 0.65, 0.9):
        k = oracle_k(n, percentile)
        for variant in VARIANTS:
            out = backend(x, percentile, variant)
            ref = REF[variant](x, percentile)
            torch.testing.assert_close(_per_row_sorted(out), _per_row_sorted(ref), **close(dtype))
            assert torch.equal(
                (out != 0).sum(dim=tuple(range(1, x.dim()))), (ref != 0).sum(dim=tuple(range(1, x.dim())))
            )
            if variant == "ash-b":
                # every kept position holds the (non-zero) fill: exactly k non-zeros
                assert ((out != 0).reshape(shape[0], -1).sum(1) == k).all()


@pytest.mark.parametrize("backend", backend_params())
def test_reference_with_ties_same_count_and_values(backend):
    x = integer_ties((8, 50), torch.float32, seed=10, low=0, high=6)
    for percentile in (0.2, 0.5, 0.65, 0.8):
        for variant in VARIANTS:
            out, ref = backend(x, percentile, variant), REF[variant](x, percentile)
            torch.testing.assert_close(_per_row_sorted(out), _per_row_sorted(ref), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# pytorch-ood 0.4.0 (out of place, 4-D)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ood_ash():
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import ash as ood

    return ood


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pytorch_ood_functions_continuous(ood_ash, backend, dtype):
    x = normal((3, 8, 5, 5), dtype, seed=20)
    for percentile in PERCENTILES:
        for variant, fn in (("ash-p", ood_ash.ash_p), ("ash-b", ood_ash.ash_b), ("ash-s", ood_ash.ash_s)):
            x0 = x.clone()
            ref = fn(x, percentile)
            assert torch.equal(x, x0)  # 0.4.0 is out of place
            out = backend(x, percentile, variant)
            if variant == "ash-p":
                assert torch.equal(out, ref)
            else:
                torch.testing.assert_close(out, ref, **close(dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_pytorch_ood_functions_channels_last(ood_ash, backend):
    x = normal((2, 6, 4, 3), torch.float32, seed=21).to(memory_format=torch.channels_last)
    for variant, fn in (("ash-p", ood_ash.ash_p), ("ash-b", ood_ash.ash_b), ("ash-s", ood_ash.ash_s)):
        torch.testing.assert_close(backend(x, 0.65, variant), fn(x, 0.65), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_pytorch_ood_functions_relu(ood_ash, backend):
    x = relu_like((4, 16, 3, 3), torch.float32, seed=22)
    for percentile in (0.3, 0.65, 0.9):
        for variant, fn in (("ash-p", ood_ash.ash_p), ("ash-b", ood_ash.ash_b), ("ash-s", ood_ash.ash_s)):
            out, ref = backend(x, percentile, variant), fn(x, percentile)
            torch.testing.assert_close(_per_row_sorted(out), _per_row_sorted(ref), rtol=2e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# pytorch-ood 0.3.3 (in place), executed from the seed text
# --------------------------------------------------------------------------------------------

SEED = pathlib.Path("/work/shared/seed/pytorch_ood_ash_0.3.3.txt")


@pytest.fixture(scope="module")
def ood_033():
    """pytorch-ood 0.3.3's ash_p / ash_b / ash_s, run from the published source text."""
    if not SEED.exists():
        pytest.skip(f"{SEED} is not available")
    text = SEED.read_text()
    start = text.index("import logging")
    end = text.index("[docs] class ASH")
    source = text[start:end]
    # drop the package-relative imports the functions do not use
    source = "\n".join(line for line in source.splitlines() if not re.match(r"\s*from \.", line))
    namespace: dict = {}
    exec(compile(source, str(SEED), "exec"), namespace)
    return {"ash-p": namespace["ash_p"], "ash-b": namespace["ash_b"], "ash-s": namespace["ash_s"]}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_inplace_vs_pytorch_ood_033(ood_033, backend, variant, dtype):
    x = normal((3, 6, 4, 4), dtype, seed=23)
    for percentile in (0.0, 0.5, 0.65, 0.9):
        x_ref, x_ext = x.clone(), x.clone()
        ret_ref = ood_033[variant](x_ref, percentile)
        ret_ext = backend(x_ext, percentile, variant, inplace=True)
        assert ret_ext is x_ext
        tol = close(dtype)
        if variant in ("ash-p", "ash-b"):
            # 0.3.3 writes the result into x and returns x
            assert ret_ref is x_ref
            if variant == "ash-p":
                assert torch.equal(x_ext, x_ref)
            else:
                torch.testing.assert_close(x_ext, x_ref, **tol)
        else:
            # 0.3.3's ASH-S prunes x in place and returns a rescaled copy; ash_ext writes the
            # rescaled result into x. The results agree; 0.3.3's x holds ASH-P's result.
            assert ret_ref is not x_ref
            torch.testing.assert_close(ret_ext, ret_ref, **tol)
            assert torch.equal(x_ref, ash_ext.fallback.ash_p(x, percentile))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inplace_vs_reference_inplace(variant):
    # ash_ext.reference's *_inplace functions against the seed behaviour of 0.3.3
    x = normal((2, 5, 3, 3), torch.float64, seed=24)
    x_ref, x_ext = x.clone(), x.clone()
    ret_ref = REF_INPLACE[variant](x_ref, 0.65)
    ret_ext = fallback.shape_(x_ext, oracle_k(45, 0.65), variant)
    assert ret_ext is x_ext
    if variant == "ash-s":
        torch.testing.assert_close(ret_ext, ret_ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(x_ref, reference.ash_p(x, 0.65))
    else:
        assert ret_ref is x_ref
        torch.testing.assert_close(x_ext, x_ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Every backend against every other
# --------------------------------------------------------------------------------------------


def _implementations():
    impls = [("fallback", lambda x, p, v: fallback.shape(x, oracle_k(int(np.prod(x.shape[1:])), p), v))]
    impls.append(("reference", lambda x, p, v: REF[v](x, p)))
    if kernel_available():
        impls.append(("kernel", lambda x, p, v: ash_ext.shape(x, p, v)))
        impls.append(
            (
                "raw-op",
                lambda x, p, v: torch.ops.ash_ext.ash(x, oracle_k(int(np.prod(x.shape[1:])), p), VARIANTS.index(v)),
            )
        )
    for b in BACKENDS:
        if b.name == "kernel" and not kernel_available():
            continue
        impls.append((f"public-{b.name}", lambda x, p, v, b=b: b(x, p, v)))
    return impls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_all_backends_agree_tie_free(dtype):
    impls = _implementations()
    assert len(impls) >= 3
    x = distinct((4, 3, 4, 5), dtype, seed=25)
    x_pos = distinct((4, 3, 4, 5), dtype, seed=25, positive=True)
    for percentile in (0.0, 0.4, 0.65, 0.95, 1.0):
        for variant in VARIANTS:
            if variant == "ash-s" and percentile == 1.0:
                continue  # k == 0: the reference divides by s2 == 0 (see test_reference_ash_s_k_zero)
            data = x_pos if variant == "ash-s" else x
            results = [(name, fn(data, percentile, variant)) for name, fn in impls]
            base_name, base = results[0]
            for name, r in results[1:]:
                if variant == "ash-p":
                    assert torch.equal(r, base), (name, base_name, percentile)
                else:
                    torch.testing.assert_close(
                        r, base, **close(dtype), msg=f"{name} vs {base_name} {variant} {percentile}"
                    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_kernel_and_fallback_agree_with_ties(dtype):
    if not kernel_available():
        pytest.skip("the compiled extension is not loaded")
    # ties at the threshold: both implement the same tie rule, so even positions agree
    x = integer_ties((6, 4, 3, 3), dtype, seed=26)
    for percentile in (0.1, 0.5, 0.65, 0.9):
        assert bits_equal(ash_ext.ash_p(x, percentile), fallback.ash_p(x, percentile))
        for variant in ("ash-b", "ash-s"):
            # integer data: sums are exact in every accumulation order; the exp of ASH-S may
            # come from different libraries (1 ulp)
            a = ash_ext.shape(x, percentile, variant)
            b = fallback.shape(x, oracle_k(36, percentile), variant)
            if variant == "ash-b":
                assert bits_equal(a, b)
            else:
                assert torch.equal(a != 0, b != 0)
                torch.testing.assert_close(a, b, **close(dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_reference_ash_s_k_zero(backend):
    # The reference divides by s2 == 0 when k == 0 (NaN / inf); ash_ext returns zeros instead.
    x = normal((2, 10), torch.float32, seed=27)
    ref = REF["ash-s"](x, 1.0)
    assert not torch.isfinite(ref).all() or torch.equal(ref, torch.zeros_like(ref))
    out = backend(x, 1.0, "ash-s")
    assert torch.equal(out, torch.zeros_like(x))
