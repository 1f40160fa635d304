"""The family's run: every family case of a :class:`~ash_ext.bench.config.BenchConfig`, timed and checked."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..._ops import implementation_for
from ..cases import DATA_KINDS, DEVIATION_DATA, DTYPES
from ..config import BenchConfig
from ..contention import contention, read_cpu, wait_for_quiet
from ..estimate import CASE_OVERHEAD_S, group_seconds, parallel_scale
from ..impls import IMPLEMENTATIONS as ASH_IMPLEMENTATIONS
from ..impls import pytorch_ood_version
from ..machine import last_level_cache_bytes, load_average, machine_info
from ..progress import Progress
from ..timing import Rotation, default_budget, make_rotations, rotation_copies, summarize, time_interleaved
from .cases import (
    CLIP_QUANTILE,
    METHODS,
    PER_SAMPLE_SPREAD,
    REFERENCES,
    SHAPES,
    SHAPING_METHODS,
    FamilyCase,
    clip_value,
    kept_counts,
    suite,
)
from .correctness import deviation
from .references import IMPLEMENTATIONS, implementations

#: What each implementation is, written into the results.
DESCRIPTIONS: dict[str, str] = {
    "reference": "the method's reference (see references)",
    "fallback": "ash_ext's pure-PyTorch fallback (stable sort); not for react-fit",
    "ash_ext": "ash_ext's function of the method (the compiled kernel where there is one)",
    "ash_ext_scalar_p": "per-sample only: ash_ext.ash_s with one float percentile, on the same inputs",
    "roofline": "x.clone() (one read + one write) for scale, react-ash, per-sample; "
    "x.sum(dim=1) (one read) for lts, topk-stats, react-fit",
}


def call_seconds(impl: str, case: FamilyCase, device: torch.device, threads: int) -> float:
    """Seconds of one call of ``impl`` (see :data:`IMPLEMENTATIONS`) on ``case``: the family's cost
    model, measured like :func:`ash_ext.bench.estimate.call_seconds`'s."""
    n = case.numel
    item = DTYPES[case.dtype].itemsize
    if device.type == "cuda":
        return {"reference": 150e-6, "fallback": 250e-6, "roofline": 8e-6}.get(impl, 20e-6) + 8 * n * item / 2e12
    scale = parallel_scale(case.batch, threads)
    dtype_factor = 1.3 if item == 8 else 1.0
    if case.method == "react-fit":  # np.percentile (one thread) and two selections over all values
        per_value = {"reference": 16.5e-9, "ash_ext": 2e-9}.get(impl, 0.25e-9)
        return 50e-6 + n * per_value * dtype_factor
    if impl == "reference":
        kept = case.percentile if case.method == "lts" else 1.0 - case.percentile
        per_value = 45e-9 if case.method == "per-sample" else (4.0 + 38.0 * kept) * 1e-9
        return 40e-6 + n * per_value * scale * (0.6 if item == 2 else dtype_factor)
    if impl == "fallback":
        return 100e-6 + n * 48e-9 * scale * (0.9 if item == 2 else dtype_factor)
    if impl in ("ash_ext", "ash_ext_scalar_p"):
        per_value = 1.5e-9 if case.method == "per-sample" else 0.8e-9
        return 20e-6 + n * per_value * scale * (2.0 if item == 2 else dtype_factor)
    return 2e-6 + n * item * 0.075e-9  # the roofline: a clone or a sum


def _timed(case: FamilyCase, names: Sequence[str]) -> list[str]:
    """The implementations that are timed for ``case`` among ``names``."""
    return [
        name
        for name in names
        if (name != "fallback" or case.method != "react-fit")
        and (name != "ash_ext_scalar_p" or case.method == "per-sample")
    ]


