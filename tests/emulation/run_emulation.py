"""Runs the CUDA backend's kernels on the CPU (see shim/cuda_runtime.h) against ash_ext.fallback.

The kernels and their launch sequence are compiled as plain C++ with an emulated CUDA runtime and
registered as the ash_ext ops' CPU implementation in a module of their own; this script then
compares them with the pure-PyTorch fallback on shapes that reach each of the three regimes
(with a small emulated GPU, so that the shapes stay small), on ties, NaN/inf, channels_last,
in place, k = 0 and k = n, forward and backward, and checks that repeated runs are bitwise equal.

Run it in a process of its own: it must not share a process with ash_ext._C (both define the
ash_ext op namespace). ``python tests/emulation/run_emulation.py [--quick]``; exit status 0 when
every check passes. Needs a C++20 compiler; the first build takes about a minute.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

VARIANTS = {"ash-p": 0, "ash-b": 1, "ash-s": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The emulated GPU: 2 multiprocessors (so that regime 2 starts at batch 4 and regime 3 cuts a
# sample into at most 8 chunks), an H100's shared memory per block.
SM_COUNT = 2
SHARED_PER_BLOCK = 227 * 1024
ON_CHIP_BYTES = 48 * 1024


def load_fallback():
    """ash_ext.fallback without running ash_ext/__init__.py (which would load ash_ext._C)."""
    package = types.ModuleType("ash_ext")
    package.__path__ = [os.path.join(ROOT, "ash_ext")]
    sys.modules["ash_ext"] = package
    return importlib.import_module("ash_ext.fallback")


def build():
    from torch.utils.cpp_extension import load

    build_dir = os.environ.get("ASH_EXT_EMULATION_BUILD_DIR") or os.path.join(
        tempfile.gettempdir(), "ash_ext_emulation"
    )
    os.makedirs(build_dir, exist_ok=True)
    return load(
        name="ash_ext_emulated",
        sources=[os.path.join(HERE, "emulated_backend.cpp"), os.path.join(ROOT, "csrc", "ops.cpp")],
        extra_include_paths=[os.path.join(HERE, "shim"), os.path.join(ROOT, "csrc")],
        extra_cflags=["-DASH_EXT_CUDA_EMULATION", "-O1", "-std=c++20", "-Wno-unknown-pragmas"],
        build_directory=build_dir,
        verbose=False,
    )


def kept_count(n: int, percentile: float) -> int:
    return n - int(round(n * percentile))


def make_input(kind: str, shape, dtype, generator) -> torch.Tensor:
    if kind == "normal":
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif kind == "relu":  # about 70% exact zeros, the rest positive: partial ties at 0
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        x = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 0.7, 0.0, x.abs())
    elif kind == "integers":  # a few distinct values: ties everywhere
        x = torch.randint(-3, 4, shape, generator=generator).to(torch.float64)
    elif kind == "special":  # NaN, +-inf, -0.0 and +0.0 among normal values
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (max(8, flat.numel() // 20),), generator=generator)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0], dtype=torch.float64)
        flat[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    elif kind == "constant":
        x = torch.full(shape, 1.5, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return x.to(dtype)


def tolerance(dtype):
    return {
        torch.float16: dict(rtol=2e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
        torch.float32: dict(rtol=2e-5, atol=1e-5),
        torch.float64: dict(rtol=1e-12, atol=1e-12),
    }[dtype]


class Checker:
    def __init__(self, module, fallback):
        self.module = module
        self.fallback = fallback
        self.failures = []
        self.count = 0
        self.regimes_seen = set()

    def regime(self, x: torch.Tensor) -> int:
        n = x[0].numel()
        return self.module.plan(x.shape[0], n, x.element_size())[0]

    def compare(self, label, got, want, variant, dtype, exact=False):
        self.count += 1
        try:
            if exact or variant == "ash-p":
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            else:
                torch.testing.assert_close(got, want, equal_nan=True, **tolerance(dtype))
        except AssertionError as error:
            self.failures.append(f"{label}: {str(error).splitlines()[0:6]}")
            print(f"FAIL {label}\n{error}\n", flush=True)

    def forward(self, x, percentile, variant, label, inplace=False):
        k = kept_count(x[0].numel(), percentile)
        self.regimes_seen.add(self.regime(x))
        want = self.fallback.shape(x.clone(), k, variant)
        if inplace:
            got = x.clone()
            torch.ops.ash_ext.ash_(got, k, VARIANTS[variant])
        else:
            got = torch.ops.ash_ext.ash(x, k, VARIANTS[variant])
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                self.count += 1
                if not got.is_contiguous(memory_format=torch.channels_last):
                    self.failures.append(f"{label}: the output is not channels_last")
        self.compare(f"{label} values", got, want, variant, x.dtype)
        return got

    def backward(self, x, percentile, variant, label):
        k = kept_count(x[0].numel(), percentile)
        self.regimes_seen.add(self.regime(x))
        generator = torch.Generator().manual_seed(7)
        grad = torch.empty_like(x).copy_(torch.randn(x.shape, generator=generator, dtype=torch.float64))
        got = torch.ops.ash_ext.ash_backward(grad, x, k, VARIANTS[variant])
        self.compare(
            f"{label} grad vs formula", got, spec_backward(self.fallback, x, grad, k, variant), "ash-s", x.dtype
        )
        if torch.isfinite(x).all():
            # The fallback's autograd differs only where non-finite inputs meet zero gradients.
            leaf = x.detach().clone().requires_grad_(True)
            (want,) = torch.autograd.grad(self.fallback.shape(leaf, k, variant), leaf, grad)
            self.compare(f"{label} grad vs autograd", got, want, "ash-s", x.dtype)


def spec_backward(fallback, x, grad, k, variant):
    """The backward as ash.h's contract states it, in float64: ASH-P kept g; ASH-B the kept sum
    of g over k; ASH-S E * (kept * (g - G s1 / s2^2) + G / s2) with G the kept sum of g x, or
    ASH-P's where s2 == 0."""
    batch = x.shape[0]
    xs = x.reshape(batch, -1).double()
    gs = grad.reshape(batch, -1).double()
    mask = fallback.kept_mask(x, k).reshape(batch, -1)
    zero = torch.zeros((), dtype=torch.float64)
    pruned = torch.where(mask, gs, zero)
    if k == 0:
        result = torch.zeros_like(gs)
    elif variant == "ash-p":
        result = pruned
    elif variant == "ash-b":
        result = (pruned.sum(1, keepdim=True) / k).expand_as(gs)
    else:
        s1 = xs.sum(1, keepdim=True)
        s2 = torch.where(mask, xs, zero).sum(1, keepdim=True)
        big_g = torch.where(mask, gs * xs, zero).sum(1, keepdim=True)
        degenerate = s2 == 0
        safe_s2 = torch.where(degenerate, torch.ones_like(s2), s2)
        factor = torch.exp(s1 / safe_s2)
        shaped = factor * (torch.where(mask, gs - big_g * s1 / (safe_s2 * safe_s2), zero) + big_g / safe_s2)
        result = torch.where(degenerate, pruned, shaped)
    return torch.empty_like(x).copy_(result.view(x.shape).to(x.dtype))


