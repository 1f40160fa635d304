"""Microseconds per call of the public shaping functions on one small sample (issue 12, point 4).

A call on a ``[1, n]`` tensor does little work, so the per-call costs show: argument checks, k,
the dispatcher (and its autograd key under ``no_grad``), the C++ front end, and the kernel's fixed
costs next to its passes over the n values. Next to ``ash_p`` / ``ash_b`` / ``ash_s`` / ``scale``
it times ``x.clone()`` (a floor: one allocation and one pass), the raw op
``torch.ops.ash_ext.ash(x, k, variant)`` (no Python-side checks) and, where the public functions
have their compiled fast path, ASH-S by the general path (``functional.shape_with``: what every
call went through before).

Every case is timed ``--number`` calls at a time, in rounds over all cases (so that other load on
the machine disturbs every case alike); the table gives the median and the best of ``--repeat``
rounds. Times the ash_ext of the checkout it is in (after an in-place build)::

    python benchmarks/per_call.py
    python benchmarks/per_call.py --number 20000 --repeat 11 --sizes 2048 768
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path
from typing import Callable, ContextManager

import torch

# The checkout this script is in comes first, so that its in-place build is the one timed (not an
# ash_ext installed elsewhere in the environment).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ash_ext  # noqa: E402
from ash_ext import functional, kept_count  # noqa: E402
from ash_ext._semantics import VARIANT_CODES  # noqa: E402

PERCENTILE = 0.65

#: The grad modes timed: name, and a factory of the context manager.
MODES: dict[str, Callable[[], ContextManager[object]]] = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
}

PUBLIC: dict[str, Callable[..., torch.Tensor]] = {
    "ash_p": ash_ext.ash_p,
    "ash_b": ash_ext.ash_b,
    "ash_s": ash_ext.ash_s,
    "scale": ash_ext.scale,
}


def cases(x: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """The calls timed on ``x``: the clone floor, the raw op (ASH-S) and the public functions."""
    k = kept_count(x[0].numel(), PERCENTILE)
    raw = torch.ops.ash_ext.ash
    ash_s_code = VARIANT_CODES["ash-s"]
    timed: list[tuple[str, Callable[[], object]]] = [
        ("x.clone()", lambda: x.clone()),
        ("raw op (ash-s)", lambda: raw(x, k, ash_s_code)),
    ]
    for name, fn in PUBLIC.items():
        timed.append((name, lambda fn=fn: fn(x, PERCENTILE)))
    shape_with = getattr(functional, "shape_with", None)
    if shape_with is not None and getattr(functional, "FAST_SHAPE", None) is not None:
        # What every call paid before the fast path: the checks, k, torch.ops and (under no_grad)
        # the autograd key's Python kernel.
        timed.append(("general path", lambda: shape_with(x, PERCENTILE, "ash-s")))
    return timed


def time_cases(
    timed: list[tuple[str, Callable[[], object]]], number: int, repeat: int
) -> list[tuple[str, float, float]]:
    """(name, median, best) in microseconds per call of every case, over ``repeat`` rounds."""
    for _, fn in timed:  # warm up (first-call costs, caches)
        timeit.timeit(fn, number=max(1, number // 10))
    rounds: list[list[float]] = [[] for _ in timed]
    for _ in range(repeat):
        for samples, (_, fn) in zip(rounds, timed):
            samples.append(timeit.timeit(fn, number=number) / number * 1e6)
    return [(name, statistics.median(s), min(s)) for (name, _), s in zip(timed, rounds)]


def main() -> None:
    """Print the table: one row per size, grad mode and case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 768], help="n of the [1, n] inputs")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings per case (rounds)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch's intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ash_ext {ash_ext.__version__} from {ash_ext.__file__}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; implementation: {ash_ext.implementation_for(torch.empty(1, 1))}"
    )
    print(f"float32 [1, n], percentile {PERCENTILE}; {args.number} calls per timing, {args.repeat} rounds")
    print(f"| {'n':>5} | {'mode':<14} | {'call':<15} | {'median us':>9} | {'best us':>7} | {'x clone':>7} |")
    print(f"|{'-' * 6}:|:{'-' * 15}|:{'-' * 16}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|")
    torch.manual_seed(0)
    for n in args.sizes:
        sample = torch.randn(1, n).relu()  # post-ReLU activations, as ASH sees them
        for mode, make_context in MODES.items():
            with make_context():
                x = sample.clone()  # an inference tensor under inference_mode
                results = time_cases(cases(x), args.number, args.repeat)
            clone_median = results[0][1]
            for name, median, best in results:
                print(
                    f"| {n:>5} | {mode:<14} | {name:<15} | {median:>9.2f} | {best:>7.2f} | "
                    f"{median / clone_median:>6.1f}x |"
                )


if __name__ == "__main__":
    main()