def case_weights(cases: Sequence[FamilyCase], device: torch.device, config: BenchConfig) -> list[float]:
    """The expected seconds of each family case in run order: its timed calls, the deviation check,
    and on the first case of each shape, batch and dtype the draw of its rotation."""
    plan = config.timing_plan(device)
    cache = config.cache_bytes or last_level_cache_bytes(device)
    budget = config.memory_budget_bytes or default_budget(device)
    names = impl_names(config.impls)
    weights = []
    seen: set[tuple[str, int, str]] = set()
    for case in cases:

        def call(impl: str, c: FamilyCase = case) -> float:
            return call_seconds(impl, c, device, plan.threads)

        w = CASE_OVERHEAD_S + sum(plan.timed_seconds(call(name)) for name in _timed(case, names))
        w += call("reference") * (1 if case.method == "react-fit" else 2) + call("ash_ext") + case.numel * 3e-9
        if (case.shape, case.batch, case.dtype) not in seen:
            seen.add((case.shape, case.batch, case.dtype))
            w += group_seconds(case.numel, 0, rotation_copies(case.nbytes, cache, budget), rotations=1)
        weights.append(w)
    return weights


def estimated_seconds(config: BenchConfig, methods: Sequence[str] = METHODS) -> float:
    """The forecast of :func:`run`'s wall time for ``config``, not counting a wait for quiet CPUs."""
    device = config.resolved_device()
    return sum(case_weights(family_cases(config, methods), device, config))


def family_cases(config: BenchConfig, methods: Sequence[str] = METHODS) -> list[FamilyCase]:
    """The family's cases of ``config``: its ``methods`` (when set) that are in ``methods``."""
    chosen = [m for m in (getattr(config, "methods", None) or methods) if m in METHODS and m in methods]
    return suite(
        config.resolved_device(),
        methods=chosen,
        quick=config.quick,
        shapes=config.shapes,
        batches=config.batches,
        dtypes=config.dtypes,
        percentiles=config.percentiles,
    )


def impl_names(impls: Sequence[str]) -> list[str]:
    """The family's implementations for an ASH ``--impls`` list: all of them for the default list;
    otherwise ``clone`` stands for the roofline and ``pytorch-ood`` for the reference, and ash_ext is
    always timed."""
    if list(impls) == list(ASH_IMPLEMENTATIONS):
        return list(IMPLEMENTATIONS)
    alias = {"clone": "roofline", "pytorch-ood": "reference"}
    chosen = {alias.get(name, name) for name in impls} | {"ash_ext"}
    return [name for name in IMPLEMENTATIONS if name in chosen]


