"""Runs the CUDA backend's kernels on the CPU (see shim/cuda_runtime.h) against ash_ext.fallback.

The kernels and their launch sequence are compiled as plain C++ with an emulated CUDA runtime and
registered as the ash_ext ops' CPU implementation in a module of their own; this script then
compares them with the pure-PyTorch fallback on shapes that reach each of the four regimes
(with small emulated GPUs, so that the shapes stay small; the cluster regime on an emulated
Hopper), the windows of the launch rules, ties, NaN/inf, channels_last, in place, k = 0 and
k = n, forward and backward, and checks that repeated runs are bitwise equal. After every op it
compares the global-memory bytes the kernels read and wrote (counted by the emulator) with the
launch plan's (planned_traffic, launch_plan.h). A violated launch rule raises, which counts as a
failure.

Run it in a process of its own: it must not share a process with ash_ext._C (both define the
ash_ext op namespace).

    python tests/emulation/run_emulation.py [--quick]           # the logic (quick: CI's set)
    python tests/emulation/run_emulation.py --sanitize address  # AddressSanitizer + UBSan
    python tests/emulation/run_emulation.py --sanitize thread   # ThreadSanitizer: data races

Exit status 0 when every check passes. Needs a C++20 compiler (GCC: the sanitizers' runtimes are
GCC's); each build takes one to three minutes and is cached in the build directory.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import types

import spec_reference
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import sanitizers  # noqa: E402  (tools/sanitizers.py: the flags and runtimes shared with tools/sanitized_cpu.py)

VARIANTS = {"ash-p": 0, "ash-b": 1, "ash-s": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The emulated GPUs: 2 multiprocessors (so that regime 2 starts at batch 4 and regime 3 cuts a
# sample into at most 8 chunks). SMALL has a Turing's 64 KiB of shared memory per block, which
# keeps the on-chip limit low enough to emulate quickly; H100 has 227 KiB.
SM_COUNT = 2
SMALL_SHARED_PER_BLOCK = 64 * 1024
H100_SHARED_PER_BLOCK = 227 * 1024
# The emulated Hopper of the cluster regime: 8 multiprocessors (so that batches of 1 to 3 spread
# over clusters of 3 to 8 blocks), SMALL's shared memory (so that a sample needs a cluster at
# 14k float32 values), clusters of up to 16 blocks.
HOPPER_SM_COUNT = 8
HOPPER_MAX_CLUSTER = 16
REGIMES = {0: "on-chip", 1: "block-per-sample", 2: "chunked", 3: "cluster"}
# Shared-memory facts of launch_plan.h, to place shapes at the regime boundaries and in the
# window of the 48 KiB default limit (dynamic shared memory = histogram + staged sample).
HISTOGRAM_BYTES = 2048 * 4
STATIC_ALLOWANCE = 2048
DEFAULT_DYNAMIC_LIMIT = 48 * 1024
SKIP_MACROS = {torch.float16: "HALF", torch.bfloat16: "BFLOAT16", torch.float64: "DOUBLE"}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_fallback():
    """ash_ext.fallback without running ash_ext/__init__.py (which would load ash_ext._C)."""
    package = types.ModuleType("ash_ext")
    package.__path__ = [os.path.join(ROOT, "ash_ext")]
    sys.modules["ash_ext"] = package
    return importlib.import_module("ash_ext.fallback")


def build(sanitize: str = "none", dtypes=DTYPES, source_root: str = ROOT, build_dir: str = ""):
    """Compiles (or reuses) the emulated backend; returns the imported module."""
    from torch.utils.cpp_extension import load

    skipped = [name for dtype, name in SKIP_MACROS.items() if dtype not in dtypes]
    suffix = "".join("_" + str(d).replace("torch.", "") for d in DTYPES if d in dtypes) if skipped else ""
    name = "ash_ext_emulated" + ("" if sanitize == "none" else "_" + sanitize) + suffix
    build_dir = build_dir or os.environ.get("ASH_EXT_EMULATION_BUILD_DIR") or os.path.join(
        tempfile.gettempdir(), "ash_ext_emulation"
    )
    build_dir = os.path.join(build_dir, name)
    os.makedirs(build_dir, exist_ok=True)
    cflags, ldflags = sanitizers.FLAGS[sanitize]
    here = os.path.join(source_root, "tests", "emulation")
    return load(
        name=name,
        sources=[os.path.join(here, "emulated_backend.cpp"), os.path.join(source_root, "csrc", "ops.cpp")],
        extra_include_paths=[os.path.join(here, "shim"), os.path.join(source_root, "csrc")],
        extra_cflags=["-DASH_EXT_CUDA_EMULATION", "-O1", "-g", "-std=c++20", "-Wno-unknown-pragmas"]
        + [f"-DASH_EMU_SKIP_{name}" for name in skipped]
        + cflags,
        extra_ldflags=ldflags,
        build_directory=build_dir,
        verbose=False,
    )


def rerun_with_sanitizer_runtime(sanitize: str) -> int:
    """Runs this script again with the sanitizer's runtime preloaded (it must be loaded first)."""
    runtime = sanitizers.runtime_path(sanitize)
    if runtime is None:
        print(f"no {sanitizers.RUNTIME[sanitize]} found (GCC's sanitizer runtimes are needed)")
        return 2
    # One thread: torch's OpenMP runtime is not instrumented, and ThreadSanitizer would report its
    # synchronisation as races.
    env = sanitizers.preloaded_env(sanitize, runtime, ASH_EXT_EMULATION_PRELOADED=runtime, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable] + sys.argv, env=env).returncode


