"""Speed of the CPU kernel's shaping-family features next to the plain ASH-S path.

Times torch.ops.ash_ext.ash / topk_stats on the given shapes (float32): SCALE (variant 3) vs
ASH-S (variant 2), clamped vs not, per-sample k vs one k, topk_stats vs ash. Run from the
repository root after an in-place build:  python benchmarks/family_cpu_speed.py
"""

from __future__ import annotations

import argparse
import math
import time
import timeit

import torch

import ash_ext  # noqa: F401  (registers the ops)

OPS = torch.ops.ash_ext


def cases(x: torch.Tensor, k: int):
    ks = torch.full((x.shape[0],), k, dtype=torch.long)
    # A bound of 3 clamps a few values far above the threshold; a bound of 1 clamps some 16% of
    # post-ReLU values to 1.0, where the threshold then lies: a sample with thousands of ties, so
    # the same data clamped beforehand is timed too, to separate the clamp from the ties.
    pre_clamped = x.clamp(max=1.0)
    yield "ash-s", lambda: OPS.ash(x, k, 2)
    yield "ash-s per-sample k", lambda: OPS.ash(x, k, 2, ks)
    yield "ash-s clamp max=3", lambda: OPS.ash(x, k, 2, None, None, 3.0)
    yield "ash-s clamp max=1", lambda: OPS.ash(x, k, 2, None, None, 1.0)
    yield "ash-s on x.clamp(max=1)", lambda: OPS.ash(pre_clamped, k, 2)
    yield "scale", lambda: OPS.ash(x, k, 3)
    yield "scale clamp max=3", lambda: OPS.ash(x, k, 3, None, None, 3.0)
    yield "ash-p", lambda: OPS.ash(x, k, 0)
    yield "topk_stats", lambda: OPS.topk_stats(x, k)
    yield "topk_stats clamp max=3", lambda: OPS.topk_stats(x, k, None, None, 3.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time in process CPU seconds (with --threads 1: the work done, less disturbed by other load)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timer = time.process_time if args.cpu_time else time.perf_counter
    print(f"ash_ext from {ash_ext.__file__}, {torch.get_num_threads()} threads")
    for shape in ([64, 2048, 7, 7], [256, 2048]):
        x = torch.randn(shape).relu()  # post-ReLU activations, as ASH sees them
        n = x[0].numel()
        k = n - round(n * 0.9)
        print(f"shape {shape}, k={k}")
        # Rounds over all cases, keeping each case's best time: other load on the machine
        # then disturbs every case alike instead of whichever ran during it.
        timed = []
        for name, fn in cases(x, k):
            try:
                fn()
            except RuntimeError as error:
                print(f"  {name:26s} unavailable ({str(error).splitlines()[0][:60]})")
                continue
            number = max(1, int(0.1 / max(1e-6, timeit.timeit(fn, number=1, timer=timer))))
            timed.append([name, fn, number, math.inf])
        for _ in range(args.repeat):
            for case in timed:
                case[3] = min(case[3], timeit.timeit(case[1], number=case[2], timer=timer) / case[2])
        for name, _, _, best in timed:
            print(f"  {name:26s} {best * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
