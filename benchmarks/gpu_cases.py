"""A grid of shapes for ash_ext's CUDA kernels against the pure-PyTorch fallback (needs a GPU).

The shapes come from the launch planner (``ash_ext._C.cuda_launch_plan``) and the device's limits,
for every dtype: the on-chip limit n and n + 1, the window just under the 48 KiB default limit
of dynamic shared memory, batch 2 x SMs - 1 and 2 x SMs for samples just over the on-chip limit,
long samples, and model shapes (ResNet-50's [B, 2048, 7, 7] and [B, 2048], WideResNet's
[B, 640, 8, 8]); each with tied data (70% zeros, small integers) and continuous data, the 4-D
ones also channels_last. Every case runs ASH-P, ASH-B and ASH-S out of place, in place and
backward and compares them with ash_ext.fallback (see check_case). The "-family" cases check the
shaping family's op features instead (check_family): per-sample k (with k = 0, k = n and, on
CUDA, where nothing checks them, ks outside [0, n] that make a sample NaN), clamping (low, high,
both, with values equal to the bounds), SCALE forward and backward, and topk_stats, against
tests/emulation/spec_reference.py (the spec in plain PyTorch). One line per case,

    ok|MISMATCH|ERROR #<i>:<group>/<data>[/cl] [<shape>] <dtype> <regime> (<seconds>s) [what differed]

then a "summary:" line; exit status = the number of failures, at most 100. A case that breaks the
CUDA context (an illegal address, say) would make every later case fail too, so the cases run in
a worker process that is restarted after it. Run with CUDA_LAUNCH_BLOCKING=1 (set here if unset),
so that an asynchronous error is reported by the case that caused it. With ASH_CHECK_STOP_AT
(Unix time) set, no case starts after that time. With ASH_EXT_CUDA_REGIME=cluster|sample-per-block|
chunked every case runs in that regime (the coverage check then wants that regime); unset, a
Hopper sends long samples to clusters, and the grid must reach on chip and cluster. Also the
helpers of sanitize_cases.py.

    python benchmarks/gpu_cases.py [--only REGEX] [--list] [--limits]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
import zlib
from collections import Counter
from typing import Callable, Optional

if __name__ == "__main__":  # not for sanitize_cases.py, which imports this file
    os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # before torch initialises CUDA

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ash_ext  # noqa: E402
from ash_ext import fallback  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "emulation"))
import spec_reference  # noqa: E402

PERCENTILE = 0.65
VARIANTS = ("ash_p", "ash_b", "ash_s")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# ASH-B/S against the fallback: the sums are ordered differently (tests/test_cuda.py's values).
TOLERANCE = {
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
# Without a GPU (--device cpu, to try this script out) the limits of an H100 SXM / H200.
H100_SMS = 132
H100_SHARED_OPTIN = 227 * 1024
DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch may use without opting in
BROKEN_CONTEXT_EXIT = 3  # the worker's exit status after a case broke the CUDA context
MAX_RESTARTS = 12  # ASH_CHECK_STOP_AT bounds the time they take
CASE_LINE = re.compile(r"^(ok|MISMATCH|ERROR) #(\d+):\S+ \S+ (\S+) (\S+)")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the planner needs to know of the device."""

    sms: int
    shared_optin: int
    max_cluster_blocks: int = 0  # 0 before sm_90


@dataclasses.dataclass(frozen=True)
class Case:
    """One input: its shape, dtype and data, and which checks run on it."""

    group: str
    shape: tuple
    dtype: torch.dtype
    data: str  # see make_data
    channels_last: bool = False
    inplace: bool = True
    grads: tuple = VARIANTS  # the variants whose backward is checked
    family: bool = False  # check the shaping family's features (check_family) instead


def device_limits(device: str, sms: Optional[int] = None, shared_optin: Optional[int] = None) -> Limits:
    clusters = 0
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        sms = sms or props.multi_processor_count
        shared_optin = shared_optin or getattr(props, "shared_memory_per_block_optin", H100_SHARED_OPTIN)
        clusters = 16 if props.major >= 9 else 0  # as current_device_limits (ash_cuda_run.cuh)
    return Limits(sms or H100_SMS, shared_optin or H100_SHARED_OPTIN, clusters)