def shapes_for(dtype, quick):
    """(label, shape) pairs reaching each regime on the emulated 2-SM GPU."""
    element = torch.empty((), dtype=dtype).element_size()
    on_chip_n = ON_CHIP_BYTES // element
    shapes = [
        ("on-chip small", (3, 37)),
        ("on-chip 4-D", (2, 16, 4, 4)),
        ("on-chip limit", (2, on_chip_n)),
        ("block-per-sample", (4, on_chip_n + 1)),
        ("chunked limit+1", (3, on_chip_n + 1)),
        ("chunked", (1, 3 * 4096 * 2 + 123)),
    ]
    if quick:
        return [s for s in shapes if s[0] in ("on-chip small", "on-chip 4-D", "block-per-sample", "chunked")]
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer dtypes and shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    fallback = load_fallback()
    started = time.time()
    module = build()
    module.set_device_limits(SM_COUNT, SHARED_PER_BLOCK)
    print(f"built in {time.time() - started:.0f}s", flush=True)
    checker = Checker(module, fallback)
    generator = torch.Generator().manual_seed(1234)

    dtypes = DTYPES[:2] if args.quick else DTYPES
    kinds = ("normal", "relu", "integers", "special")
    for dtype in dtypes:
        for label, shape in shapes_for(dtype, args.quick):
            t0 = time.time()
            for kind in kinds:
                x = make_input(kind, shape, dtype, generator)
                for variant in VARIANTS:
                    for percentile in (0.65, 0.9):
                        checker.forward(
                            x, percentile, variant, f"{dtype} {label} {shape} {kind} {variant} p={percentile}"
                        )
                checker.backward(x, 0.65, "ash-s", f"{dtype} {label} {shape} {kind} ash-s")
            print(f"{dtype} {label} {shape}: {time.time() - t0:.1f}s", flush=True)

    # Edge cases on one dtype: k = 0, k = n, constant samples, channels_last, in place,
    # a slice (non-zero storage offset, misaligned packs), every backward variant.
    dtype = torch.float32
    for label, shape in shapes_for(dtype, quick=True):
        x = make_input("relu", shape, dtype, generator)
        for variant in VARIANTS:
            checker.forward(x, 0.0, variant, f"{label} k=n {variant}")
            checker.forward(x, 1.0, variant, f"{label} k=0 {variant}")
            checker.forward(x, 0.65, variant, f"{label} in-place {variant}", inplace=True)
            checker.backward(x, 0.65, variant, f"{label} {variant}")
            checker.backward(x, 1.0, variant, f"{label} k=0 {variant}")
        checker.forward(make_input("constant", shape, dtype, generator), 0.5, "ash-s", f"{label} constant")
        big = make_input("relu", (shape[0] + 1,) + tuple(shape[1:]), dtype, generator)
        checker.forward(big[1:], 0.65, "ash-s", f"{label} offset slice")
        odd = make_input("normal", (shape[0], shape[1] + 1) + tuple(shape[2:]), dtype, generator)
        checker.forward(odd[:, 1:], 0.65, "ash-b", f"{label} strided input")

    for label, shape in (
        ("on-chip", (2, 24, 5, 7)),
        ("block-per-sample", (4, 64, 15, 15)),
        ("chunked", (1, 128, 15, 15)),
    ):
        for kind in ("relu", "integers"):
            x = make_input(kind, shape, torch.float32, generator).to(memory_format=torch.channels_last)
            for variant in VARIANTS:
                checker.forward(x, 0.65, variant, f"channels_last {label} {kind} {variant}")
                checker.forward(x, 0.65, variant, f"channels_last in-place {label} {kind} {variant}", inplace=True)
                checker.backward(x, 0.65, variant, f"channels_last {label} {kind} {variant}")

    # Repeated runs (different block and thread orders in the emulator) must be bitwise equal.
    for label, shape in shapes_for(torch.float32, quick=True):
        x = make_input("normal", shape, torch.float32, generator)
        first = torch.ops.ash_ext.ash(x, kept_count(x[0].numel(), 0.65), 2)
        module.seed(99)
        again = torch.ops.ash_ext.ash(x, kept_count(x[0].numel(), 0.65), 2)
        checker.compare(f"{label} run-to-run", again, first, "ash-s", torch.float32, exact=True)
        # Nor may the sums depend on the data's alignment (packs are then loaded element-wise).
        shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
        moved = torch.ops.ash_ext.ash(shifted, kept_count(x[0].numel(), 0.65), 2)
        checker.compare(f"{label} misaligned copy", moved, first, "ash-s", torch.float32, exact=True)

    print(
        f"{checker.count} comparisons, regimes reached: {sorted(checker.regimes_seen)}, "
        f"{len(checker.failures)} failures, {time.time() - started:.0f}s"
    )
    if checker.regimes_seen != {0, 1, 2}:
        print("not every regime was reached")
        return 1
    return 1 if checker.failures else 0


if __name__ == "__main__":
    sys.exit(main())
