"""Sizes past 32-bit indexing: a release check (too slow and too large for CI).

Two float16 inputs of more than 2**31 elements -- a batch of many samples whose total passes
2**31, and one sample of more than 2**31 values -- through every variant (ASH-P, ASH-B, ASH-S,
SCALE) and topk_stats. For each it checks, per sample: exactly k values kept, every kept value >=
every dropped one, the output values (ASH-B's s1/k, ASH-S's and SCALE's x * exp(s1/s2)) and
topk_stats' sums against float64 sums, and the input unchanged (a fingerprint taken before).
The checks walk the tensors in slices, so that they add little to the op's own memory.

    python tools/large_sizes.py                  # the CPU kernel: both sizes, every variant
    python tools/large_sizes.py --scale 0.01     # the same checks on 1/100 of the sizes (seconds)
    python tools/large_sizes.py --device cuda    # the CUDA kernels (benchmarks/device_check.sh)
    python tests/emulation/run_emulation.py --large 0.002   # the CUDA kernels, emulated, at 1/500

Prints one line per call (time, peak resident memory) and exits non-zero on any failure. Run by
``make large-sizes``, before each release.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

VARIANTS = {"ash-p": 0, "ash-b": 1, "ash-s": 2, "scale": 3}
PERCENTILE = 0.5  # keeps half: exp(s1/s2) stays near 4 for the data below, well inside float16
SLICE = 1 << 20  # elements a check looks at at once


def shapes(scale: float) -> list[tuple[str, tuple[int, int]]]:
    n_single = int(((1 << 31) + (1 << 20)) * scale) // 4 * 4  # whole 64-bit words (fingerprint)
    batch = int(((1 << 15) + 8) * scale)
    return [("batch total > 2^31", (max(batch, 2), 1 << 16)), ("one sample > 2^31", (1, max(n_single, 1 << 16)))]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def kept_count(n: int) -> int:
    return n - int(round(n * PERCENTILE))


def make_input(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Positive float16 values in [0.25, 4.25) (so kept <=> output != 0), with many ties: random
    bit patterns in that range (drawn as int16, which is several times faster than rand)."""
    x = torch.empty(shape, dtype=torch.float16)
    low, high = (int(torch.tensor(v, dtype=torch.float16).view(torch.int16)) for v in (0.25, 4.25))
    bits = x.view(-1).view(torch.int16)
    for start in range(0, bits.numel(), SLICE):
        part = bits[start : start + SLICE]
        part.copy_(torch.randint(low, high, (part.numel(),), generator=generator, dtype=torch.int16))
    return x


