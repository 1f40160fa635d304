"""GPU benchmark of ash_ext's CUDA kernels against the in-repo reference (topk + scatter) and a copy.

For each shape, dtype, percentile and variant it times, with CUDA events, the median of --reps
runs after --warmup runs of: the reference (ash_ext.reference, out of place), ash_ext's kernel
(out of place), and x.clone(). It prints milliseconds, the kernel's speed-up over the reference,
its bandwidth as 2 * bytes / time (one read and one write of the tensor) and that bandwidth as a
percentage of clone's; a "summary:" line and a short table come last. Full results, with each
shape's launch regime, go to $OUT/gpu_bench.json (OUT defaults to ./device_out). The data are
continuous (abs-normal, and relu, whose threshold is still a distinct positive value) or tied
(zeros70: p=0.65 cuts inside the zeros). With ASH_CHECK_STOP_AT (Unix time) set, no shape starts
after that time. Needs only torch and ash_ext; sized to take well under a minute on an H100.

Then the shaping family's features on a few of the shapes (FEATURE_CONFIGS), each timed against
the plain ASH-S kernel with a uniform k on the same input (what the feature costs): SCALE,
ASH-S clamped (ReAct-style, high bound only), ASH-S with per-sample ks, and topk_stats (which
writes no output, so it should take about the selection's and sums' time). They go to the JSON
file's "features" list and a second table.

Last, the regimes side by side (REGIME_CONFIGS, the cluster regime's target shapes): ASH-S timed
under ASH_EXT_CUDA_REGIME=auto, cluster, sample-per-block and chunked on the same input (a
regime that does not apply to a shape is reported as such), with each regime's planned launches
and traffic; they go to the JSON file's "regimes" list and a third table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ash_ext  # noqa: E402
from ash_ext import reference  # noqa: E402

CONFIGS = [
    # (shape, dtype, data), most wanted first: with ASH_CHECK_STOP_AT set, the last ones may be cut.
    ((64, 2048, 7, 7), torch.float32, "abs-normal"),
    ((64, 2048, 7, 7), torch.float32, "zeros70"),
    ((64, 2048, 7, 7), torch.float32, "relu"),
    ((256, 2048, 7, 7), torch.float32, "abs-normal"),
    ((256, 2048, 7, 7), torch.float16, "abs-normal"),
    ((256, 2048), torch.float32, "abs-normal"),
    ((256, 2048), torch.float32, "zeros70"),
    ((1, 2048, 7, 7), torch.float32, "abs-normal"),
    ((8, 2048, 7, 7), torch.float32, "abs-normal"),
    ((1, 2048), torch.float32, "abs-normal"),
    ((2, 640, 8, 8), torch.float32, "abs-normal"),  # WideResNet-28-10's last feature map (CIFAR)
    ((128, 640, 8, 8), torch.float32, "abs-normal"),
]
PERCENTILES = (0.65, 0.9)
VARIANTS = ("ash_s", "ash_b")
# (shape, dtype, data) for the feature rows: a block-per-sample, a chunked and an on-chip shape.
# (shape, dtype, data) for the regimes side by side: the cluster regime's targets.
REGIME_CONFIGS = [
    ((64, 2048, 7, 7), torch.float32, "abs-normal"),
    ((64, 2048, 7, 7), torch.float32, "zeros70"),
    ((256, 2048, 7, 7), torch.float32, "abs-normal"),
    ((8, 2048, 7, 7), torch.float32, "abs-normal"),
    ((32, 1024, 14, 14), torch.float32, "abs-normal"),
    ((64, 2048, 7, 7), torch.bfloat16, "abs-normal"),
]
REGIMES = ("auto", "cluster", "sample-per-block", "chunked")
FEATURE_CONFIGS = [
    ((256, 2048, 7, 7), torch.float32, "relu"),
    ((8, 2048, 7, 7), torch.float32, "relu"),
    ((128, 640, 8, 8), torch.float32, "relu"),
    ((256, 2048), torch.float16, "relu"),
]


def feature_calls(x: torch.Tensor, percentile: float) -> dict:
    """name -> a call of the op with that feature (and the baseline, plain ASH-S)."""
    n = x[0].numel()
    k = n - int(round(n * percentile))
    # Per-sample ks around k (all valid), on the device: what functional.py passes per sample.
    ks = (k + torch.arange(x.shape[0], device=x.device) % 7 - 3).clamp(0, n)
    cap = float(x.flatten()[: 1 << 16].float().quantile(0.9))  # ReAct-style: clip the top 10%
    ops = torch.ops.ash_ext
    return {
        "ash_s": lambda: ops.ash(x, k, 2),
        "scale": lambda: ops.ash(x, k, 3),
        "ash_s+clamp": lambda: ops.ash(x, k, 2, None, None, cap),
        "ash_s+ks": lambda: ops.ash(x, 0, 2, ks),
        "topk_stats": lambda: ops.topk_stats(x, k),
        "topk_stats+ks+clamp": lambda: ops.topk_stats(x, 0, ks, None, cap),
    }


def make(shape, dtype, data):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
    if data == "abs-normal":  # continuous: a distinct threshold, no ties
        x = x.abs()
    elif data == "relu":
        # About half exact zeros, but p=0.65 keeps 35% < 50% positives: the threshold is still a
        # distinct positive value and the tie-break never runs; the work differs from abs-normal
        # only in the zeros.
        x = x.relu()
    elif data == "zeros70":
        # 70% exact zeros, the rest |normal|: p=0.65 cuts inside the zeros, so the tie-break (the
        # lowest-index zeros are kept) runs.
        x = torch.where(torch.rand(shape, generator=g, device="cuda") < 0.7, 0.0, x.abs())
    else:
        raise ValueError(f"unknown data {data!r}")
    return x.to(dtype)


def plan_of(shape, dtype, props, regime: str = "auto") -> dict:
    """The CUDA launch plan of this shape (ash_ext._C.cuda_launch_plan) as the launcher makes it."""
    planner = getattr(ash_ext._ops._C, "cuda_launch_plan", None)
    if planner is None:
        return {"regime": "?"}
    n = 1
    for size in shape[1:]:
        n *= size
    optin = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    element = torch.empty((), dtype=dtype).element_size()
    clusters = 16 if props.major >= 9 else 0  # as current_device_limits (ash_cuda_run.cuh)
    return planner(shape[0], n, element, props.multi_processor_count, optin, clusters, regime)


def regime_of(shape, dtype, props) -> str:
    """The CUDA launch regime of this shape, or '?' without the planner."""
    return plan_of(shape, dtype, props)["regime"]


def compare_regimes(props, stop_at: float, warmup: int, reps: int) -> list:
    """ASH-S (p = 0.65) on each REGIME_CONFIGS input under every ASH_EXT_CUDA_REGIME value."""
    rows = []
    try:
        for shape, dtype, data in REGIME_CONFIGS:
            if time.time() > stop_at:
                print("skipped the rest of the regime rows (out of time)", flush=True)
                break
            x = make(shape, dtype, data)
            nbytes = x.numel() * x.element_size()
            clone_ms = time_ms(x.clone, warmup, reps)
            os.environ.pop("ASH_EXT_CUDA_REGIME", None)
            want = ash_ext.ash_s(x, 0.65)
            for name in REGIMES:
                os.environ["ASH_EXT_CUDA_REGIME"] = name
                row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "data": data,
                       "requested": name, "clone_ms": clone_ms}
                try:
                    plan = plan_of(shape, dtype, props, name)
                except ValueError as error:
                    row.update(regime="n/a", note=str(error))
                    rows.append(row)
                    print(f"{str(tuple(shape)):<18} {row['dtype']:<8} {data:<10} {name:<16}: {error}", flush=True)
                    continue
                got = ash_ext.ash_s(x, 0.65)
                close = bool(torch.allclose(got.float(), want.float(), rtol=2e-2 if x.element_size() == 2 else 2e-5,
                                            atol=1e-2 if x.element_size() == 2 else 1e-5))
                ms = time_ms(functools.partial(ash_ext.ash_s, x, 0.65), warmup, reps)
                row.update(regime=plan["regime"], cluster_blocks=plan.get("cluster_blocks"),
                           launches=plan.get("launches"), planned_bytes=plan.get("bytes_read", 0)
                           + plan.get("bytes_written", 0), kernel_ms=ms, percent_of_clone=100.0 * clone_ms / ms,
                           kernel_gbps=2 * nbytes / ms / 1e6, matches_auto=close)
                rows.append(row)
                print(f"{str(tuple(shape)):<18} {row['dtype']:<8} {data:<10} {name:<16} ({plan['regime']}): "
                      f"{ms:.4f} ms, {row['percent_of_clone']:.0f}% of clone, {plan.get('launches')} launches, "
                      f"planned {row['planned_bytes'] / nbytes:.2f} x the tensor; "
                      f"{'same as auto' if close else 'DIFFERS FROM AUTO'}", flush=True)
            x = None
            torch.cuda.empty_cache()
    finally:
        os.environ.pop("ASH_EXT_CUDA_REGIME", None)
    return rows


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    out_dir = os.environ.get("OUT") or "./device_out"
    os.makedirs(out_dir, exist_ok=True)
    assert ash_ext.implementation_for(torch.zeros(1, 1, device="cuda")) == "cuda-kernel"
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)

    # device_check.sh's deadline for this step: no shape starts after it, so the table still comes.
    stop_at = float(os.environ.get("ASH_CHECK_STOP_AT") or "inf")
    results = []
    skipped = 0
    started = time.time()
    for index, (shape, dtype, data) in enumerate(CONFIGS):
        if time.time() > stop_at:
            skipped = len(CONFIGS) - index
            print(f"skipped the last {skipped} shapes (out of time)", flush=True)
            break
        regime = regime_of(shape, dtype, props)
        x = make(shape, dtype, data)
        nbytes = x.numel() * x.element_size()
        clone_ms = time_ms(x.clone, args.warmup, args.reps)
        for percentile in PERCENTILES:
            for variant in VARIANTS:
                kernel = getattr(ash_ext, variant)
                ref = getattr(reference, variant)
                kernel_ms = time_ms(functools.partial(kernel, x, percentile), args.warmup, args.reps)
                ref_ms = time_ms(functools.partial(ref, x, percentile), args.warmup, args.reps)
                row = {
                    "shape": list(shape),
                    "dtype": str(dtype).replace("torch.", ""),
                    "data": data,
                    "percentile": percentile,
                    "variant": variant,
                    "regime": regime,
                    "reference_ms": ref_ms,
                    "kernel_ms": kernel_ms,
                    "clone_ms": clone_ms,
                    "speedup_vs_reference": ref_ms / kernel_ms,
                    "kernel_gbps": 2 * nbytes / kernel_ms / 1e6,
                    "clone_gbps": 2 * nbytes / clone_ms / 1e6,
                    "percent_of_clone": 100.0 * clone_ms / kernel_ms,
                }
                results.append(row)
                print(
                    f"{str(tuple(shape)):<18} {row['dtype']:<8} {data:<10} p={percentile:<4} {variant} ({regime}): "
                    f"ref {ref_ms:.4f} ms, kernel {kernel_ms:.4f} ms, clone {clone_ms:.4f} ms, "
                    f"x{row['speedup_vs_reference']:.1f}, {row['kernel_gbps']:.0f} GB/s "
                    f"({row['percent_of_clone']:.0f}% of clone)",
                    flush=True,
                )
        x = None  # free it before the next shape
        torch.cuda.empty_cache()

    features = []
    for shape, dtype, data in FEATURE_CONFIGS:
        if time.time() > stop_at:
            print("skipped the feature rows (out of time)", flush=True)
            break
        regime = regime_of(shape, dtype, props)
        x = make(shape, dtype, data)
        nbytes = x.numel() * x.element_size()
        clone_ms = time_ms(x.clone, args.warmup, args.reps)
        calls = feature_calls(x, 0.65)
        base_ms = time_ms(calls["ash_s"], args.warmup, args.reps)
        for name, call in calls.items():
            ms = base_ms if name == "ash_s" else time_ms(call, args.warmup, args.reps)
            row = {
                "shape": list(shape),
                "dtype": str(dtype).replace("torch.", ""),
                "data": data,
                "feature": name,
                "regime": regime,
                "kernel_ms": ms,
                "ash_s_ms": base_ms,
                "clone_ms": clone_ms,
                "relative_to_ash_s": ms / base_ms,
                "percent_of_clone": 100.0 * clone_ms / ms,
            }
            features.append(row)
            print(
                f"{str(tuple(shape)):<18} {row['dtype']:<8} {name:<20} ({regime}): {ms:.4f} ms, "
                f"{row['relative_to_ash_s']:.2f} x ASH-S's {base_ms:.4f} ms ({row['percent_of_clone']:.0f}% of clone)",
                flush=True,
            )
        x = None
        torch.cuda.empty_cache()

    regimes = compare_regimes(props, stop_at, args.warmup, args.reps)

    path = os.path.join(out_dir, "gpu_bench.json")
    with open(path, "w") as f:
        json.dump(
            {
                "device": props.name,
                "sm_count": props.multi_processor_count,
                "torch": torch.__version__,
                "warmup": args.warmup,
                "reps": args.reps,
                "results": results,
                "features": features,
                "regimes": regimes,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {path} ({time.time() - started:.0f}s)")
    speedups = [r["speedup_vs_reference"] for r in results]
    if speedups:
        print(
            f"summary: {len(results)} rows, {skipped} shapes skipped; speed-up over the reference: median "
            f"x{statistics.median(speedups):.1f}, min x{min(speedups):.1f}; {time.time() - started:.0f}s\n"
        )
    else:
        print("summary: no rows\n")
    print(
        f"{'shape':<18} {'dtype':<8} {'data':<10} {'p':<5} {'variant':<6} {'ref ms':>8} {'ash ms':>8} "
        f"{'speedup':>7} {'GB/s':>6} {'%clone':>6}"
    )
    for r in results:
        print(
            f"{str(tuple(r['shape'])):<18} {r['dtype']:<8} {r['data']:<10} {r['percentile']:<5} {r['variant']:<6} "
            f"{r['reference_ms']:>8.4f} {r['kernel_ms']:>8.4f} {r['speedup_vs_reference']:>7.1f} "
            f"{r['kernel_gbps']:>6.0f} {r['percent_of_clone']:>6.0f}"
        )
    if features:
        print(f"\n{'shape':<18} {'dtype':<8} {'feature':<20} {'ms':>8} {'x ASH-S':>7} {'%clone':>6}")
        for r in features:
            print(
                f"{str(tuple(r['shape'])):<18} {r['dtype']:<8} {r['feature']:<20} {r['kernel_ms']:>8.4f} "
                f"{r['relative_to_ash_s']:>7.2f} {r['percent_of_clone']:>6.0f}"
            )
    if regimes:
        print(f"\n{'shape':<18} {'dtype':<8} {'data':<10} {'ASH_EXT_CUDA_REGIME':<19} {'regime':<16} {'ms':>8} "
              f"{'%clone':>6} {'launches':>8}")
        for r in regimes:
            if r["regime"] == "n/a":
                print(f"{str(tuple(r['shape'])):<18} {r['dtype']:<8} {r['data']:<10} {r['requested']:<19} n/a")
                continue
            print(f"{str(tuple(r['shape'])):<18} {r['dtype']:<8} {r['data']:<10} {r['requested']:<19} "
                  f"{r['regime']:<16} {r['kernel_ms']:>8.4f} {r['percent_of_clone']:>6.0f} {r['launches']:>8}")
    mismatched = [r for r in regimes if r.get("matches_auto") is False]
    if mismatched:
        print(f"{len(mismatched)} regime rows differ from auto's output")
    return 0 if results and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
