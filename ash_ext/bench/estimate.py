"""How long a run will take: a cost model of each timed call, the timing loop's repetitions, and the
work around them (input draws, the deviation check), in seconds.

The per-value costs were measured on this project's machine (a 2-core AMD EPYC VM, AVX2, torch's
2 threads, idle: ``--methods all``'s own results) and scale with the threads that can work on a
case (``min(threads, batch)``: the reference's ``topk`` and the fallback's sort split the batch).
On a GPU every call is a few launches. They are estimates for the progress display and the
forecast printed before a run starts; the run's own wall time, next to the forecast in the
summary, is the truth (other machines, and busy CPUs, differ)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .cases import DTYPES, Case
from .timing import rotation_copies

#: Seconds of Python around each timed call (the timer, the rotation's take).
CALL_OVERHEAD_S = 3e-6
#: Seconds of bookkeeping per case (the functions, the summaries, the row).
CASE_OVERHEAD_S = 2e-3
#: Seconds per float32 value drawn for a rotation (randn, relu or abs: one thread), per value cast to
#: a dtype (with the in-place reference's buffer and its first refill), and per input view made.
DRAW_S_PER_VALUE = 10e-9
CAST_S_PER_VALUE = 4e-9
VIEW_S = 3e-6


@dataclass(frozen=True)
class TimingPlan:
    """The timing loop's parameters (see :func:`~ash_ext.bench.timing.time_interleaved`) and the
    threads torch runs with."""

    min_time: float
    warmup: int
    min_reps: int
    slow_min_reps: int
    slow_call_s: float
    max_reps: int
    threads: int

    def timed_seconds(self, call_s: float) -> float:
        """Seconds spent on one implementation of a case whose call takes ``call_s``: its warm-up
        calls and ``clamp(ceil(min_time / call_s))`` timed ones, as the timing loop picks them."""
        t = call_s + CALL_OVERHEAD_S
        floor = self.slow_min_reps if t > self.slow_call_s else self.min_reps
        reps = max(floor, min(self.max_reps, math.ceil(self.min_time / t)))
        return (max(1, self.warmup) + reps) * t


def parallel_scale(batch: int, threads: int) -> float:
    """The per-value cost's factor for ``batch`` samples on ``threads`` (1 at 2 threads, batch >= 2)."""
    return 2.0 / max(1, min(threads, batch))


def call_seconds(impl: str, case: Case, device: torch.device, threads: int) -> float:
    """Seconds of one call of ``impl`` (see :data:`~ash_ext.bench.impls.IMPLEMENTATIONS`) on ``case``."""
    n = case.numel
    item = DTYPES[case.dtype].itemsize
    if device.type == "cuda":
        fixed = {"reference": 120e-6, "pytorch-ood": 120e-6, "fallback": 250e-6, "ash_ext": 15e-6, "clone": 8e-6}
        passes = {"reference": 8, "pytorch-ood": 8, "fallback": 12, "ash_ext": 3, "clone": 2}
        return fixed.get(impl, 50e-6) + passes.get(impl, 4) * n * item / 2e12
    scale = parallel_scale(case.batch, threads)
    half = item == 2
    if impl in ("reference", "pytorch-ood"):
        # a sorted topk of the kept fraction, then zero_ and scatter_ (pytorch-ood's own a little slower)
        per_value = (5.2 + 49.4 * (1.0 - case.percentile)) * 1e-9 * (1.2 if half else 1.3 if item == 8 else 1.0)
        extra = 1.03 if impl == "pytorch-ood" else 1.0
        return extra * (30e-6 + n * per_value * scale)
    if impl == "fallback":  # a stable sort of every sample
        return 80e-6 + n * 47e-9 * (1.15 if half else 1.3 if item == 8 else 1.0) * scale
    if impl == "ash_ext":
        return 10e-6 + n * 0.7e-9 * (1.7 if half else 2.0 if item == 8 else 1.0) * scale
    return 2e-6 + n * item * 0.09e-9  # clone: one read and one write


def case_seconds(case: Case, device: torch.device, impls: Sequence[str], plan: TimingPlan) -> float:
    """Seconds of one ASH case: every implementation's timed calls (and the in-place reference's
    refills), the deviation check (the reference in float32, also in the dtype for 16-bit types,
    ash_ext, the comparisons) and the bookkeeping."""
    def call(impl: str, c: Case = case) -> float:
        return call_seconds(impl, c, device, plan.threads)

    total = CASE_OVERHEAD_S
    for impl in impls:
        total += plan.timed_seconds(call(impl))
        if impl == "reference":  # its rotation is refilled, one copy per input used
            total += plan.timed_seconds(call(impl)) / (call(impl) + CALL_OVERHEAD_S) * call("clone")
    exact = call("reference", replace(case, dtype="float32"))
    total += exact * 1.35 + call("ash_ext") + case.numel * 2.5e-9
    if DTYPES[case.dtype].itemsize == 2:
        total += call("reference")
    return total


def group_seconds(numel: int, dtypes: int, copies: int, rotations: int = 2) -> float:
    """Seconds to draw ``copies`` inputs of ``numel`` values and cast them to ``dtypes`` dtypes, each
    dtype with ``rotations`` rotations of ``copies`` views."""
    views = max(1, dtypes) * rotations * copies * VIEW_S
    return numel * copies * (DRAW_S_PER_VALUE + dtypes * CAST_S_PER_VALUE) + views


def case_weights(
    cases: Sequence[Case],
    device: torch.device,
    impls: Sequence[str],
    plan: TimingPlan,
    cache_bytes: int,
    budget_bytes: int,
    cost: Callable[[Case], float] | None = None,
) -> list[float]:
    """The expected seconds of each case in run order, the first case of each shape and batch also
    carrying the draw of its rotation (``cost`` replaces :func:`case_seconds`)."""
    weights = []
    seen: set[tuple[str, int]] = set()
    for case in cases:
        w = cost(case) if cost is not None else case_seconds(case, device, impls, plan)
        key = (case.shape, case.batch)
        if key not in seen:
            seen.add(key)
            group = [c for c in cases if (c.shape, c.batch) == key]
            item = min(DTYPES[c.dtype].itemsize for c in group)
            copies = rotation_copies(case.numel * item, cache_bytes, budget_bytes)
            w += group_seconds(case.numel, len({c.dtype for c in group}), copies)
        weights.append(w)
    return weights


def format_duration(seconds: float) -> str:
    """``45 s``, ``2 min 10 s`` or ``1 h 05 min``, rounded to 5 s above a minute."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        s = 5 * round(seconds / 5)
        return f"{s // 60} min {s % 60:02d} s" if s % 60 else f"{s // 60} min"
    m = round(seconds / 60)
    return f"{m // 60} h {m % 60:02d} min"
