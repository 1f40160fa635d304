"""What a bench run measures and how: :class:`BenchConfig` and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cases import SHAPES, Case, best_device, canonical_variants, suite
from .estimate import TimingPlan
from .impls import IMPLEMENTATIONS


@dataclass
class BenchConfig:
    """What :func:`~ash_ext.bench.runner.run` measures and how. ``None`` fields take the suite's
    defaults (see :func:`~ash_ext.bench.cases.suite`).

    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``: :func:`best_device`
    :param min_time: seconds each implementation is timed per case (``None``: 0.02 on a CPU,
        0.05 on a GPU, a fifth of that with ``quick``); reps stop at ``max_reps``
    :param min_reps: fewest timed calls of a fast implementation
    :param slow_min_reps: fewest timed calls of one slower than ``slow_call_s`` per call (the
        reference, pytorch-ood and the fallback on a CPU, mostly)
    :param cache_bytes: last-level cache size (``None``: read from the machine); inputs rotate through
        at least twice this many bytes
    :param memory_budget_bytes: cap on the bytes of each rotation (``None``: 1/8 of the device's memory,
        at most 2 GiB); there are always at least 2 inputs
    :param wait_quiet_s: before timing, wait up to this many seconds while other processes keep the
        CPUs busy (:func:`~ash_ext.bench.contention.wait_for_quiet`); 0: don't wait (the command
        line's default is 20). Either way the run records how much CPU they used while it timed.
    :param methods: ``"ash"`` (the ASH variants, :func:`~ash_ext.bench.runner.run`'s cases) and/or the
        family's methods (:data:`ash_ext.bench.family.cases.METHODS`, run by
        :func:`ash_ext.bench.family.runner.run`); ``None``: ``["ash"]``. Without ``"ash"`` :meth:`cases`
        is empty. ``variants`` and ``methods`` are spelled as the API spells names (see
        :func:`~ash_ext.bench.cases.canonical_variants`, :func:`~ash_ext.bench.family.cases.expand_methods`);
        they are stored canonical, with ``all`` and the method groups expanded.
    """

    device: str | None = None
    shapes: list[str] | None = None
    batches: list[int] | None = None
    variants: list[str] | None = None
    dtypes: list[str] | None = None
    percentiles: list[float] | None = None
    impls: list[str] = field(default_factory=lambda: list(IMPLEMENTATIONS))
    quick: bool = False
    seed: int = 0
    threads: int | None = None
    min_time: float | None = None
    min_reps: int = 5
    slow_min_reps: int = 3
    slow_call_s: float = 0.004
    max_reps: int = 200
    warmup: int | None = None
    cache_bytes: int | None = None
    memory_budget_bytes: int | None = None
    progress: bool = True
    methods: list[str] | None = None
    wait_quiet_s: float = 0.0

    def __post_init__(self) -> None:
        """Put ``variants`` and ``methods`` in their canonical spelling (a ``ValueError`` for unknown names)."""
        from .family.cases import expand_methods  # the family's runner imports this module

        if self.variants is not None:
            self.variants = canonical_variants(self.variants)
        if self.methods is not None:
            self.methods = expand_methods(self.methods)

    def resolved_device(self) -> torch.device:
        """The device to run on."""
        return torch.device(self.device) if self.device else best_device()

    def timing_plan(self, device: torch.device) -> TimingPlan:
        """The timing loop's parameters on ``device``, defaults resolved."""
        return TimingPlan(
            min_time=self.min_time if self.min_time is not None else default_min_time(device, self.quick),
            warmup=self.warmup if self.warmup is not None else default_warmup(device),
            min_reps=self.min_reps,
            slow_min_reps=self.slow_min_reps,
            slow_call_s=self.slow_call_s,
            max_reps=self.max_reps,
            threads=self.threads or torch.get_num_threads(),
        )

    def cases(self) -> list[Case]:
        """The ASH cases this configuration runs (none when ``methods`` leaves out ``"ash"``)."""
        if self.methods is not None and "ash" not in self.methods:
            return []
        return suite(
            self.resolved_device(),
            quick=self.quick,
            shapes=[s for s in self.shapes if s in SHAPES] if self.shapes is not None else None,
            batches=self.batches,
            dtypes=self.dtypes,
            percentiles=self.percentiles,
            variants=self.variants,
        )


def default_min_time(device: torch.device, quick: bool) -> float:
    """Seconds each implementation is timed per case unless set: 0.02 on a CPU, 0.05 on a GPU, /5 with ``quick``."""
    base = 0.02 if device.type == "cpu" else 0.05
    return base / 5 if quick else base


def default_warmup(device: torch.device) -> int:
    """Untimed calls per implementation and case unless set: 3 on a GPU, 1 otherwise."""
    return 3 if device.type == "cuda" else 1