def requested_regime() -> str:
    """ASH_EXT_CUDA_REGIME, which the launcher reads at every call (auto when unset)."""
    return os.environ.get("ASH_EXT_CUDA_REGIME") or "auto"


def expected_regimes(limits: Limits) -> tuple:
    """The regimes the grid must reach: with clusters, the planner sends every long sample to a
    cluster (on chip stays for short ones); forced, just the forced one."""
    forced = {"cluster": ("cluster",), "sample-per-block": ("on-chip", "block-per-sample"), "chunked": ("chunked",)}
    if requested_regime() != "auto":
        return forced[requested_regime()]
    return ("on-chip", "cluster") if limits.max_cluster_blocks else ("on-chip", "block-per-sample", "chunked")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def launch_plan(batch: int, n: int, dtype: torch.dtype, limits: Limits) -> dict:
    planner = getattr(ash_ext._ops._C, "cuda_launch_plan", None)
    if planner is None:
        raise RuntimeError("ash_ext._C has no cuda_launch_plan: the extension is not built from this tree")
    return planner(batch, n, element_size(dtype), limits.sms, limits.shared_optin, limits.max_cluster_blocks,
                   requested_regime())


def boundary_plan(batch: int, n: int, dtype: torch.dtype, limits: Limits) -> dict:
    """The plan without clusters and unforced: the regime boundaries the grid's shapes sit at
    (on chip, the 48 KiB window, 2 x SMs) are those of the regimes before clusters."""
    return ash_ext._ops._C.cuda_launch_plan(batch, n, element_size(dtype), limits.sms, limits.shared_optin)


def regime_of(shape: tuple, dtype: torch.dtype, limits: Limits) -> str:
    n = 1
    for size in shape[1:]:
        n *= size
    return launch_plan(shape[0], n, dtype, limits)["regime"]


def largest_n(holds: Callable[[int], bool], high: int = 1 << 28) -> int:
    """The largest n >= 1 for which the monotone predicate ``holds`` is true (it must hold for 1)."""
    low = 1
    assert holds(low) and not holds(high)
    while high - low > 1:
        mid = (low + high) // 2
        if holds(mid):
            low = mid
        else:
            high = mid
    return low


def on_chip_limit(dtype: torch.dtype, limits: Limits) -> int:
    """The longest sample the on-chip regime takes."""
    return largest_n(lambda n: boundary_plan(1, n, dtype, limits)["regime"] == "on-chip")


def window_n(dtype: torch.dtype, limits: Limits, below_bytes: int) -> int:
    """The longest on-chip sample whose dynamic shared memory is at most 48 KiB - below_bytes.

    A launch over 48 KiB - (the kernel's static shared memory, a few hundred bytes) needs the
    opt-in attribute; a bug once missed the samples in that window.
    """

    def fits(n: int) -> bool:
        plan = boundary_plan(1, n, dtype, limits)
        return plan["regime"] == "on-chip" and plan["dynamic_shared"] <= DEFAULT_SHARED_LIMIT - below_bytes

    return largest_n(fits)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def name_of(case: Case) -> str:
    return f"{case.group}/{case.data}{'/cl' if case.channels_last else ''}"


def label(index: int, case: Case) -> str:
    return f"#{index:03d}:{name_of(case)}"


def seed_of(case: Case) -> int:
    """A seed from what the case is, not where it is in the list (--only keeps the data)."""
    return zlib.crc32(f"{case.group} {case.data} {case.shape} {case.dtype}".encode())


