"""Shared helpers for the ash_ext tests.

The oracle here is written from ASH's documented semantics with numpy in float64, one sample at
a time; it shares no code with ash_ext (not even ``kept_count``), so comparing ash_ext with it is
a real check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import ash_ext
from ash_ext import fallback

VARIANTS = ("ash-p", "ash-b", "ash-s")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def oracle_k(n: int, percentile: float) -> int:
    """k = n - round(n * percentile), rounded half to even on the double product (numpy)."""
    return n - int(np.round(np.float64(n) * np.float64(percentile)))


def to_rows(x: torch.Tensor) -> np.ndarray:
    """x as a float64 numpy array [B, n] in logical row-major order (exact for every float dtype)."""
    t = x.detach().to("cpu", torch.float64).contiguous()
    b = t.shape[0]
    n = int(np.prod(t.shape[1:], dtype=np.int64))
    return t.numpy().reshape(b, n).copy()


def oracle_order(row: np.ndarray) -> np.ndarray:
    """Indices of ``row`` in the order a stable descending sort gives.

    NaN ranks above +inf, -0.0 ties with +0.0, equal values keep their index order.
    """
    isnan = np.isnan(row)
    values = np.where(isnan, 0.0, row) + 0.0  # -0.0 + 0.0 == +0.0
    idx = np.arange(row.shape[0])
    # lexsort: the last key is the primary one.
    return np.lexsort((idx, -values, -isnan.astype(np.int64)))


def oracle_mask_rows(rows: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(rows.shape, dtype=bool)
    for b in range(rows.shape[0]):
        mask[b, oracle_order(rows[b])[:k]] = True
    return mask


def oracle_mask(x: torch.Tensor, k: int) -> np.ndarray:
    """Boolean [B, n] mask (logical order) of the values ASH keeps."""
    return oracle_mask_rows(to_rows(x), k)


def exact_sum(values: np.ndarray) -> float:
    """The correctly rounded float64 sum (math.fsum), NaN / inf as IEEE summation gives them."""
    try:
        return math.fsum(values.tolist())
    except (ValueError, OverflowError):  # inf - inf, or an intermediate overflow
        return float(np.sum(values))


@dataclass
class OracleResult:
    values: np.ndarray  # float64, [B, n]
    mask: np.ndarray  # bool, [B, n]
    k: int
    s1: np.ndarray  # [B]
    s2: np.ndarray  # [B]


def oracle(x: torch.Tensor, percentile: float | None, variant: str, k: int | None = None) -> OracleResult:
    """float64 evaluation of ASH ``variant`` on ``x`` (rows in logical order)."""
    rows = to_rows(x)
    bsz, n = rows.shape
    if k is None:
        k = oracle_k(n, percentile)
    mask = oracle_mask_rows(rows, k)
    out = np.zeros_like(rows)
    s1 = np.zeros(bsz)
    s2 = np.zeros(bsz)
    with np.errstate(all="ignore"):
        for b in range(bsz):
            row = rows[b]
            s1[b] = exact_sum(row)
            s2[b] = exact_sum(row[mask[b]])
            if k == 0:
                continue
            if variant == "ash-p":
                out[b, mask[b]] = row[mask[b]]
            elif variant == "ash-b":
                out[b, mask[b]] = s1[b] / k
            elif variant == "ash-s":
                # s2 == 0: the reference's exp(s1 / 0) is 0 for s1 < 0 (kept), inf or NaN otherwise (1)
                factor = (0.0 if s1[b] < 0 else 1.0) if s2[b] == 0 else np.exp(s1[b] / s2[b])
                out[b, mask[b]] = row[mask[b]] * factor
            else:
                raise AssertionError(variant)
    return OracleResult(out, mask, k, s1, s2)


def round_to(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded to ``dtype`` and back to float64."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype).to(torch.float64).numpy()


def ulp(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The spacing of ``dtype`` at |values| (the spacing above, subnormals included)."""
    fi = torch.finfo(dtype)
    mag = np.abs(values)
    with np.errstate(all="ignore"):
        _, exponent = np.frexp(mag)  # mag = m * 2**exponent, m in [0.5, 1)
        spacing = np.ldexp(np.float64(fi.eps), exponent - 1)
    return np.maximum(np.where(mag > 0, spacing, 0.0), fi.smallest_normal * fi.eps)