def kept_count(n: int, percentile: float) -> int:
    return n - int(round(n * percentile))


def sample_counts(x: torch.Tensor, ks, low=None, high=None):
    """(tied, empty, invalid): samples whose threshold ties must be broken (a dropped value equals
    the k-th largest), samples with k == 0, and samples with k outside [0, n] -- what the
    planned traffic depends on."""
    flat = spec_reference.clamp(x, low, high).reshape(x.shape[0], -1)
    n = flat.shape[1]
    ks = spec_reference.as_ks(x, ks)
    ordered = torch.sort(flat.double(), dim=1, descending=True, stable=True).values
    tied = 0
    for b, k in enumerate(ks.tolist()):
        if 0 < k < n:
            last, first_dropped = ordered[b, k - 1], ordered[b, k]
            tied += int(bool(last == first_dropped) or bool(torch.isnan(last) and torch.isnan(first_dropped)))
    empty = int((ks == 0).sum())
    invalid = int(((ks < 0) | (ks > n)).sum())
    return tied, empty, invalid


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
        self.traffic_checked = set()
        self.traffic_totals = {}  # regime -> [ops, bytes counted, bytes planned, launches]

    def traffic(self, label, x, ks, variant_id, backward=False, low=None, high=None, stats=False, per_sample=False):
        """The global bytes the kernels moved since the last take_traffic, against the plan's."""
        read, written = self.module.take_traffic()
        # The chunked pipeline's zeroed state is a fill kernel on a GPU (at::zeros), on the host here.
        launched = len(self.module.take_launch_log()) + (1 if self.regime(x) == 2 else 0)
        tied, empty, invalid = sample_counts(x, ks, low, high)
        batch, n = x.shape[0], x[0].numel()
        launches, planned_read, planned_written, _ = self.module.planned_traffic(
            batch, n, x.element_size(), variant_id, backward, low is not None or high is not None, per_sample, stats,
            tied, empty, invalid)
        self.count += 1
        regime = self.regime(x)
        self.traffic_checked.add(regime)
        totals = self.traffic_totals.setdefault(REGIMES[regime], [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += read + written
        totals[2] += planned_read + planned_written
        totals[3] += launched
        if (read, written, launched) != (planned_read, planned_written, launches):
            self.failures.append(f"{label}: counted {read} bytes read, {written} written, {launched} launches; "
                                 f"planned {planned_read}, {planned_written}, {launches}")
            print(f"FAIL {label} traffic: counted {read}/{written}/{launched}, "
                  f"planned {planned_read}/{planned_written}/{launches}", flush=True)

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

    def run(self, label, fn, *args):
        """fn(*args), recording a raised error (a violated launch rule, say) as a failure."""
        try:
            return fn(*args)
        except RuntimeError as error:
            self.count += 1
            self.failures.append(f"{label}: {str(error).splitlines()[0]}")
            print(f"FAIL {label}\n{error}\n", flush=True)
            return None

    def forward(self, x, percentile, variant, label, inplace=False):
        return self.run(label, self._forward, x, percentile, variant, label, inplace)

    def backward(self, x, percentile, variant, label):
        return self.run(label, self._backward, x, percentile, variant, label)

    def _forward(self, x, percentile, variant, label, inplace):
        k = kept_count(x[0].numel(), percentile)
        self.regimes_seen.add(self.regime(x))
        want = self.fallback.shape(x.clone(), k, variant)
        if inplace:
            got = x.clone()
            self.module.take_traffic(), self.module.take_launch_log()
            torch.ops.ash_ext.ash_(got, k, VARIANTS[variant])
        else:
            self.module.take_traffic(), self.module.take_launch_log()
            got = torch.ops.ash_ext.ash(x, k, VARIANTS[variant])
        self.traffic(label, x, k, VARIANTS[variant])
        if not inplace:
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                self.count += 1
                if not got.is_contiguous(memory_format=torch.channels_last):
                    self.failures.append(f"{label}: the output is not channels_last")
        self.compare(f"{label} values", got, want, variant, x.dtype)
        return got

    def _backward(self, x, percentile, variant, label):
        k = kept_count(x[0].numel(), percentile)
        self.regimes_seen.add(self.regime(x))
        generator = torch.Generator().manual_seed(7)
        grad = torch.empty_like(x).copy_(torch.randn(x.shape, generator=generator, dtype=torch.float64))
        self.module.take_traffic(), self.module.take_launch_log()
        got = torch.ops.ash_ext.ash_backward(grad, x, k, VARIANTS[variant])
        self.traffic(label, x, k, VARIANTS[variant], backward=True)
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


def on_chip_limit(element: int, shared_per_block: int) -> int:
    """The longest sample (elements) the on-chip regime takes on a device with that limit."""
    return (shared_per_block - STATIC_ALLOWANCE - HISTOGRAM_BYTES) // 16 * 16 // element


def window_n(element: int) -> int:
    """A sample whose on-chip launch needs between 48 KiB minus the kernel's static shared memory
    (at least 288 bytes) and 48 KiB of dynamic shared memory: it fails unless the launcher raised
    the kernel's limit (the review's finding 1)."""
    return (DEFAULT_DYNAMIC_LIMIT - HISTOGRAM_BYTES - 64) // element


def shapes_for(dtype, case_set: str):
    """(label, shape) pairs reaching each regime and the 48 KiB window on the SMALL 2-SM GPU."""
    element = torch.empty((), dtype=dtype).element_size()
    limit = on_chip_limit(element, SMALL_SHARED_PER_BLOCK)
    shapes = [
        ("on-chip small", (3, 37)),
        ("on-chip 4-D", (2, 16, 4, 4)),
        ("on-chip 48 KiB window", (2, window_n(element))),
        ("on-chip limit", (2, limit)),
        ("block-per-sample", (4, limit + 1)),
        ("chunked limit+1", (3, limit + 1)),
        ("chunked", (1, 3 * 4096 * 2 + 123)),
    ]
    keep = {
        "full": [label for label, _ in shapes],
        "quick": ["on-chip small", "on-chip 48 KiB window", "block-per-sample", "chunked"]
        + (["on-chip limit"] if dtype == torch.float32 else []),
        "sanitize": ["on-chip small", "block-per-sample", "chunked"],
        "smoke": ["on-chip small", "on-chip 48 KiB window", "block-per-sample", "chunked"],
    }[case_set]
    return [s for s in shapes if s[0] in keep]


def family_shapes(dtype, case_set: str):
    """(label, shape) for the shaping family's cases: every regime with batch >= 3, so that the
    per-sample ks differ within one launch (the chunked one with several chunks per sample)."""
    element = torch.empty((), dtype=dtype).element_size()
    limit = on_chip_limit(element, SMALL_SHARED_PER_BLOCK)
    shapes = [
        ("on-chip", (5, 37)),
        ("on-chip 4-D", (3, 16, 4, 4)),
        ("block-per-sample", (4, limit + 1)),
        ("chunked", (3, limit + 1)),
    ]
    keep = {
        "full": [label for label, _ in shapes],
        "quick": ["on-chip", "block-per-sample", "chunked"],
        # Regime 2's kernels are regime 1's without staging, and its clamp pass is regime 3's:
        # under the sanitizers (TSan takes minutes a case there) on-chip and chunked cover them.
        "sanitize": ["on-chip", "chunked"],
        "smoke": ["on-chip", "block-per-sample", "chunked"],
    }[case_set]
    return [s for s in shapes if s[0] in keep]


def per_sample_ks(batch: int, n: int, rotate: int = 0) -> torch.Tensor:
    """Per-sample ks with k = 0 and k = n among them (k = 1 and a middle k where batch allows)."""
    pool = [int(round(n * 0.35)), 0, n, 1, int(round(n * 0.1)), n - 1]
    pool = pool[rotate % len(pool):] + pool[:rotate % len(pool)]
    return torch.tensor([pool[b % len(pool)] for b in range(batch)], dtype=torch.int64)


def clamp_configs(x: torch.Tensor):
    """(label, low, high): low only, high only, both; the bounds are values of x itself, so that
    values equal to a bound (and ties made by clamping) occur."""
    finite = x[torch.isfinite(x)].double().sort().values
    low = float(finite[len(finite) * 3 // 10])
    high = float(finite[len(finite) * 8 // 10])
    if low == high:
        high = low + 1.0
    return [("low", low, None), ("high", None, high), ("both", low, high)]


def family_input(kind: str, shape, dtype, generator) -> torch.Tensor:
    x = make_input(kind, shape, dtype, generator)
    if kind == "integers" and x.shape[0] > 1:
        x[1] = -x[1].abs() - 1  # a negative sample: s1 < 0, and SCALE's factor 0 where s2 is 0
    return x


class FamilyChecker:
    """The shaping family's cases (per-sample k, clamp, SCALE, topk_stats) against
    spec_reference, written from the spec."""

    def __init__(self, checker: Checker, module):
        self.checker = checker
        self.module = module

    def forward(self, label, x, ks, variant, low=None, high=None, inplace=False):
        c = self.checker

        def go():
            c.regimes_seen.add(c.regime(x))
            want = spec_reference.forward(x, ks, variant, low, high)
            k, per_sample = (ks, None) if isinstance(ks, int) else (0, ks)
            vid = spec_reference.VARIANT_IDS[variant]
            if inplace:
                got = x.clone()
                self.module.take_traffic(), self.module.take_launch_log()
                torch.ops.ash_ext.ash_(got, k, vid, per_sample, low, high)
            else:
                self.module.take_traffic(), self.module.take_launch_log()
                got = torch.ops.ash_ext.ash(x, k, vid, per_sample, low, high)
            c.traffic(label, x, ks, vid, low=low, high=high, per_sample=per_sample is not None)
            c.compare(f"{label} values", got, want, variant, x.dtype)
            if variant == "ash-p":
                return
            # Clamping in the op is the op on the clamped input, bit for bit.
            if low is not None or high is not None:
                plain = torch.ops.ash_ext.ash(spec_reference.clamp(x, low, high), k,
                                              spec_reference.VARIANT_IDS[variant], per_sample)
                c.compare(f"{label} == op(x.clamp())", got, plain, variant, x.dtype, exact=True)

        c.run(label, go)

    def backward(self, label, x, ks, variant):
        c = self.checker

        def go():
            c.regimes_seen.add(c.regime(x))
            generator = torch.Generator().manual_seed(7)
            grad = torch.empty_like(x).copy_(torch.randn(x.shape, generator=generator, dtype=torch.float64))
            k, per_sample = (ks, None) if isinstance(ks, int) else (0, ks)
            self.module.take_traffic(), self.module.take_launch_log()
            got = torch.ops.ash_ext.ash_backward(grad, x, k, spec_reference.VARIANT_IDS[variant], per_sample)
            c.traffic(label, x, ks, spec_reference.VARIANT_IDS[variant], backward=True,
                      per_sample=per_sample is not None)
            c.compare(f"{label} grad", got, spec_reference.backward(grad, x, ks, variant), "scale", x.dtype)

        c.run(label, go)

    def stats(self, label, x, ks, low=None, high=None):
        c = self.checker

        def go():
            c.regimes_seen.add(c.regime(x))
            k, per_sample = (ks, None) if isinstance(ks, int) else (0, ks)
            self.module.take_traffic(), self.module.take_launch_log()
            got = torch.ops.ash_ext.topk_stats(x, k, per_sample, low, high)
            c.traffic(label, x, ks, 2, low=low, high=high, stats=True, per_sample=per_sample is not None)
            self.compare_stats(label, x, got, spec_reference.stats(x, ks, low, high))

        c.run(label, go)

    def compare_stats(self, label, x, got, want):
        c = self.checker
        threshold, total, kept = got
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        c.count += 1
        problems = []
        if threshold.dtype != x.dtype or total.dtype != acc or kept.dtype != acc:
            problems.append(f"dtypes {threshold.dtype}, {total.dtype}, {kept.dtype}")
        if not torch.equal(torch.isnan(threshold), torch.isnan(want[0])) or not torch.equal(
            torch.nan_to_num(threshold, nan=0.0), torch.nan_to_num(want[0], nan=0.0)
        ):
            problems.append(f"threshold {threshold.tolist()} != {want[0].tolist()}")
        if threshold.dtype == x.dtype and torch.signbit(threshold[threshold == 0]).any():
            problems.append("a threshold of -0.0")
        # Sums: the kernel's order in its accumulation type vs float64.
        scale = spec_reference.clamp(x, None, None).reshape(x.shape[0], -1).double().abs().nan_to_num(
            nan=0.0, posinf=0.0, neginf=0.0).sum(1)
        eps = 1e-12 if acc == torch.float64 else 2e-6
        for name, value, reference in (("total", total, want[1]), ("kept", kept, want[2])):
            value = value.double()
            same_nan = torch.equal(torch.isnan(value), torch.isnan(reference))
            finite = torch.isfinite(reference)
            close = (value[finite] - reference[finite]).abs() <= eps * (scale[finite] + 1)
            infinite = ~finite & ~torch.isnan(reference)
            same_inf = torch.equal(value[infinite], reference[infinite])
            if not (same_nan and bool(close.all()) and same_inf):
                problems.append(f"{name} {value.tolist()} != {reference.tolist()}")
        if problems:
            c.failures.append(f"{label}: {'; '.join(problems)[:600]}")
            print(f"FAIL {label}\n" + "\n".join(problems), flush=True)

    def unchecked(self, label, x, ks, variant, backward=False):
        """A per-sample k outside [0, n] (unchecked on CUDA): that sample is NaN."""
        c = self.checker

        def go():
            c.regimes_seen.add(c.regime(x))
            empty = torch.empty(0, dtype=x.dtype)
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            if variant == "stats":
                threshold = torch.empty(x.shape[0], dtype=x.dtype)
                total = torch.empty(x.shape[0], dtype=acc)
                kept = torch.empty(x.shape[0], dtype=acc)
                self.module.take_traffic(), self.module.take_launch_log()
                self.module.run_unchecked(x, empty, threshold, ks, -1, total, kept)
                c.traffic(label, x, ks, 2, stats=True, per_sample=True)
                self.compare_stats(label, x, (threshold, total, kept), spec_reference.stats(x, ks))
                return
            out = torch.empty_like(x)
            vid = spec_reference.VARIANT_IDS[variant]
            if backward:
                grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(x.dtype)
                self.module.take_traffic(), self.module.take_launch_log()
                self.module.run_unchecked(x, grad, out, ks, vid, empty, empty)
                c.traffic(label, x, ks, vid, backward=True, per_sample=True)
                want = spec_reference.backward(grad, x, ks, variant)
            else:
                self.module.take_traffic(), self.module.take_launch_log()
                self.module.run_unchecked(x, empty, out, ks, vid, empty, empty)
                c.traffic(label, x, ks, vid, per_sample=True)
                want = spec_reference.forward(x, ks, variant)
            c.compare(f"{label} values", out, want, "scale", x.dtype)

        c.run(label, go)


def run_family_race_checks(family: FamilyChecker, dtypes, generator) -> None:
    """The family's cases under ThreadSanitizer: each kind of pass the family adds (per-sample ks,
    clamping, the stats and the invalid-k fill, forward, backward and in place) once per regime
    that has its own kernels, on a batch of 2 (the sanitize set's 20 ops on a batch of 3 took TSan
    225 s in the chunked regime alone; races do not depend on the variant or the batch size)."""
    for dtype in dtypes:
        for label, shape in family_shapes(dtype, "sanitize"):
            t0 = time.time()
            shape = (min(shape[0], 2),) + shape[1:]
            x = family_input("integers", shape, dtype, generator)
            n = x[0].numel()
            where = f"family race {dtype} {label} {shape}"
            ks = per_sample_ks(shape[0], n)
            family.forward(f"{where} ash-s ks={ks.tolist()}", x, ks, "ash-s")
            family.forward(f"{where} scale ks clamp", x, ks, "scale", -1.0, 2.0)
            family.backward(f"{where} ash-s backward ks={ks.tolist()}", x, ks, "ash-s")
            family.forward(f"{where} ash-p ks clamp in-place", x, ks, "ash-p", 0.0, 2.0, inplace=True)
            family.stats(f"{where} stats ks clamp", x, ks, 0.0, None)
            bad = ks.clone()
            bad[0] = -1
            family.unchecked(f"{where} invalid ks {bad.tolist()} scale", x, bad, "scale")
            print(f"family race {dtype} {label} {shape}: {time.time() - t0:.1f}s", flush=True)


def run_family_checks(checker: Checker, module, case_set: str, dtypes, generator, races_only: bool = False) -> None:
    family = FamilyChecker(checker, module)
    if races_only:
        run_family_race_checks(family, dtypes, generator)
        return
    kinds = {
        "full": ("relu", "integers", "special", "normal"),
        "quick": ("relu", "integers", "special"),
        "sanitize": ("integers",),
        "smoke": ("relu", "integers"),
    }[case_set]
    variants = tuple(spec_reference.VARIANT_IDS)
    for dtype in dtypes:
        # The quick set runs every kind of data in float32 and one (small integers: ties) in the
        # other dtypes, whose code differs from float32's only in loads, stores and rounding.
        dtype_kinds = kinds if case_set != "quick" or dtype == torch.float32 else ("integers",)
        for label, shape in family_shapes(dtype, case_set):
            t0 = time.time()
            for kind_index, kind in enumerate(dtype_kinds):
                x = family_input(kind, shape, dtype, generator)
                batch, n = x.shape[0], x[0].numel()
                where = f"family {dtype} {label} {shape} {kind}"
                ks = per_sample_ks(batch, n, rotate=kind_index)
                clamps = clamp_configs(x)
                for v, variant in enumerate(variants if case_set != "sanitize" else ("ash-s", "scale")):
                    family.forward(f"{where} {variant} ks={ks.tolist()}", x, ks, variant)
                    name, low, high = clamps[(v + kind_index) % len(clamps)]
                    family.forward(f"{where} {variant} ks clamp {name} [{low}, {high}]", x, ks, variant, low, high)
                    family.backward(f"{where} {variant} backward ks={ks.tolist()}", x, ks, variant)
                name, low, high = clamps[kind_index % len(clamps)]
                family.forward(f"{where} scale uniform k clamp {name} in-place", x, kept_count(n, 0.65), "scale",
                               low, high, inplace=True)
                family.forward(f"{where} ash-p ks clamp both in-place", x, ks, "ash-p", *clamps[2][1:], inplace=True)
                family.forward(f"{where} scale k=0", x, 0, "scale")
                family.backward(f"{where} scale backward k=0", x, 0, "scale")
                family.stats(f"{where} stats ks", x, ks)
                family.stats(f"{where} stats ks clamp {name}", x, ks, low, high)
                family.stats(f"{where} stats uniform k", x, kept_count(n, 0.65))
                family.stats(f"{where} stats k=0", x, 0)
                if kind == dtype_kinds[0]:
                    bad = ks.clone()
                    bad[0] = -1
                    bad[-1] = n + 1
                    for variant in ("ash-b", "scale", "stats"):
                        family.unchecked(f"{where} invalid ks {bad.tolist()} {variant}", x, bad, variant)
                    family.unchecked(f"{where} invalid ks {bad.tolist()} ash-s backward", x, bad, "ash-s", True)
            print(f"family {dtype} {label} {shape}: {time.time() - t0:.1f}s", flush=True)
    if case_set == "sanitize":
        return
    # channels_last: the tie rule in logical order, with per-sample ks and clamping.
    channels_last_shapes = (
        ("on-chip", (3, 24, 5, 7)),
        ("block-per-sample", (4, 64, 15, 15)),
        ("chunked", (3, 64, 15, 15)),
    )
    for label, shape in channels_last_shapes:
        x = make_input("integers", shape, torch.float32, generator).to(memory_format=torch.channels_last)
        ks = per_sample_ks(shape[0], x[0].numel())
        for variant in ("ash-p", "scale"):
            family.forward(f"family channels_last {label} {variant}", x, ks, variant, -1.0, 2.0)
            family.forward(f"family channels_last {label} {variant} in-place", x, ks, variant, -1.0, 2.0, inplace=True)
            family.backward(f"family channels_last {label} {variant} backward", x, ks, variant)
        family.stats(f"family channels_last {label} stats", x, ks, -1.0, 2.0)


def cluster_shapes(dtype, case_set: str):
    """(label, shape) pairs for the cluster regime on the emulated Hopper: a sample that needs 3
    blocks in a batch of 2, one that needs 3 alone (spread to 8 blocks), one that fits a block
    but spreads over 2 blocks as the only sample, and 4-D maps."""
    element = torch.empty((), dtype=dtype).element_size()
    per_block = on_chip_limit(element, SMALL_SHARED_PER_BLOCK)
    shapes = [
        ("cluster", (2, 2 * per_block + 2000)),
        ("cluster batch 1", (1, 2 * per_block + 5)),
        ("cluster spread", (1, 40 * 1024 // element + 3)),
        ("cluster 4-D", (3, 2, 8, per_block // 8 + 1)),
        ("cluster small", (1, per_block + 1000)),  # 3 blocks: the sanitizers' case (TSan is slow)
    ]
    keep = {
        "full": [label for label, _ in shapes],
        # (16-bit: the spread sample only, 6 blocks: the batch-of-2 case took 17 s each.)
        "quick": (["cluster", "cluster batch 1"] if element == 4 else [] if element == 2 else ["cluster"])
        + ["cluster spread"],
        "sanitize": ["cluster small"],
        "smoke": ["cluster", "cluster spread"],
    }[case_set]
    return [s for s in shapes if s[0] in keep]


def run_cluster_checks(checker: Checker, module, case_set: str, dtypes, generator) -> None:
    """The cluster regime on an emulated Hopper: every dtype, variant and tie case against the
    fallback, the shaping family's cases, layouts, in place, and the regimes side by side."""
    module.set_device_limits(HOPPER_SM_COUNT, SMALL_SHARED_PER_BLOCK, HOPPER_MAX_CLUSTER)
    family = FamilyChecker(checker, module)
    kinds = {"full": ("normal", "relu", "integers", "special"), "quick": ("relu", "integers", "special"),
             "sanitize": ("integers",), "smoke": ("relu", "integers")}[case_set]
    variants = ("ash-s", "ash-p") if case_set == "sanitize" else tuple(VARIANTS)
    for dtype in dtypes:
        for label, shape in cluster_shapes(dtype, case_set):
            t0 = time.time()
            for kind_index, kind in enumerate(kinds):
                # (family_input's negative sample is for the family's cases: the fallback's own
                # bfloat16 autograd, which the backward is also compared with, is too coarse there.)
                x = make_input(kind, shape, dtype, generator)
                where = f"{dtype} {label} {shape} {kind}"
                if checker.regime(x) != 3:
                    plan = module.plan(shape[0], x[0].numel(), x.element_size())
                    checker.failures.append(f"{where}: not in the cluster regime: {plan}")
                for variant in variants:
                    checker.forward(x, 0.65, variant, f"{where} {variant}")
                if case_set != "sanitize":
                    checker.backward(x, 0.65, "ash-s", f"{where} ash-s")
                x = family_input(kind, shape, dtype, generator)
                batch, n = x.shape[0], x[0].numel()
                ks = per_sample_ks(batch, n, rotate=kind_index)
                low, high = clamp_configs(x)[kind_index % 3][1:]
                family.forward(f"family {where} scale ks clamp", x, ks, "scale", low, high)
                if case_set == "sanitize":
                    continue  # (ThreadSanitizer takes minutes a case: the barriers are all above)
                family.backward(f"family {where} scale backward ks", x, ks, "scale")
                family.stats(f"family {where} stats ks clamp", x, ks, low, high)
                if kind_index == 0 and case_set != "sanitize":
                    bad = ks.clone()
                    bad[0] = -1
                    for variant in ("ash-b", "stats"):
                        family.unchecked(f"family {where} invalid ks {bad.tolist()} {variant}", x, bad, variant)
                    family.unchecked(f"family {where} invalid ks ash-s backward", x, bad, "ash-s", True)
            print(f"cluster {dtype} {label} {shape}: {time.time() - t0:.1f}s", flush=True)
    if case_set == "sanitize":
        x = make_input("relu", cluster_shapes(torch.float32, "sanitize")[0][1], dtypes[0], generator)
        checker.forward(x, 0.65, "ash-b", "cluster in-place", inplace=True)
        return
    dtype = torch.float32
    x = make_input("relu", cluster_shapes(dtype, "smoke")[0][1], dtype, generator)
    for variant in VARIANTS:
        checker.forward(x, 0.0, variant, f"cluster k=n {variant}")
        checker.forward(x, 1.0, variant, f"cluster k=0 {variant}")
        checker.forward(x, 0.65, variant, f"cluster in-place {variant}", inplace=True)
        checker.backward(x, 0.65, variant, f"cluster backward {variant}")
    checker.forward(make_input("constant", x.shape, dtype, generator), 0.5, "ash-s", "cluster constant")
    first = checker.run("cluster run-to-run", torch.ops.ash_ext.ash, x, kept_count(x[0].numel(), 0.65), 2)
    module.seed(5)
    again = checker.run("cluster run-to-run", torch.ops.ash_ext.ash, x, kept_count(x[0].numel(), 0.65), 2)
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
    moved = checker.run("cluster misaligned", torch.ops.ash_ext.ash, shifted, kept_count(x[0].numel(), 0.65), 2)
    if first is not None and again is not None and moved is not None:
        checker.compare("cluster run-to-run", again, first, "ash-s", dtype, exact=True)
        checker.compare("cluster misaligned copy", moved, first, "ash-s", dtype, exact=True)
    for kind in ("relu", "integers"):
        y = make_input(kind, (2, 64, 15, 15), dtype, generator).to(memory_format=torch.channels_last)
        for variant in ("ash-p", "ash-s"):
            checker.forward(y, 0.65, variant, f"cluster channels_last {kind} {variant}")
            checker.forward(y, 0.65, variant, f"cluster channels_last in-place {kind} {variant}", inplace=True)
            checker.backward(y, 0.65, variant, f"cluster channels_last {kind} {variant}")
        family.forward(f"family cluster channels_last {kind} scale", y, per_sample_ks(2, y[0].numel()), "scale",
                       -1.0, 2.0)
    # More than 8 blocks: the non-portable cluster size (its attribute set by the launcher).
    per_block = on_chip_limit(4, SMALL_SHARED_PER_BLOCK)
    big = make_input("integers", (1, 9 * per_block + 100), dtype, generator)
    if module.plan(1, big[0].numel(), 4)[4] <= 8:
        checker.failures.append(f"no cluster of more than 8 blocks for {list(big.shape)}")
    for variant in ("ash-p", "ash-s"):
        checker.forward(big, 0.65, variant, f"cluster of {module.plan(1, big[0].numel(), 4)[4]} {variant}")
    compare_regimes(checker, module, generator, dtypes)


FORCED_REGIMES = {"cluster": ("cluster",), "sample-per-block": ("on-chip", "block-per-sample"), "chunked": ("chunked",)}


def compare_regimes(checker: Checker, module, generator, dtypes) -> None:
    """ASH_EXT_CUDA_REGIME forces each regime on the same inputs: ASH-P bit-identical across them,
    the sums' variants within tolerance, and each regime's counted traffic its own plan's."""
    cases = [((2, 2 * on_chip_limit(4, SMALL_SHARED_PER_BLOCK) + 2000), torch.float32),
             ((3, 4000), torch.bfloat16 if torch.bfloat16 in dtypes else dtypes[-1]), ((2, 3000), torch.float32)]
    try:
        for shape, dtype in cases:
            for kind in ("relu", "integers"):
                x = make_input(kind, shape, dtype, generator)
                outputs = {}
                for name in ("auto", "cluster", "sample-per-block", "chunked"):
                    os.environ["ASH_EXT_CUDA_REGIME"] = name
                    regime = REGIMES[checker.regime(x)]
                    if name != "auto" and regime not in FORCED_REGIMES[name]:
                        checker.failures.append(f"ASH_EXT_CUDA_REGIME={name} planned {regime} for {shape}")
                    for variant in ("ash-p", "ash-b", "ash-s"):
                        outputs[(name, variant)] = checker.forward(
                            x, 0.65, variant, f"regime {name} ({regime}) {dtype} {shape} {kind} {variant}")
                    checker.backward(x, 0.65, "ash-s", f"regime {name} ({regime}) {dtype} {shape} {kind} backward")
                for variant in ("ash-p", "ash-b", "ash-s"):
                    base = outputs[("auto", variant)]
                    for name in ("cluster", "sample-per-block", "chunked"):
                        other = outputs[(name, variant)]
                        if base is not None and other is not None:
                            checker.compare(f"regime {name} vs auto {dtype} {shape} {kind} {variant}", other, base,
                                            variant, dtype)
        # A regime that cannot serve the shape, or a misspelt one: a ValueError naming it.
        x = make_input("relu", (2, 3000), torch.float32, generator)
        refused = (("cluster", (SM_COUNT, SMALL_SHARED_PER_BLOCK, 0), "has no thread-block clusters"),
                   ("clusters", (HOPPER_SM_COUNT, SMALL_SHARED_PER_BLOCK, 8),
                    "ASH_EXT_CUDA_REGIME=clusters: expected auto, cluster"))
        for name, limits, message in refused:
            module.set_device_limits(*limits)
            os.environ["ASH_EXT_CUDA_REGIME"] = name
            checker.count += 1
            try:
                torch.ops.ash_ext.ash(x, 1000, 2)
                checker.failures.append(f"ASH_EXT_CUDA_REGIME={name} on {limits}: no error")
            except ValueError as error:
                if message not in str(error):
                    checker.failures.append(f"ASH_EXT_CUDA_REGIME={name}: {error}")
        module.set_device_limits(HOPPER_SM_COUNT, SMALL_SHARED_PER_BLOCK, HOPPER_MAX_CLUSTER)
    finally:
        os.environ.pop("ASH_EXT_CUDA_REGIME", None)


def run_checks(module, fallback, case_set: str, dtypes, races_only: bool = False) -> Checker:
    checker = Checker(module, fallback)
    generator = torch.Generator().manual_seed(1234)
    module.set_device_limits(SM_COUNT, SMALL_SHARED_PER_BLOCK, 0)

    kinds = {
        "full": ("normal", "relu", "integers", "special"),
        "quick": ("relu", "integers", "special"),
        "sanitize": ("relu",),
        "smoke": ("relu", "integers"),
    }[case_set]
    variants = ("ash-s",) if case_set == "sanitize" else tuple(VARIANTS)
    percentiles = (0.65, 0.9) if case_set == "full" else (0.65,)
    for dtype in dtypes:
        for label, shape in shapes_for(dtype, case_set):
            t0 = time.time()
            for kind in kinds:
                x = make_input(kind, shape, dtype, generator)
                for variant in variants:
                    for percentile in percentiles:
                        checker.forward(
                            x, percentile, variant, f"{dtype} {label} {shape} {kind} {variant} p={percentile}"
                        )
                checker.backward(x, 0.65, "ash-s", f"{dtype} {label} {shape} {kind} ash-s")
                if case_set == "sanitize":
                    checker.forward(x, 0.65, "ash-p", f"{dtype} {label} {kind} in-place", inplace=True)
            print(f"{dtype} {label} {shape}: {time.time() - t0:.1f}s", flush=True)
    run_family_checks(checker, module, case_set, dtypes, generator, races_only)
    if case_set == "sanitize":
        x = make_input("integers", (1, 64, 15, 15), dtypes[0], generator).to(memory_format=torch.channels_last)
        checker.forward(x, 0.65, "ash-b", "channels_last chunked integers")
        checker.backward(x, 0.65, "ash-p", "channels_last chunked integers")
        run_cluster_checks(checker, module, case_set, dtypes, generator)
        return checker

    # Edge cases on one dtype: k = 0, k = n, constant samples, channels_last, in place,
    # a slice (non-zero storage offset, misaligned packs), every backward variant.
    dtype = torch.float32
    for label, shape in shapes_for(dtype, "smoke"):
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

    channels_last = [
        ("on-chip", (2, 24, 5, 7)),
        ("block-per-sample", (4, 64, 15, 15)),
        ("chunked", (1, 128, 15, 15)),
    ]
    for label, shape in channels_last:
        for kind in ("relu", "integers"):
            x = make_input(kind, shape, torch.float32, generator).to(memory_format=torch.channels_last)
            for variant in VARIANTS:
                checker.forward(x, 0.65, variant, f"channels_last {label} {kind} {variant}")
                checker.forward(x, 0.65, variant, f"channels_last in-place {label} {kind} {variant}", inplace=True)
                checker.backward(x, 0.65, variant, f"channels_last {label} {kind} {variant}")

    # Repeated runs (different block and thread orders in the emulator) must be bitwise equal.
    for label, shape in shapes_for(torch.float32, "smoke"):
        x = make_input("normal", shape, torch.float32, generator)
        first = checker.run(label, torch.ops.ash_ext.ash, x, kept_count(x[0].numel(), 0.65), 2)
        module.seed(99)
        again = checker.run(label, torch.ops.ash_ext.ash, x, kept_count(x[0].numel(), 0.65), 2)
        if first is not None and again is not None:
            checker.compare(f"{label} run-to-run", again, first, "ash-s", torch.float32, exact=True)
        # Nor may the sums depend on the data's alignment (packs are then loaded element-wise).
        shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
        moved = checker.run(label, torch.ops.ash_ext.ash, shifted, kept_count(x[0].numel(), 0.65), 2)
        if first is not None and moved is not None:
            checker.compare(f"{label} misaligned copy", moved, first, "ash-s", torch.float32, exact=True)

    # An H100's opt-in limit: WideResNet's [B, 640, 8, 8] maps (160 KiB in float32) go on chip.
    module.set_device_limits(SM_COUNT, H100_SHARED_PER_BLOCK, 0)
    x = make_input("relu", (2, 640, 8, 8), torch.float32, generator)
    if module.plan(2, x[0].numel(), 4)[0] != 0:
        checker.failures.append("WideResNet maps are not on chip with an H100's shared memory")
    for variant in VARIANTS:
        checker.forward(x, 0.65, variant, f"H100 on-chip [2, 640, 8, 8] {variant}")
    checker.backward(x, 0.65, "ash-s", "H100 on-chip [2, 640, 8, 8]")
    family = FamilyChecker(checker, module)
    ks = torch.tensor([kept_count(x[0].numel(), 0.65), 0])
    family.forward("H100 on-chip [2, 640, 8, 8] scale ks clamp", x, ks, "scale", 0.5, 2.0)
    family.stats("H100 on-chip [2, 640, 8, 8] stats ks clamp", x, ks, 0.5, 2.0)
    run_cluster_checks(checker, module, case_set, dtypes, generator)
    return checker


def run_large_sizes(scale: float, build_dir: str) -> int:
    """tools/large_sizes.py's checks through the CUDA kernels, on an emulated H100 (132
    multiprocessors, 227 KiB of shared memory a block, clusters of up to 16 blocks)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import large_sizes

    started = time.time()
    module = build("none", (torch.float16,), ROOT, build_dir)
    module.set_device_limits(132, H100_SHARED_PER_BLOCK, HOPPER_MAX_CLUSTER)
    print(f"built in {time.time() - started:.0f}s; emulated H100", flush=True)
    for label, (batch, n) in large_sizes.shapes(scale):
        regime, *_ = module.plan(batch, n, 2)
        print(f"  {label}: [{batch}, {n}] goes to the {REGIMES[regime]} regime", flush=True)
    return 1 if large_sizes.run_all(scale) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick set (CI's)")
    parser.add_argument("--cases", choices=("full", "quick", "sanitize", "smoke"), help="the set of cases")
    parser.add_argument("--sanitize", choices=("none", "address", "thread"), default="none")
    parser.add_argument("--dtypes", default="", help="comma-separated dtypes to build and check (default: all; "
                        "float32 and float16 with --sanitize)")
    parser.add_argument("--source-root", default=ROOT, help="the ash_ext tree whose kernels to build")
    parser.add_argument("--build-dir", default="", help="where the emulated module is built")
    parser.add_argument("--large", type=float, metavar="SCALE", help="tools/large_sizes.py's checks (sizes past "
                        "2^31 elements, float16) at SCALE times its sizes, on an emulated H100")
    args = parser.parse_args()
    if args.large is not None:
        return run_large_sizes(args.large, args.build_dir)
    if args.dtypes:
        dtypes = tuple(DTYPE_NAMES[name.strip()] for name in args.dtypes.split(","))
    else:
        dtypes = (torch.float32, torch.float16) if args.sanitize != "none" else DTYPES
    if args.sanitize != "none" and "ASH_EXT_EMULATION_PRELOADED" not in os.environ:
        return rerun_with_sanitizer_runtime(args.sanitize)
    os.environ.pop("LD_PRELOAD", None)  # the runtime is loaded; the compiler need not have it
    case_set = args.cases or ("sanitize" if args.sanitize != "none" else "quick" if args.quick else "full")
    torch.manual_seed(0)
    fallback = load_fallback()
    started = time.time()
    module = build(args.sanitize, dtypes, args.source_root, args.build_dir)
    print(f"built in {time.time() - started:.0f}s", flush=True)
    checker = run_checks(module, fallback, case_set, dtypes, races_only=args.sanitize == "thread")
    for regime, (ops, counted, planned, launched) in sorted(checker.traffic_totals.items()):
        print(f"traffic {regime}: {ops} ops, {counted:,} bytes counted, {planned:,} planned, {launched} launches")
    print(
        f"{checker.count} comparisons, regimes reached: {sorted(checker.regimes_seen)}, traffic counted against "
        f"the plan in: {sorted(checker.traffic_checked)}, {len(checker.failures)} failures, "
        f"{time.time() - started:.0f}s"
    )
    if checker.regimes_seen != set(REGIMES) or checker.traffic_checked != set(REGIMES):
        print("not every regime was reached and its traffic counted")
        return 1
    return 1 if checker.failures else 0


if __name__ == "__main__":
    sys.exit(main())