def shape_text(shape: tuple) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def make_data(kind: str, shape: tuple, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    """Test data, drawn in float64 and rounded to ``dtype``.

    zeros70: 70% exact zeros, the rest |normal|, so that p = 0.65 cuts inside the zeros and the
    tie-break runs. ints: integers in [-3, 3], ties everywhere (the threshold is 1). normal:
    continuous, with negative values. mixed: sample i is of the kind (i mod 3) of those three.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "zeros70":
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float64).abs()
        x = torch.where(torch.rand(shape, generator=gen, device=device, dtype=torch.float64) < 0.7, 0.0, x)
    elif kind == "ints":
        x = torch.randint(-3, 4, shape, generator=gen, device=device).to(torch.float64)
    elif kind == "normal":
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
    elif kind == "mixed":
        kinds = ("zeros70", "ints", "normal")
        parts = [make_data(k, shape, torch.float64, seed + i, device) for i, k in enumerate(kinds)]
        which = (torch.arange(shape[0], device=device) % 3).view((-1,) + (1,) * (len(shape) - 1))
        x = torch.where(which == 0, parts[0], torch.where(which == 1, parts[1], parts[2]))
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    return x.to(dtype)


def like(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` in ``x``'s layout (channels_last stays channels_last)."""
    return torch.empty_like(x).copy_(values)


def describe(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> str:
    """Where two tensors differ: how many elements, the largest difference, the first position."""
    got = got.to(want.device).double()
    want = want.double()
    bad = ~torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    count = int(bad.sum())
    if count == 0:
        return "no element outside the tolerance"
    flat = bad.reshape(bad.shape[0], -1)
    first = int(flat.reshape(-1).nonzero()[0])
    sample, offset = divmod(first, flat.shape[1])
    diff = float(torch.nan_to_num((got - want).abs(), nan=float("inf")).max())
    g = float(got.reshape(-1)[first])
    w = float(want.reshape(-1)[first])
    return (
        f"{count} of {bad.numel()} differ, max |diff| {diff:.3g}, first at sample {sample} element {offset}"
        f" (got {g:.6g}, want {w:.6g})"
    )


def compare(what: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> list:
    """[] if ``got`` matches ``want`` (exactly, or within the dtype's tolerance), else the difference."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return [f"{what}: got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"]
    got = got.to(want.device)
    if exact:
        if torch.equal(got, want):
            return []
        return [f"{what}: {describe(got, want, 0.0, 0.0)}"]
    tolerance = TOLERANCE[want.dtype]
    try:
        torch.testing.assert_close(got, want, equal_nan=True, **tolerance)  # NaN samples: invalid ks
        return []
    except AssertionError:
        return [f"{what}: {describe(got, want, **tolerance)}"]


def check_case(x: torch.Tensor, case: Case, ref_device: str, data_device: str) -> list:
    """Runs every variant on ``x`` and returns what differed from ash_ext.fallback ([] if nothing).

    Forward out of place against the fallback on the same values (ASH-P exactly; ASH-B/S within
    TOLERANCE), the output's strides against the input's, in place against out of place
    (exactly), and the gradient (autograd, random upstream gradient) against the fallback's in
    float64 rounded to the dtype: that reference is exact up to one rounding, so only the
    kernel's own rounding counts. The fallback runs on ``ref_device``; the upstream gradient is
    drawn on ``data_device``.
    """
    problems = []
    x_ref = x.to(ref_device)
    upstream = like(x, make_data("normal", case.shape, x.dtype, seed_of(case) + 1, data_device).to(x.device))
    for name in VARIANTS:
        kernel = getattr(ash_ext, name)
        reference = getattr(fallback, name)
        got = kernel(x, PERCENTILE)
        problems += compare(f"{name} forward", got, reference(x_ref, PERCENTILE), exact=name == "ash_p")
        if got.stride() != x.stride():
            problems.append(f"{name} forward: output strides {got.stride()}, input strides {x.stride()}")
        if case.inplace:
            y = x.clone()
            if kernel(y, PERCENTILE, inplace=True) is not y:
                problems.append(f"{name} in place: did not return its input")
            problems += compare(f"{name} in place vs out of place", y, got, exact=True)
            del y
        del got
        if name in case.grads:
            leaf = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(kernel(leaf, PERCENTILE), leaf, upstream)
            leaf64 = x_ref.to(torch.float64, copy=True).requires_grad_(True)  # a copy, also of float64
            (want,) = torch.autograd.grad(reference(leaf64, PERCENTILE), leaf64, upstream.to(ref_device).double())
            problems += compare(f"{name} backward", grad, want.to(x.dtype), exact=name == "ash_p")
            del leaf, grad, leaf64, want
    return problems


FAMILY_VARIANTS = ("ash-p", "ash-b", "ash-s", "scale")


def family_ks(batch: int, n: int, device: str) -> torch.Tensor:
    """Per-sample ks cycling through 35% of n, 0, n, 1, 10% of n."""
    pool = [max(1, round(n * 0.35)), 0, n, 1, max(1, round(n * 0.1))]
    return torch.tensor([pool[b % len(pool)] for b in range(batch)], dtype=torch.int64, device=device)


def family_bounds(x: torch.Tensor) -> tuple:
    """Clamp bounds that are values of x (so that values equal to a bound occur)."""
    finite = x[torch.isfinite(x)].double().flatten().sort().values
    low, high = float(finite[len(finite) * 3 // 10]), float(finite[len(finite) * 8 // 10])
    return low, (high if high > low else low + 1.0)


def compare_stats(what: str, got: tuple, want: tuple, x: torch.Tensor) -> list:
    """topk_stats against the reference: the threshold exactly, the sums within the accumulation
    type's rounding of a sum of |x| (they are formed in another order)."""
    problems = []
    threshold, total, kept = (t.to(want[0].device) for t in got)
    if not torch.equal(threshold.isnan(), want[0].isnan()) or not torch.equal(
        threshold.nan_to_num(nan=0.0), want[0].nan_to_num(nan=0.0)
    ):
        problems.append(f"{what} threshold: {describe(threshold, want[0], 0.0, 0.0)}")
    scale = x.to(want[0].device).reshape(x.shape[0], -1).double().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    eps = 1e-12 if x.dtype == torch.float64 else 2e-6
    bound = eps * (scale.sum(1) + 1)
    for name, value, reference in (("total", total, want[1]), ("kept", kept, want[2])):
        value = value.double()
        finite = torch.isfinite(reference)
        bad = (value.isnan() != reference.isnan()) | (finite & ((value - reference).abs() > bound))
        bad |= ~finite & ~reference.isnan() & (value != reference)
        if bad.any():
            first = int(bad.nonzero()[0])
            problems.append(f"{what} {name}: {int(bad.sum())} samples differ, first {first} "
                            f"(got {float(value[first]):.8g}, want {float(reference[first]):.8g})")
    return problems


def check_family(x: torch.Tensor, case: Case, ref_device: str, data_device: str) -> list:
    """The shaping family's features on ``x`` against spec_reference (run on ``ref_device``, in
    float64): every variant with per-sample ks, unclamped and clamped (low only, high only, both
    in turn), in place, backward; the clamped op against the op on x.clamp() (exactly);
    topk_stats with and without the clamp; SCALE and topk_stats with a uniform k = 0; and on
    CUDA, per-sample ks outside [0, n], which must make exactly their samples NaN."""
    problems = []
    batch, n = x.shape[0], x[0].numel()
    ks = family_ks(batch, n, x.device)
    x_ref = x.to(ref_device)
    ks_ref = ks.to(ref_device)
    low, high = family_bounds(x_ref)
    bounds = [(low, None), (None, high), (low, high)]
    upstream = like(x, make_data("normal", case.shape, x.dtype, seed_of(case) + 1, data_device).to(x.device))
    for v, name in enumerate(FAMILY_VARIANTS):
        vid = spec_reference.VARIANT_IDS[name]
        exact = name == "ash-p"
        got = torch.ops.ash_ext.ash(x, 0, vid, ks)
        problems += compare(f"{name} ks", got, spec_reference.forward(x_ref, ks_ref, name), exact)
        lo, hi = bounds[v % 3]
        clamped = torch.ops.ash_ext.ash(x, 0, vid, ks, lo, hi)
        problems += compare(f"{name} ks clamp [{lo}, {hi}]", clamped,
                            spec_reference.forward(x_ref, ks_ref, name, lo, hi), exact)
        problems += compare(f"{name} clamp vs op(x.clamp())", clamped,
                            torch.ops.ash_ext.ash(x.clamp(lo, hi), 0, vid, ks), exact=True)
        y = x.clone()
        torch.ops.ash_ext.ash_(y, 0, vid, ks, lo, hi)
        problems += compare(f"{name} in place vs out of place", y, clamped, exact=True)
        grad = torch.ops.ash_ext.ash_backward(upstream, x, 0, vid, ks)
        problems += compare(f"{name} backward ks", grad,
                            spec_reference.backward(upstream.to(ref_device), x_ref, ks_ref, name), exact)
        del got, clamped, y, grad
    problems += compare("scale k=0", torch.ops.ash_ext.ash(x, 0, 3), spec_reference.forward(x_ref, 0, "scale"), False)
    for what, k, per_sample, lo, hi in (("ks", 0, ks, None, None), ("ks clamp", 0, ks, low, high),
                                        ("uniform k", round(n * 0.35), None, None, None), ("k=0", 0, None, None, None)):
        got = torch.ops.ash_ext.topk_stats(x, k, per_sample, lo, hi)
        want = spec_reference.stats(x_ref, ks_ref if per_sample is not None else k, lo, hi)
        problems += compare_stats(f"topk_stats {what}", got, want, spec_reference.clamp(x_ref, lo, hi))
    if x.is_cuda:
        bad = ks.clone()
        bad[0] = -1
        bad[-1] = n + 1
        bad_ref = bad.to(ref_device)
        for name in ("ash-b", "scale"):
            got = torch.ops.ash_ext.ash(x, 0, spec_reference.VARIANT_IDS[name], bad)
            problems += compare(f"{name} invalid ks", got, spec_reference.forward(x_ref, bad_ref, name), False)
        got = torch.ops.ash_ext.ash_backward(upstream, x, 0, 2, bad)
        problems += compare("ash-s backward invalid ks", got,
                            spec_reference.backward(upstream.to(ref_device), x_ref, bad_ref, "ash-s"), False)
        problems += compare_stats("topk_stats invalid ks", torch.ops.ash_ext.topk_stats(x, 0, bad),
                                  spec_reference.stats(x_ref, bad_ref), x_ref)
    return problems


def make_input(case: Case, device: str, data_device: str) -> torch.Tensor:
    x = make_data(case.data, case.shape, case.dtype, seed_of(case), data_device)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def cuda_usable() -> bool:
    """False once the CUDA context is broken (a sticky error such as an illegal address)."""
    try:
        torch.cuda.synchronize()
        return float((torch.ones(1, device="cuda") + 1).item()) == 2.0
    except Exception:  # any failure here means the context is gone
        return False


def run_one(index: int, case: Case, limits: Limits, device: str, ref_device: str, data_device: str) -> tuple:
    """(status, line) for one case; exceptions become ERROR."""
    started = time.time()
    regime = "?"
    try:
        regime = regime_of(case.shape, case.dtype, limits)
        x = make_input(case, device, data_device)
        check = check_family if case.family else check_case
        problems = check(x, case, ref_device, data_device)
        big = x.numel() >= 1 << 22
        del x
        if device == "cuda":
            torch.cuda.synchronize()
            if big:  # many big sizes in turn would otherwise pile up in the caching allocator
                torch.cuda.empty_cache()
        status = "MISMATCH" if problems else "ok"
        detail = "; ".join(problems)
    except Exception as error:  # reported, and the next case runs
        status = "ERROR"
        lines = str(error).strip().splitlines() or [""]
        detail = f"{type(error).__name__}: {lines[0]}"
    took = time.time() - started
    line = f"{status} {label(index, case)} {shape_text(case.shape)} {dtype_name(case.dtype)} {regime} ({took:.2f}s)"
    if detail:
        line += " " + detail[:600]
    return status, line


def run_cases(cases: list, limits: Limits, device: str, ref_device: str, data_device: str, start: int = 0) -> tuple:
    """Runs cases[start:] with a line each; returns (Counter of statuses, why it stopped, index reached).

    It stops early when ASH_CHECK_STOP_AT passes ("time") or a case broke the CUDA context ("broken").
    """
    stop_at = float(os.environ.get("ASH_CHECK_STOP_AT") or "inf")
    counts = Counter()
    for index in range(start, len(cases)):
        if time.time() > stop_at:
            print(f"skipped {len(cases) - index} cases from #{index:03d} on (out of time)", flush=True)
            counts["skipped"] += len(cases) - index
            return counts, "time", index
        status, line = run_one(index, cases[index], limits, device, ref_device, data_device)
        counts[status] += 1
        print(line, flush=True)
        if status == "ERROR" and device == "cuda" and not cuda_usable():
            print(f"the CUDA context is broken after #{index:03d}", flush=True)
            return counts, "broken", index + 1
    return counts, "done", len(cases)


def grid(limits: Limits) -> list:
    """The cases, most telling first (a deadline cuts the last ones)."""
    sms2 = 2 * limits.sms
    cases = []
    kinds = ("zeros70", "ints", "normal")

    def add(group: str, shape: tuple, dtype: torch.dtype) -> None:
        cases.extend(Case(group, shape, dtype, kind) for kind in kinds)
        if len(shape) == 4:
            cases.append(Case(group, shape, dtype, "mixed", channels_last=True))

    for dtype in DTYPES:
        limit = on_chip_limit(dtype, limits)
        top = window_n(dtype, limits, 0)
        add("window-top", (4, top), dtype)
        add("window-160B", (4, window_n(dtype, limits, 160)), dtype)
        add("window-400B", (4, window_n(dtype, limits, 400)), dtype)
        add("window-top+1", (3, top + 1), dtype)
        if top % 16 == 0:  # [B, 640, 4, 4] for float32 (n = 10240)
            add("window-4d", (2, top // 16, 4, 4), dtype)
            add("window-4d", (128, top // 16, 4, 4), dtype)
        add("limit", (3, limit), dtype)
        add("limit+1", (3, limit + 1), dtype)
        add("limit+1-batch-2sm-1", (sms2 - 1, limit + 1), dtype)
        add("limit+1-batch-2sm", (sms2, limit + 1), dtype)
        # [B, C, 7, 7] just over the limit: chunked and block-per-sample 4-D (and channels_last) maps.
        add("limit+-4d", (3, limit // 49 + 1, 7, 7), dtype)
        add("limit+-4d-batch-2sm", (sms2, limit // 49 + 1, 7, 7), dtype)
    # The shaping family's features: one mixed-data case per regime and dtype (and channels_last).
    for dtype in DTYPES:
        limit = on_chip_limit(dtype, limits)
        for group, shape in (("small", (6, 300)), ("window-top", (4, window_n(dtype, limits, 0))),
                             ("limit+1", (3, limit + 1)), ("limit+1-batch-2sm", (sms2, limit + 1)),
                             ("resnet50", (8, 2048, 7, 7))):
            cases.append(Case(group + "-family", shape, dtype, "mixed", family=True))
        cases.append(Case("limit+-4d-family", (5, limit // 49 + 1, 7, 7), dtype, "mixed", channels_last=True,
                          family=True))
    for dtype in DTYPES:
        add("small-128t", (6, 300), dtype)
        add("small-256t", (5, 3000), dtype)
        add("pooled", (1, 2048), dtype)
        add("pooled", (256, 2048), dtype)
        add("resnet50", (8, 2048, 7, 7), dtype)
        add("resnet50", (64, 2048, 7, 7), dtype)
        add("wrn", (2, 640, 8, 8), dtype)
        add("wrn", (128, 640, 8, 8), dtype)
    for dtype in DTYPES:
        limit = on_chip_limit(dtype, limits)
        add("long-1-sample", (1, 1 << 20), dtype)
        add("long-2-samples", (2, 3 * limit + 5), dtype)
        add("long-batch-2sm", (sms2, 2 * limit + 3), dtype)
    return cases


def print_limits(limits: Limits, device: str) -> int:
    """The device's limits and the planner's boundaries; 1 unless CUDA tensors go to the kernels."""
    serving = ash_ext.implementation_for(torch.zeros(1, 1, device=device))
    print(
        f"compiled_with_cuda={ash_ext.compiled_with_cuda()} implementation={serving} "
        f"SMs={limits.sms} shared_optin={limits.shared_optin} clusters_up_to={limits.max_cluster_blocks} "
        f"ASH_EXT_CUDA_REGIME={requested_regime()}"
    )
    for dtype in DTYPES:
        plan = boundary_plan(1, on_chip_limit(dtype, limits), dtype, limits)
        print(
            f"{dtype_name(dtype)}: on-chip up to n={on_chip_limit(dtype, limits)} "
            f"(dynamic shared {plan['dynamic_shared']} of {plan['dynamic_shared_limit']} B); 48 KiB window "
            f"n={window_n(dtype, limits, 544) + 1}..{window_n(dtype, limits, 0)}"
        )
    ok = serving == ("cuda-kernel" if device == "cuda" else "cpu-kernel")
    print(f"summary: {serving}, {limits.sms} SMs, opt-in {limits.shared_optin} B" + ("" if ok else " (NOT THE KERNEL)"))
    return 0 if ok else 1


def drive(cases: list, limits: Limits, only: Optional[str], argv: list) -> int:
    """Runs the worker until every case ran, restarting it after a case that broke the context."""
    counts = Counter()
    regimes = {dtype_name(d): set() for d in DTYPES}
    start, restarts, started = 0, 0, False
    while True:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--start", str(start)] + argv
        worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        reached = start - 1
        for line in worker.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith("cases "):
                started = True
            elif line.startswith("skipped "):
                counts["skipped"] += int(line.split()[1])
            match = CASE_LINE.match(line)
            if match:
                counts[match.group(1)] += 1
                reached = int(match.group(2))
                regimes.setdefault(match.group(3), set()).add(match.group(4))
        rc = worker.wait()
        if not started:
            print(f"ERROR the worker failed before running any case (exit status {rc})")
            return 100
        if rc not in (0, BROKEN_CONTEXT_EXIT) and reached + 1 < len(cases):
            # It died inside case reached + 1 (a crash, not an exception): count it and go on.
            reached += 1
            case = cases[reached]
            regime = regime_of(case.shape, case.dtype, limits)
            counts["ERROR"] += 1
            regimes.setdefault(dtype_name(case.dtype), set()).add(regime)
            print(
                f"ERROR {label(reached, case)} {shape_text(case.shape)} {dtype_name(case.dtype)} {regime} "
                f"the worker died in this case (exit status {rc})",
                flush=True,
            )
        elif rc not in (0, BROKEN_CONTEXT_EXIT):
            counts["ERROR"] += 1
            print(f"ERROR the worker exited with status {rc} after the last case", flush=True)
        if rc == 0 or reached + 1 >= len(cases):
            break
        if restarts == MAX_RESTARTS:
            print(f"skipped {len(cases) - reached - 1} cases: the worker was restarted {MAX_RESTARTS} times")
            counts["skipped"] += len(cases) - reached - 1
            break
        restarts += 1
        start = reached + 1
        print(f"restarting the worker at case #{start:03d}", flush=True)
    missing = (
        []
        if only
        else [f"{d} {r}" for d in regimes for r in expected_regimes(limits) if r not in regimes[d]]
    )
    if missing:
        print("COVERAGE no case reached: " + ", ".join(missing))
    failed = counts["MISMATCH"] + counts["ERROR"] + (1 if missing else 0)
    print(
        f"summary: {counts['ok']} ok / {failed} failed ({counts['MISMATCH']} mismatch, {counts['ERROR']} error"
        f"{', coverage' if missing else ''}) / {counts['skipped']} skipped, of {len(cases)}"
    )
    return min(failed, 100)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only the cases whose label matches this regular expression")
    parser.add_argument("--list", action="store_true", help="list the cases and their regimes, run nothing")
    parser.add_argument("--limits", action="store_true", help="print the device's limits and the boundaries")
    parser.add_argument("--device", default="cuda", help="cpu: the CPU kernel instead (to try the script out)")
    parser.add_argument("--sms", type=int, help="plan for this many SMs instead of the device's")
    parser.add_argument("--shared-optin", type=int, help="plan for this opt-in shared memory per block (bytes)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    limits = device_limits(args.device, args.sms, args.shared_optin)
    if args.limits:
        return print_limits(limits, args.device)
    cases = grid(limits)
    if args.only:  # matched against "<group>/<data>[/cl] [<shape>] <dtype>"
        cases = [c for c in cases if re.search(args.only, f"{name_of(c)} {shape_text(c.shape)} {dtype_name(c.dtype)}")]
    if args.list:
        for i, case in enumerate(cases):
            print(
                f"{label(i, case)} {shape_text(case.shape)} {dtype_name(case.dtype)} "
                f"{regime_of(case.shape, case.dtype, limits)}"
            )
        return 0
    if not args.worker:
        return drive(cases, limits, args.only, argv)
    if args.device == "cuda" and ash_ext.implementation_for(torch.zeros(1, 1, device="cuda")) != "cuda-kernel":
        print("ash_ext does not send CUDA tensors to its kernels (built without CUDA?)")
        return 2
    print(f"cases {len(cases)}", flush=True)
    # The data and the reference on the GPU: the grid is big, and the fallback is plain torch.
    _, why, _ = run_cases(cases, limits, args.device, args.device, args.device, args.start)
    return BROKEN_CONTEXT_EXIT if why == "broken" else 0


if __name__ == "__main__":
    sys.exit(main())
