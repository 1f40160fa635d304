"""The ASH run: every case of a :class:`BenchConfig`, timed and checked, into ``{"meta", "results"}``."""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from .._ops import implementation_for
from .cases import DATA_KINDS, DEVIATION_DATA, DTYPES, SHAPES, Case
from .config import BenchConfig
from .contention import contention, read_cpu, wait_for_quiet
from .correctness import deviation, deviation_input
from .estimate import case_weights
from .impls import DESCRIPTIONS, implementations, pytorch_ood_version
from .machine import last_level_cache_bytes, load_average, machine_info
from .progress import Progress
from .timing import Rotation, default_budget, draw, rotation_copies, seed_for, summarize, time_interleaved


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark of ``config`` and return ``{"meta": {...}, "results": [...]}``.

    ``meta`` holds the machine, device, versions, configuration and data description; each entry of
    ``results`` one case: its parameters, per-implementation timing summaries (ms), the speed-ups,
    achieved GB/s, percentage of the clone's bandwidth and ash_ext's deviation from the reference.
    A KeyboardInterrupt stops the run early; ``meta["interrupted"]`` is then true.
    """
    device = config.resolved_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    cases = config.cases()
    plan = config.timing_plan(device)
    min_time, warmup = plan.min_time, plan.warmup
    cache = config.cache_bytes or last_level_cache_bytes(device)
    budget = config.memory_budget_bytes or default_budget(device)
    impl_names = _impl_names(config)
    weights = case_weights(cases, device, impl_names, plan, cache, budget)

    meta: dict[str, Any] = {
        "tool": "ash_ext bench",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": machine_info(device),
        "config": {**asdict(config), "device": str(device), "min_time": min_time, "warmup": warmup},
        "implementations": dict(DESCRIPTIONS),
        "timed": impl_names,
        "timing": (
            "CUDA events around each call, the GPU idle before it (so the Python launch cost counts)"
            if device.type == "cuda"
            else "time.perf_counter around each call"
        )
        + f"; {warmup} warm-up call(s) per implementation and case; implementations interleaved round-robin; "
        f"each call on the next of >= max(2, ceil(2 * cache / bytes)) distinct inputs (cache {cache} B, "
        f"memory budget {budget} B per rotation); the in-place reference on its own rotation, refilled outside "
        "the timed region when it wraps; outputs freed outside the timed region",
        "data": {name: DATA_KINDS[SHAPES[name].data] for name in SHAPES},
        "deviation_data": DEVIATION_DATA,
        "gbps": "2 * tensor bytes / median time (one read and one write of the tensor)",
        "interrupted": False,
        "estimated_s": round(sum(weights), 1),
        "load_average_start": load_average(),
    }
    if config.wait_quiet_s > 0:
        meta["quiet_wait"] = wait_for_quiet(config.wait_quiet_s, log=lambda line: print(line, file=sys.stderr))
    cpu_start = read_cpu()
    results: list[dict[str, Any]] = []
    progress = Progress(weights, config.progress)
    started = time.perf_counter()
    groups: dict[tuple[str, int], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.shape, case.batch), []).append(case)
    try:
        with torch.no_grad():
            for (shape, batch), group in groups.items():
                _run_group(
                    shape, batch, group, impl_names, device, config, cache, budget, min_time, warmup, results, progress
                )
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        progress.close()
    meta["wall_s"] = time.perf_counter() - started
    cpu_end = read_cpu()
    meta["cpu_contention"] = contention(cpu_start, cpu_end).as_dict() if cpu_start and cpu_end else None
    meta["load_average_end"] = load_average()
    meta["machine"]["torch_threads"] = torch.get_num_threads()
    return {"meta": meta, "results": results}


def _impl_names(config: BenchConfig) -> list[str]:
    return [name for name in config.impls if name != "pytorch-ood" or pytorch_ood_version() is not None]


def estimated_seconds(config: BenchConfig) -> float:
    """The forecast of :func:`run`'s wall time for ``config`` (see :mod:`ash_ext.bench.estimate`),
    not counting a wait for quiet CPUs."""
    device = config.resolved_device()
    cache = config.cache_bytes or last_level_cache_bytes(device)
    budget = config.memory_budget_bytes or default_budget(device)
    plan = config.timing_plan(device)
    return sum(case_weights(config.cases(), device, _impl_names(config), plan, cache, budget))


def _run_group(
    shape: str,
    batch: int,
    group: list[Case],
    impl_names: list[str],
    device: torch.device,
    config: BenchConfig,
    cache: int,
    budget: int,
    min_time: float,
    warmup: int,
    results: list[dict[str, Any]],
    progress: Progress,
) -> None:
    """The cases of one shape and batch size: one float32 draw, cast per dtype into the rotations."""
    spec = SHAPES[shape]
    size = (batch, *spec.dims)
    numel = math.prod(size)
    smallest_item = min(DTYPES[c.dtype].itemsize for c in group)
    copies = rotation_copies(numel * smallest_item, cache, budget)
    g = torch.Generator(device=device)
    g.manual_seed(seed_for(config.seed, "timing", shape, batch))
    base = draw(spec.data, numel * copies, g, device)
    by_dtype: dict[str, list[Case]] = {}
    for case in group:
        by_dtype.setdefault(case.dtype, []).append(case)
    for dtype_name, dtype_cases in by_dtype.items():
        dtype = DTYPES[dtype_name]
        buffer = base if dtype == torch.float32 else base.to(dtype)
        shared = Rotation(buffer, size, copies)
        needs_inplace = "reference" in impl_names
        inplace = Rotation(torch.empty_like(buffer), size, copies, source=shared) if needs_inplace else None
        deviation_inputs: dict[float, Tensor] = {}
        for case in dtype_cases:
            progress.update(case.id)
            if case.percentile not in deviation_inputs:
                deviation_inputs = {case.percentile: deviation_input(case, device, config.seed)}
            x_dev = deviation_inputs[case.percentile]
            case_started = time.perf_counter()
            row = _run_case(case, impl_names, shared, inplace, x_dev, device, config, min_time, warmup, copies)
            row["case_s"] = round(time.perf_counter() - case_started, 4)
            results.append(row)
            progress.advance()
        del shared, inplace, buffer, deviation_inputs
    del base


def _run_case(
    case: Case,
    impl_names: list[str],
    shared: Rotation,
    inplace: Rotation | None,
    x_dev: Tensor,
    device: torch.device,
    config: BenchConfig,
    min_time: float,
    warmup: int,
    copies: int,
) -> dict[str, Any]:
    """One case: its implementations timed interleaved, the summaries, ratios and the deviation."""
    impls = implementations(case.variant, case.percentile, impl_names)
    samples = time_interleaved(
        impls,
        shared,
        inplace,
        device,
        min_time=min_time,
        min_reps=config.min_reps,
        slow_min_reps=config.slow_min_reps,
        slow_call_s=config.slow_call_s,
        max_reps=config.max_reps,
        warmup=warmup,
    )
    timings = {name: summarize(s) for name, s in samples.items()}
    med = {name: t["median_ms"] for name, t in timings.items()}
    row: dict[str, Any] = {
        "case": case.id,
        "shape": case.shape,
        "model": case.spec.model,
        "size": list(case.size),
        "batch": case.batch,
        "dtype": case.dtype,
        "percentile": case.percentile,
        "variant": case.variant,
        "n": case.spec.sample_size,
        "k": case.k,
        "bytes": case.nbytes,
        "rotation_inputs": copies,
        "ash_ext_implementation": implementation_for(shared.inputs[0]),
        "timings": timings,
    }

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med and med[b] > 0 else None

    row["speedup_vs_reference"] = ratio("reference", "ash_ext")
    row["speedup_vs_pytorch_ood"] = ratio("pytorch-ood", "ash_ext")
    row["speedup_vs_fallback"] = ratio("fallback", "ash_ext")
    row["gbps"] = {name: 2 * case.nbytes / (m * 1e-3) / 1e9 if m > 0 else None for name, m in med.items()}
    row["ash_ext_gbps"] = row["gbps"].get("ash_ext")
    row["clone_gbps"] = row["gbps"].get("clone")
    pct = ratio("clone", "ash_ext")
    row["pct_of_clone"] = 100 * pct if pct is not None else None
    row.update(deviation(case, device, config.seed, x=x_dev))
    return row