def slices(x: torch.Tensor):
    """(row slice, column slice) pairs covering x [B, n] with about SLICE elements each."""
    batch, n = x.shape
    if n >= SLICE:
        for c in range(0, n, SLICE):
            yield slice(0, batch), slice(c, c + SLICE)
    else:
        rows = max(1, SLICE // n)
        for r in range(0, batch, rows):
            yield slice(r, r + rows), slice(0, n)


def fingerprint(x: torch.Tensor) -> int:
    """An order-sensitive checksum of x's bits (changes if any element changes, with high odds):
    the 64-bit words of each slice weighted by position, the slices by their number."""
    words = x.view(-1).view(torch.int64)  # 4 float16 values a word (both sizes are multiples of 4)
    weights = torch.arange(1, SLICE + 1, dtype=torch.int64)
    total = 0
    for number, start in enumerate(range(0, words.numel(), SLICE)):
        part = words[start : start + SLICE]
        total += (number + 1) * int((part.cpu() * weights[: part.numel()]).sum())
    return total


def parallel_slices(x: torch.Tensor, work):
    """work(rows, cols) over every slice, on a pool of threads (numpy releases the GIL)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda rc: (rc[0], work(*rc)), slices(x)))


def host_slice(t: torch.Tensor, rows: slice, cols: slice) -> np.ndarray:
    """A slice widened to float32 (every float16 value is exact there) as a numpy array on the host.
    numpy does the checks: torch's float16 and boolean reductions are slow on the CPU."""
    return t[rows, cols].float().cpu().numpy()


def per_sample_facts(x: torch.Tensor, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: kept count, smallest kept and largest dropped x, sum of x, sum of kept x
    (float32 within a slice, float64 across slices)."""

    def slice_facts(rows: slice, cols: slice):
        xs = host_slice(x, rows, cols)
        kept = host_slice(out, rows, cols) != 0
        return (np.count_nonzero(kept, axis=1), np.where(kept, xs, np.inf).min(1),
                np.where(kept, -np.inf, xs).max(1), xs.sum(1, dtype=np.float64),
                np.where(kept, xs, 0).sum(1, dtype=np.float64))

    batch = x.shape[0]
    kept, min_kept, max_dropped, s1, s2 = (np.zeros(batch, dtype=np.int64), np.full(batch, np.inf),
                                           np.full(batch, -np.inf), np.zeros(batch), np.zeros(batch))
    for rows, (count, low, high, total, kept_total) in parallel_slices(x, slice_facts):
        kept[rows] += count
        np.minimum(min_kept[rows], low, out=min_kept[rows])
        np.maximum(max_dropped[rows], high, out=max_dropped[rows])
        s1[rows] += total
        s2[rows] += kept_total
    facts = {"kept": kept, "min_kept": min_kept, "max_dropped": max_dropped, "s1": s1, "s2": s2}
    return {name: torch.from_numpy(value) for name, value in facts.items()}


def output_error(x: torch.Tensor, out: torch.Tensor, variant: str, k: int, facts) -> float:
    """Largest relative error of the kept (SCALE: all) outputs against float32 arithmetic on the
    float64 sums (float32's error is far below float16's)."""
    factor = torch.exp(facts["s1"] / facts["s2"]).float().numpy()
    mean = (facts["s1"] / k).float().numpy()

    def slice_error(rows: slice, cols: slice) -> float:
        xs = host_slice(x, rows, cols)
        got = host_slice(out, rows, cols)
        if variant == "ash-p":
            want = xs
        elif variant == "ash-b":
            want = np.broadcast_to(mean[rows][:, None], xs.shape)
        else:
            want = xs * factor[rows][:, None]
        if variant != "scale":
            want = np.where(got != 0, want, 0)
        return float((np.abs(got - want) / np.maximum(np.abs(want), 1e-30)).max())

    return max(error for _, error in parallel_slices(x, slice_error))


def print_line(label: str, op: str, shape, seconds: float, detail: str) -> None:
    elements = shape[0] * shape[1]
    print(f"  {label:<20} {op:<10} [{shape[0]}, {shape[1]}] = {elements:,} elements"
          f" ({elements / 2**31:.2f} x 2^31): {seconds:6.1f} s, peak RSS {peak_rss_gib():.1f} GiB, {detail}",
          flush=True)


def run_all(scale: float, device: str = "cpu") -> list[str]:
    """Every check at `scale` times the full sizes, on whatever implements torch.ops.ash_ext for
    tensors on `device` (the checks themselves run on the host)."""
    failures = []
    generator = torch.Generator().manual_seed(0)
    for label, shape in shapes(scale):
        x = make_input(shape, generator).to(device)
        failures += check(label, x)
        del x
    for failure in failures:
        print("FAIL", failure)
    calls = len(VARIANTS) + 1
    print(f"summary: large sizes, {calls} calls on each of {len(shapes(scale))} inputs, {len(failures)} failures")
    return failures


def check(label: str, x: torch.Tensor) -> list[str]:
    """Every variant and topk_stats on x [B, n]; returns the failures."""
    failures = []
    batch, n = x.shape
    k = kept_count(n)
    before = fingerprint(x)
    facts = None
    for variant, code in VARIANTS.items():
        start = time.perf_counter()
        out = torch.ops.ash_ext.ash(x, k, code)
        seconds = time.perf_counter() - start
        if variant != "scale":
            facts = per_sample_facts(x, out)
            if not bool((facts["kept"] == k).all()):
                failures.append(f"{label} {variant}: kept counts {facts['kept'].unique().tolist()} != k = {k}")
            if not bool((facts["min_kept"] >= facts["max_dropped"]).all()):
                failures.append(f"{label} {variant}: a dropped value exceeds a kept one")
        error = output_error(x, out, variant, k, facts)
        tolerance = 2e-3  # float16's half ulp (2^-11) plus the float32 sums' error
        if not error <= tolerance:
            failures.append(f"{label} {variant}: output relative error {error:.2e} > {tolerance:.0e}")
        print_line(label, variant, x.shape, seconds, f"max rel. error {error:.1e}")
        del out
    start = time.perf_counter()
    threshold, total, kept_sum = torch.ops.ash_ext.topk_stats(x, k)
    seconds = time.perf_counter() - start
    sums_error = max(
        float(((total.double() - facts["s1"]).abs() / facts["s1"]).max()),
        float(((kept_sum.double() - facts["s2"]).abs() / facts["s2"]).max()),
    )
    if not sums_error <= 1e-4:
        failures.append(f"{label} topk_stats: s1/s2 relative error {sums_error:.2e} > 1e-4")
    if not bool((threshold.double() == facts["min_kept"]).all()):
        failures.append(f"{label} topk_stats: threshold differs from the smallest kept value")
    print_line(label, "topk_stats", x.shape, seconds, f"sums rel. error {sums_error:.1e}")
    if fingerprint(x) != before:
        failures.append(f"{label}: the input changed")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes (default 1)")
    parser.add_argument("--device", default="cpu", help="where the op runs: cpu (the CPU kernel) or cuda")
    args = parser.parse_args(argv)
    import ash_ext  # here, not at the top: the CUDA emulator imports this file with its own ash_ext ops

    if not ash_ext.extension_loaded():
        print("ash_ext's compiled module is not loaded: nothing to check", file=sys.stderr)
        return 2
    where = f"the CPU kernel ({ash_ext.cpu_isa()}, {torch.get_num_threads()} threads)"
    if args.device != "cpu":
        where = f"{args.device} ({ash_ext.implementation_for(torch.empty(1, device=args.device))})"
    print(f"ash_ext large sizes on {where}")
    return 1 if run_all(args.scale, args.device) else 0


if __name__ == "__main__":
    sys.exit(main())