def run(config: BenchConfig, methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Run the family's cases of ``config`` (its ``methods`` that are in :data:`METHODS`) and return
    ``{"meta": {...}, "results": [...]}``, shaped like :func:`ash_ext.bench.runner.run`'s.

    ``config.impls`` filters the implementations when it is not the default list: ``clone`` stands
    for the roofline and ``pytorch-ood`` for the reference; ash_ext is always timed.
    """
    device = config.resolved_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    cases = family_cases(config, methods)
    plan = config.timing_plan(device)
    min_time, warmup = plan.min_time, plan.warmup
    weights = case_weights(cases, device, config)
    cache = config.cache_bytes or last_level_cache_bytes(device)
    budget = config.memory_budget_bytes or default_budget(device)
    names = impl_names(config.impls)
    ood = pytorch_ood_version()
    meta: dict[str, Any] = {
        "tool": "ash_ext bench --methods family",
        "suite": "family",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": machine_info(device),
        "config": {**asdict(config), "device": str(device), "min_time": min_time, "warmup": warmup},
        "methods": sorted({c.method for c in cases}, key=METHODS.index),
        "references": dict(REFERENCES),
        "reference_source": "pytorch-ood " + ood
        if ood
        else "pytorch-ood not importable: its algorithms copied in torch (ash_ext.bench.family.references)",
        "implementations": dict(DESCRIPTIONS),
        "timed": names,
        "timing": f"as ash_ext bench: time.perf_counter (CUDA events on a GPU) around each call; {warmup} warm-up "
        "call(s); implementations interleaved round-robin; each call on the next of >= max(2, ceil(2 * cache / "
        f"bytes)) distinct inputs (cache {cache} B, memory budget {budget} B per rotation)",
        "clip": f"react-ash clips at the {CLIP_QUANTILE} quantile of the data kind: "
        + ", ".join(f"{kind} {clip_value(kind):.4f}" for kind in DATA_KINDS),
        "per_sample_percentiles": f"a [B] float64 tensor spread evenly over p - {PER_SAMPLE_SPREAD} .. "
        f"p + {PER_SAMPLE_SPREAD}",
        "data": {name: DATA_KINDS[spec.data] for name, spec in SHAPES.items()},
        "deviation_data": DEVIATION_DATA
        + "; react-ash's deviation clips 0.25 above the largest k-th value; react-fit's uses the plain data",
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
    groups: dict[tuple[str, int, str], list[FamilyCase]] = {}
    for case in cases:
        groups.setdefault((case.shape, case.batch, case.dtype), []).append(case)
    try:
        with torch.no_grad():
            for group in groups.values():
                shared, _ = make_rotations(
                    group[0], device, seed=config.seed, cache_bytes=cache, memory_budget_bytes=budget, inplace=False
                )
                for case in group:
                    progress.update(case.id)
                    case_started = time.perf_counter()
                    row = _run_case(case, names, shared, device, config, min_time, warmup)
                    row["case_s"] = round(time.perf_counter() - case_started, 4)
                    results.append(row)
                    progress.advance()
                del shared
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        progress.close()
    # Timed grouped by input (one rotation per shape, batch and dtype); reported in the suite's order.
    order = {case.id: i for i, case in enumerate(cases)}
    results.sort(key=lambda row: order[row["case"]])
    meta["wall_s"] = time.perf_counter() - started
    cpu_end = read_cpu()
    meta["cpu_contention"] = contention(cpu_start, cpu_end).as_dict() if cpu_start and cpu_end else None
    meta["load_average_end"] = load_average()
    meta["machine"]["torch_threads"] = torch.get_num_threads()
    return {"meta": meta, "results": results}


def _run_case(
    case: FamilyCase,
    names: list[str],
    shared: Rotation,
    device: torch.device,
    config: BenchConfig,
    min_time: float,
    warmup: int,
) -> dict[str, Any]:
    """One family case: its implementations timed interleaved, the summaries, ratios and the deviation."""
    impls = implementations(case, device, names)
    samples = time_interleaved(
        impls,
        shared,
        None,
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
    ks = kept_counts(case)
    row: dict[str, Any] = {
        "case": case.id,
        "method": case.method,
        "shape": case.shape,
        "model": case.spec.model,
        "size": list(case.size),
        "batch": case.batch,
        "dtype": case.dtype,
        "percentile": case.percentile,
        "n": case.n,
        "values": case.numel,
        "k_min": int(ks.min()) if case.method != "react-fit" else None,
        "k_max": int(ks.max()) if case.method != "react-fit" else None,
        "clip": clip_value(case.spec.data) if case.method == "react-ash" else None,
        "reference": REFERENCES[case.method],
        "bytes": case.nbytes,
        "rotation_inputs": len(shared),
        "ash_ext_implementation": implementation_for(shared.inputs[0]),
        "timings": timings,
    }

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med and med[b] > 0 else None

    row["speedup_vs_reference"] = ratio("reference", "ash_ext")
    row["speedup_vs_fallback"] = ratio("fallback", "ash_ext")
    row["per_sample_overhead"] = ratio("ash_ext", "ash_ext_scalar_p")
    row["roofline"] = "clone" if case.method in SHAPING_METHODS else "sum"
    pct = ratio("roofline", "ash_ext")
    row["pct_of_roofline"] = 100 * pct if pct is not None else None
    x_dev = shared.inputs[0] if case.method == "react-fit" else None
    row.update(deviation(case, device, config.seed, x=x_dev))
    return row