def _accumulation_eps(dtype: torch.dtype) -> float:
    return float(np.finfo(np.float64).eps if dtype == torch.float64 else np.finfo(np.float32).eps)


def assert_matches_oracle(
    actual: torch.Tensor,
    x: torch.Tensor,
    percentile: float | None,
    variant: str,
    *,
    k: int | None = None,
    ulps: float = 1.0,
    condition_aware: bool = True,
) -> OracleResult:
    """Check ``actual`` (the result of ASH ``variant`` on ``x``) against the oracle.

    * Shape and dtype are the input's.
    * Non-kept positions are exactly +0.0 (sign bit clear).
    * ASH-P: kept values bit-equal to the input.
    * ASH-B / ASH-S: kept values within ``ulps`` ulp of the float64 oracle rounded to the dtype,
      widened (when ``condition_aware``) by the error that summing s1 and s2 in the
      accumulation dtype may make (n * eps * sum|x| relative to the sums involved).
    * Non-finite oracle values (NaN, inf, including overflow on rounding) must be matched exactly.
    """
    assert actual.shape == x.shape, (actual.shape, x.shape)
    assert actual.dtype == x.dtype, (actual.dtype, x.dtype)
    res = oracle(x, percentile, variant, k=k)
    got = to_rows(actual)
    rows = to_rows(x)
    bsz, n = rows.shape
    if bsz == 0 or n == 0:
        return res
    dtype = x.dtype

    # Non-kept positions: +0.0 exactly.
    dropped = ~res.mask
    assert np.all(got[dropped] == 0), "a value outside the kept set is non-zero"
    assert not np.any(np.signbit(got[dropped])), "a value outside the kept set is -0.0"

    if variant == "ash-p":
        np.testing.assert_array_equal(got[res.mask], rows[res.mask])
        # -0.0 kept stays -0.0
        assert np.array_equal(np.signbit(got[res.mask]), np.signbit(rows[res.mask]))
        return res

    expected = round_to(res.values, dtype)
    finite = np.isfinite(expected)
    # Non-finite expectations: exact (NaN where NaN, same infinity).
    nf = ~finite
    assert np.array_equal(np.isnan(got[nf]), np.isnan(expected[nf])), "NaN positions differ"
    both_inf = nf & ~np.isnan(expected)
    np.testing.assert_array_equal(got[both_inf], expected[both_inf])

    tol = ulps * np.maximum(ulp(expected, dtype), ulp(got, dtype))
    if condition_aware:
        eps = _accumulation_eps(dtype)
        with np.errstate(all="ignore"):
            abs_sum = np.abs(rows).sum(axis=1)
            if variant == "ash-b":
                rel = n * eps * abs_sum / np.abs(res.s1) + 2 * eps
            else:
                ratio = res.s1 / res.s2
                # d(s1/s2) <= (err(s1) + |s1/s2| err(s2)) / |s2|, err(s) <= n * eps * sum|x|
                rel = eps * (n * (abs_sum / np.abs(res.s2)) * (1 + np.abs(ratio)) + np.abs(ratio) + 4)
                rel = np.where(res.s2 == 0, 0.0, rel)
            rel = np.nan_to_num(rel, nan=np.inf, posinf=np.inf)
            magnitude = np.abs(res.values)
            tol = tol + np.where(magnitude > 0, rel[:, None] * magnitude, 0.0)
    with np.errstate(all="ignore"):
        diff = np.abs(got - expected)
    bad = finite & ~(diff <= tol)
    if np.any(bad):
        where = np.argwhere(bad)[:5]
        details = [(tuple(w), got[tuple(w)], expected[tuple(w)], tol[tuple(w)]) for w in where]
        raise AssertionError(
            f"{variant} {dtype}: {int(bad.sum())} values off the oracle; (pos, got, expected, tol): {details}"
        )
    return res


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def relu_like(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Post-ReLU activations: about half exact zeros, the rest positive."""
    return torch.relu(torch.randn(shape, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def integer_ties(shape, dtype=torch.float32, seed=0, low=-3, high=4) -> torch.Tensor:
    """Small integers: many ties, exact sums in every dtype."""
    return torch.randint(low, high, shape, generator=_gen(seed)).to(dtype)


def with_specials(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Normal data sprinkled with NaN, +inf, -inf, -0.0 and +0.0."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    x = torch.where(u < 0.05, torch.tensor(float("nan"), dtype=torch.float64), x)
    x = torch.where((u >= 0.05) & (u < 0.10), torch.tensor(float("inf"), dtype=torch.float64), x)
    x = torch.where((u >= 0.10) & (u < 0.15), torch.tensor(float("-inf"), dtype=torch.float64), x)
    x = torch.where((u >= 0.15) & (u < 0.20), torch.tensor(-0.0, dtype=torch.float64), x)
    x = torch.where((u >= 0.20) & (u < 0.25), torch.tensor(0.0, dtype=torch.float64), x)
    return x.to(dtype)


_DISTINCT_POOLS: dict[torch.dtype, torch.Tensor] = {}


def _distinct_pool(dtype: torch.dtype) -> torch.Tensor:
    """All values of a 16-bit dtype with 1/16 <= |v| < 8 (exactly representable, all distinct)."""
    if dtype not in _DISTINCT_POOLS:
        bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
        vals = bits.view(dtype).to(torch.float64)
        keep = torch.isfinite(vals) & (vals.abs() >= 1 / 16) & (vals.abs() < 8)
        _DISTINCT_POOLS[dtype] = vals[keep]
    return _DISTINCT_POOLS[dtype]


def distinct(shape, dtype=torch.float32, seed=0, positive=False) -> torch.Tensor:
    """Values distinct within each sample (no ties anywhere), exactly representable in ``dtype``."""
    g = _gen(seed)
    b = shape[0]
    n = int(np.prod(shape[1:], dtype=np.int64))
    if dtype in LOW_PRECISION:
        pool = _distinct_pool(dtype)
        if positive:
            pool = pool[pool > 0]
        assert n <= pool.numel()
        rows = [pool[torch.randperm(pool.numel(), generator=g)[:n]] for _ in range(b)]
        out = torch.stack(rows) if rows else torch.empty(0, n, dtype=torch.float64)
        return out.reshape(shape).to(dtype)
    # float32 / float64: a shuffled grid plus jitter, well separated.
    rows = []
    for _ in range(b):
        perm = torch.randperm(n, generator=g).to(torch.float64)
        jitter = torch.rand(n, generator=g, dtype=torch.float64) * 0.5
        v = (perm + jitter) / max(n, 1) * 4.0
        rows.append(v + 0.1 if positive else v - 1.4)
    out = torch.stack(rows) if rows else torch.empty(0, n, dtype=torch.float64)
    return out.reshape(shape).to(dtype)


def gapped(shape, seed=0, gap=0.05, positive_bias=True) -> torch.Tensor:
    """float64 data, distinct in every sample with gaps >= ``gap`` (for gradcheck)."""
    g = _gen(seed)
    b = shape[0]
    n = int(np.prod(shape[1:], dtype=np.int64))
    rows = []
    for _ in range(b):
        perm = torch.randperm(n, generator=g).to(torch.float64)
        jitter = torch.rand(n, generator=g, dtype=torch.float64) * gap * 0.4
        v = perm * gap + jitter
        rows.append(v - (0.25 if positive_bias else 0.5) * n * gap)
    return torch.stack(rows).reshape(shape)


DATA_KINDS: dict[str, Callable] = {
    "normal": normal,
    "relu": relu_like,
    "ties": integer_ties,
    "specials": with_specials,
}


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def kernel_available() -> bool:
    return ash_ext.extension_loaded() and not ash_ext.fallback_forced()


@dataclass(frozen=True)
class Backend:
    name: str
    ash_p: Callable
    ash_b: Callable
    ash_s: Callable

    def fn(self, variant: str) -> Callable:
        return {"ash-p": self.ash_p, "ash-b": self.ash_b, "ash-s": self.ash_s}[variant]

    def __call__(self, x, percentile, variant, *, inplace=False):
        return self.fn(variant)(x, percentile, inplace=inplace)


KERNEL = Backend("kernel", ash_ext.ash_p, ash_ext.ash_b, ash_ext.ash_s)
FALLBACK = Backend("fallback", fallback.ash_p, fallback.ash_b, fallback.ash_s)
BACKENDS = (KERNEL, FALLBACK)

needs_kernel = pytest.mark.skipif(
    not kernel_available(),
    reason="the compiled extension is not loaded (or ASH_EXT_FORCE_FALLBACK is set)",
)


def backend_params():
    return [
        pytest.param(KERNEL, id="kernel", marks=needs_kernel),
        pytest.param(FALLBACK, id="fallback"),
    ]


@pytest.fixture(params=backend_params())
def backend(request) -> Backend:
    if request.param is KERNEL:
        # The public API must really reach the compiled CPU kernel.
        assert ash_ext.implementation_for(torch.zeros(1, 1)) == "cpu-kernel"
    return request.param


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads and signed zeros included), regardless of strides."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ia = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ia), b.contiguous().view(ia))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN == NaN, -0.0 != +0.0 (compares bits of canonicalised NaNs)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    fill = torch.zeros((), dtype=a.dtype)
    return bits_equal(torch.where(nan_a, fill, a), torch.where(nan_b, fill, b))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a test of several seconds (ViT, wide ResNet, torch.compile); deselect with -m 'not slow'"
    )


# --------------------------------------------------------------------------------------------
# Raw ops under hostile arguments: CPU, fake and meta tensors must raise alike
# --------------------------------------------------------------------------------------------

RAW_OPS = ("ash", "ash_", "ash_backward", "topk_stats")
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def args_for(op, x, k=1, variant=0, kps=None, cmin=None, cmax=None, grad=None):
    """The positional arguments of raw op ``op``; the gradient defaults to a zero-stride one."""
    if op == "ash_backward":
        if grad is None:
            grad = torch.ones((), dtype=x.dtype, device=x.device).expand(x.shape)
        return (grad, x, k, variant, kps)
    if op == "topk_stats":
        return (x, k, kps, cmin, cmax)
    return (x, k, variant, kps, cmin, cmax)


def run(op, args):
    return getattr(torch.ops.ash_ext, op)(*args)


def raised(op, args):
    """The exception ``op`` raises on ``args``, or None."""
    try:
        run(op, args)
    except Exception as error:  # noqa: BLE001 -- the caller checks its type
        return error
    return None


def tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


def storage_bytes(t):
    """A copy of the memory behind ``t``: its whole storage, however many elements ``t`` shows."""
    if t.layout != torch.strided:
        return t.clone()
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


def unchanged(before, t):
    if t.layout != torch.strided:
        return torch.equal(before.to_dense(), t.to_dense())
    return torch.equal(before, torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()))


def fake_args(mode, args):
    return tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def first_line(error) -> str:
    return str(error).splitlines()[0]


def assert_raises_alike(op, build, error, token):
    """``build(device, odd_device)`` gives args_for's keywords for a bad call of raw op ``op``.

    On CPU tensors the call must raise exactly ``error`` with ``token`` (the bad value) in the
    message and leave every tensor's memory as it was; the same tensors as fake tensors, and the
    call built on the meta device (the odd device then the CPU), must raise the same exception
    with the same message (the fake kernels' validator in ash_ext/_ops.py mirrors csrc/ops.cpp).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = args_for(op, **build("cpu", "meta"))
    before = [storage_bytes(t) if t.device.type == "cpu" else None for t in tensors(args)]
    cpu = raised(op, args)
    assert type(cpu) is error, repr(cpu)
    assert token in str(cpu), str(cpu)
    for b, t in zip(before, tensors(args)):
        assert b is None or unchanged(b, t)
    if all(t.layout in (torch.strided, torch.sparse_coo) for t in tensors(args)):  # no fake CSR
        with FakeTensorMode() as mode:
            fake = raised(op, fake_args(mode, args))
        assert type(fake) is error and first_line(fake) == first_line(cpu), repr(fake)
    meta = raised(op, args_for(op, **build("meta", "cpu")))
    swapped = first_line(cpu).replace("cpu", "\0").replace("meta", "cpu").replace("\0", "meta")
    assert type(meta) is error and first_line(meta) == swapped, repr(meta)
