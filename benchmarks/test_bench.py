"""``ash-ext bench``'s cases as a pytest-benchmark suite.

    pytest benchmarks/ --benchmark-only                       # a short subset (one case per shape)
    pytest benchmarks/ --benchmark-only --ash-all             # the whole default suite (or ASH_EXT_BENCH_ALL=1)
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # then later: --benchmark-compare
    pytest benchmarks/ --benchmark-only -k family             # the family (ash-ext bench --methods family)

The cases come from :func:`ash_ext.bench.cases.pytest_cases` (the same list as the command), each run
for every implementation of :data:`ash_ext.bench.impls.IMPLEMENTATIONS`; benchmarks are grouped by case
so that pytest-benchmark's table compares the implementations side by side. Inputs rotate through
more bytes than the last-level cache, as in the command; the in-place reference gets a fresh input
each round from the untimed setup. On a GPU each timed call ends with a synchronize. The
``ash_ext`` benchmark also checks its deviation from the reference and fails if it is too large.
``test_family`` does the same for :mod:`ash_ext.bench.family`'s cases (``--quick``'s unless
``--ash-all``): SCALE, ReAct+ASH, LTS, topk_stats, per-sample percentiles and ReAct's fit, each
against its reference.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from ash_ext.bench import cases, correctness, family, impls, timing

pytest.importorskip("pytest_benchmark")

#: Seconds of timed calls per benchmark (rounds are chosen from one calibration call).
MIN_TIME = 0.1
MAX_ROUNDS = 200

_rotations: dict[str, tuple[timing.Rotation, timing.Rotation | None]] = {}


def _rotations_for(case: cases.Case, device: torch.device) -> tuple[timing.Rotation, timing.Rotation | None]:
    # One case's inputs at a time: the parametrization keeps a case's implementations together.
    key = f"{case.id}@{device}"
    if key not in _rotations:
        _rotations.clear()
        _rotations[key] = timing.make_rotations(case, device)
    return _rotations[key]


def test_ash(benchmark, ash_case: cases.Case, impl_name: str, ash_device: torch.device) -> None:
    """Time one implementation on one case."""
    chosen = impls.implementations(ash_case.variant, ash_case.percentile, [impl_name])
    if impl_name not in chosen:
        pytest.skip("pytorch-ood is not importable")
    impl = chosen[impl_name]
    shared, own = _rotations_for(ash_case, ash_device)
    rotation = own if impl.inplace and own is not None else shared
    fn = impl.fn
    cuda = ash_device.type == "cuda"

    def target(x: torch.Tensor) -> None:
        fn(x)
        if cuda:
            torch.cuda.synchronize(ash_device)

    with torch.no_grad():
        target(rotation.take())  # warm-up
        start = time.perf_counter()
        target(rotation.take())
        estimate = time.perf_counter() - start
        floor = 3 if estimate > 0.01 else 5
        rounds = max(floor, min(MAX_ROUNDS, math.ceil(MIN_TIME / max(estimate, 1e-9))))
        benchmark.group = ash_case.id
        benchmark.extra_info.update(
            case=ash_case.id,
            implementation=impl_name,
            device=str(ash_device),
            bytes=ash_case.nbytes,
            rotation_inputs=len(rotation),
        )
        benchmark.pedantic(target, setup=lambda: ((rotation.take(),), {}), rounds=rounds, warmup_rounds=1)

    if impl_name == "ash_ext":
        dev = correctness.deviation(ash_case, ash_device)
        benchmark.extra_info.update(max_rel_dev=dev["max_rel_dev"], mask_mismatch=dev["mask_mismatch"])
        assert dev["mask_mismatch"] == 0, f"ash_ext keeps other positions than the reference: {dev}"
        assert dev["max_rel_dev"] <= correctness.deviation_tolerance(ash_case.dtype), dev


_family_rotations: dict[str, timing.Rotation] = {}


def _family_rotation(case: family.FamilyCase, device: torch.device) -> timing.Rotation:
    # The rotation of the command's run (one per shape, batch and dtype), one at a time.
    key = f"{case.shape}-{case.batch}-{case.dtype}@{device}"
    if key not in _family_rotations:
        _family_rotations.clear()
        _family_rotations[key] = timing.make_rotations(case, device, inplace=False)[0]
    return _family_rotations[key]


def test_family(benchmark, family_case: family.FamilyCase, family_impl: str, ash_device: torch.device) -> None:
    """Time one implementation on one family case (the reference is the method's, see ash_ext.bench.family)."""
    impl = family.implementations(family_case, ash_device, [family_impl])[family_impl]
    rotation = _family_rotation(family_case, ash_device)
    fn = impl.fn
    cuda = ash_device.type == "cuda"

    def target(x: torch.Tensor) -> None:
        fn(x)
        if cuda:
            torch.cuda.synchronize(ash_device)

    with torch.no_grad():
        target(rotation.take())  # warm-up
        start = time.perf_counter()
        target(rotation.take())
        estimate = time.perf_counter() - start
        floor = 3 if estimate > 0.01 else 5
        rounds = max(floor, min(MAX_ROUNDS, math.ceil(MIN_TIME / max(estimate, 1e-9))))
        benchmark.group = family_case.id
        benchmark.extra_info.update(
            case=family_case.id,
            method=family_case.method,
            implementation=family_impl,
            reference=family.REFERENCES[family_case.method],
            device=str(ash_device),
            bytes=family_case.nbytes,
            rotation_inputs=len(rotation),
        )
        benchmark.pedantic(target, setup=lambda: ((rotation.take(),), {}), rounds=rounds, warmup_rounds=1)

    if family_impl == "ash_ext":
        x = rotation.inputs[0] if family_case.method == "react-fit" else None
        dev = family.deviation(family_case, ash_device, x=x)
        benchmark.extra_info.update(max_rel_dev=dev["max_rel_dev"], mismatch=dev["mismatch"])
        assert dev["ok"], f"ash_ext deviates from the reference: {dev}"
