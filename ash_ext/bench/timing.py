"""Timing: the input data, the rotations of distinct inputs, the timer, round-robin interleaving
and the summaries of the samples."""

from __future__ import annotations

import math
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .cases import DTYPES, ShapeSpec
from .impls import Implementation
from .machine import last_level_cache_bytes, memory_bytes


class TimedCase(Protocol):
    """What :func:`make_rotations` reads of a case (an ASH :class:`~ash_ext.bench.cases.Case` or a family one)."""

    @property
    def shape(self) -> str: ...
    @property
    def batch(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def spec(self) -> ShapeSpec: ...
    @property
    def size(self) -> tuple[int, ...]: ...
    @property
    def numel(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


def draw(kind: str, numel: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``numel`` float32 values of the data kind ``kind`` (``relu``, ``abs`` or ``normal``; see :class:`ShapeSpec`)."""
    x = torch.randn(numel, generator=generator, device=device, dtype=torch.float32)
    if kind == "relu":
        x.relu_()
    elif kind == "abs":
        x.abs_()
    return x


def seed_for(seed: int, *parts: object) -> int:
    """A generator seed derived from ``seed`` and ``parts`` (stable across runs and processes)."""
    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % 2**63


class Rotation:
    """``copies`` distinct inputs of shape ``size``, views of one flat ``buffer``, handed out in turn.

    With a ``source`` rotation (for in-place functions, which destroy their input) the whole buffer
    is refilled from the source's, in one copy, before the first input is handed out and whenever
    the rotation wraps around. The refill happens inside :meth:`take`, outside any timed region,
    and covers at least twice the cache, so the first inputs are out of the cache again when they
    are used. The cursor is never reset: consecutive cases continue the rotation.
    """

    def __init__(self, buffer: Tensor, size: tuple[int, ...], copies: int, source: Rotation | None = None) -> None:
        numel = math.prod(size)
        if buffer.numel() < numel * copies:
            raise ValueError(f"a buffer of {buffer.numel()} values cannot hold {copies} inputs of shape {size}")
        if source is not None and source.buffer.numel() != buffer.numel():
            raise ValueError("a rotation and its source need buffers of the same size")
        self.buffer = buffer
        self.inputs = [buffer[i * numel : (i + 1) * numel].view(size) for i in range(copies)]
        self.source = source
        self.cursor = 0
        self.dirty = source is not None

    def __len__(self) -> int:
        return len(self.inputs)

    def refill(self) -> None:
        """Copy the source's buffer into this rotation's."""
        assert self.source is not None
        self.buffer.copy_(self.source.buffer)
        if self.buffer.device.type == "cuda":
            torch.cuda.synchronize(self.buffer.device)
        self.dirty = False

    def take(self) -> Tensor:
        """The next input."""
        if self.cursor == 0 and self.dirty:
            self.refill()
        x = self.inputs[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.inputs)
        if self.source is not None:
            self.dirty = True
        return x


def default_budget(device: torch.device) -> int:
    """The default cap on the bytes of one rotation: 1/8 of the device's memory, at most 2 GiB."""
    return min(2 * 2**30, memory_bytes(device) // 8)


def rotation_copies(nbytes: int, cache_bytes: int, budget_bytes: int) -> int:
    """Inputs of ``nbytes`` in a rotation: ``max(2, ceil(2 * cache / nbytes))``, within the budget but 2 at least."""
    wanted = max(2, math.ceil(2 * cache_bytes / max(nbytes, 1)))
    return max(2, min(wanted, budget_bytes // max(nbytes, 1)))


def make_rotations(
    case: TimedCase,
    device: torch.device | str,
    *,
    seed: int = 0,
    cache_bytes: int | None = None,
    memory_budget_bytes: int | None = None,
    inplace: bool = True,
) -> tuple[Rotation, Rotation | None]:
    """The rotating inputs of ``case``: a shared rotation for out-of-place functions and, when
    ``inplace``, a refilled one for in-place functions (see :class:`Rotation`).

    Each holds ``max(2, ceil(2 * cache / bytes))`` inputs, at most ``memory_budget_bytes`` of them
    (but 2 at least); ``cache_bytes`` defaults to :func:`last_level_cache_bytes`.
    """
    device = torch.device(device)
    cache = cache_bytes or last_level_cache_bytes(device)
    budget = memory_budget_bytes or default_budget(device)
    copies = rotation_copies(case.nbytes, cache, budget)
    g = torch.Generator(device=device)
    g.manual_seed(seed_for(seed, "timing", case.shape, case.batch))
    buffer = draw(case.spec.data, case.numel * copies, g, device).to(DTYPES[case.dtype])
    shared = Rotation(buffer, case.size, copies)
    own = Rotation(torch.empty_like(buffer), case.size, copies, source=shared) if inplace else None
    return shared, own


class Timer:
    """Times one call in seconds: CUDA events on a GPU, ``perf_counter`` otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[Tensor], object], x: Tensor) -> float:
        """Seconds of one call ``fn(x)``; its output is freed after the timed region."""
        if self.cuda:
            self.start.record()
            out = fn(x)
            self.end.record()
            self.end.synchronize()
            del out
            return self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter()
        out = fn(x)
        t1 = time.perf_counter()
        del out
        return t1 - t0


def summarize(samples_s: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min, max, mean and stdev (ms) of timings in seconds, and the samples."""
    ms = sorted(s * 1e3 for s in samples_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        stdev = statistics.stdev(ms)
    else:
        q1 = q3 = ms[0]
        stdev = 0.0
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "mean_ms": statistics.fmean(ms),
        "stdev_ms": stdev,
        "reps": len(ms),
        "samples_ms": [s * 1e3 for s in samples_s],
    }


def time_interleaved(
    impls: dict[str, Implementation],
    shared: Rotation,
    inplace: Rotation | None,
    device: torch.device,
    *,
    min_time: float,
    min_reps: int,
    slow_min_reps: int,
    slow_call_s: float,
    max_reps: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Time ``impls`` round-robin (the order rotating each round) on rotating inputs; seconds per call.

    Each implementation first runs ``warmup`` untimed calls, the last of which estimates its cost;
    it then gets ``ceil(min_time / estimate)`` timed calls, at least ``min_reps`` (``slow_min_reps``
    when one call takes over ``slow_call_s``) and at most ``max_reps``.
    """
    timer = Timer(device)
    names = list(impls)

    def take(name: str) -> Tensor:
        return inplace.take() if impls[name].inplace and inplace is not None else shared.take()

    estimate = {}
    for name in names:
        for _ in range(max(1, warmup)):
            estimate[name] = timer(impls[name].fn, take(name))
    reps = {}
    for name in names:
        floor = slow_min_reps if estimate[name] > slow_call_s else min_reps
        reps[name] = max(floor, min(max_reps, math.ceil(min_time / max(estimate[name], 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(reps.values(), default=0)):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            if len(samples[name]) < reps[name]:
                samples[name].append(timer(impls[name].fn, take(name)))
    return samples
