"""The leak check's workload: every ash_ext op, ``--rounds`` times, under the sanitized build.

Run by tools/sanitized_cpu.py (with the AddressSanitizer runtime preloaded and LeakSanitizer on;
it reads LeakSanitizer's report at exit). One round calls, on float16, bfloat16, float32 and
float64 inputs of three layouts -- pooled [B, C], 4-D [B, C, H, W] and the same channels_last --
and for each variant (0 ASH-P, 1 ASH-B, 2 ASH-S, 3 SCALE):

* torch.ops.ash_ext.ash with a k, and with per-sample ks and both clamp bounds;
* torch.ops.ash_ext.ash_ (in place) with a k and a clamp, and on a non-dense slice (the staged copy);
* torch.ops.ash_ext.ash_backward, and the backward through autograd (with and without a clamp);
* torch.ops.ash_ext.topk_stats with a k, and with per-sample ks and clamps;
* the public functions' fast path (ash_ext.ash_p / ash_b / ash_s / scale, out of place and in place);

and, once a round, each argument error the front end raises (k or a per-sample k out of range,
ks of the wrong shape or dtype, an unknown variant, a NaN or crossed clamp, a gradient of the
wrong shape or dtype, an integer or 1-D input, in place on an expanded tensor): an exception thrown
out of C++ must not leak either.

The rounds take the CPU kernel's ISA builds (``ash_ext.cpu_isas()``) in turn. After a first
round on each (which fills torch's and Python's caches) and after each count of ``--rounds``,
a checkpoint: LeakSanitizer's report of what is leaked so far (``__lsan_do_recoverable_leak_check``,
to stderr between ``leak-checkpoint N`` and ``leak-checkpoint-end N`` lines) and the heap in use
(``__sanitizer_get_current_allocated_bytes``). Run with ``PYTHONMALLOC=malloc``, so that
LeakSanitizer sees Python's objects (pymalloc's arenas are mmap'd and not scanned: every block
only they point to would count as leaked). Prints one line ``leak-workload {json}`` with the
checkpoints: rounds, calls made, heap in use.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys

import torch

import ash_ext

OPS = torch.ops.ash_ext
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VARIANTS = (0, 1, 2, 3)


def inputs(dtype: torch.dtype) -> list:
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(4, 96, generator=g).to(dtype)
    maps = torch.relu(torch.randn(2, 8, 5, 3, generator=g)).to(dtype)
    return [pooled, maps, maps.contiguous(memory_format=torch.channels_last)]


class Workload:
    """The calls of one round. Every tensor but the calls' own results and in-place copies is made
    once, here: torch.tensor([...]) itself keeps some 60 bytes a call (torch 2.14), which would
    hide what ash_ext does."""

    def __init__(self) -> None:
        self.calls = 0
        self.cases = []
        for dtype in DTYPES:
            for x in inputs(dtype):
                batch, n = x.shape[0], x[0].numel()
                ks = torch.arange(batch, dtype=torch.long) * (n // batch) % (n + 1)
                slice_of = torch.cat([x, x], dim=1)[:, : x.shape[1]]  # not dense: the staged copy
                self.cases.append((x, n // 3, ks, torch.ones_like(x), slice_of))
        x = torch.randn(3, 10)
        self.error_cases = [
            (OPS.ash, x, 11, 0),
            (OPS.ash, x, -1, 1),
            (OPS.ash, x, 2, 4),
            (OPS.ash, x, 0, 2, torch.tensor([1, 2, 11])),
            (OPS.ash, x, 0, 2, torch.tensor([1, 2])),
            (OPS.ash, x, 0, 2, torch.tensor([1.0, 2.0, 3.0])),
            (OPS.ash, x, 2, 0, None, float("nan"), None),
            (OPS.ash, x, 2, 0, None, 2.0, 1.0),
            (OPS.ash, torch.ones(3, 10, dtype=torch.int32), 2, 0),
            (OPS.ash, torch.ones(10), 2, 0),
            (OPS.ash_, torch.ones(1, 10).expand(3, 10), 2, 0),
            (OPS.ash_backward, torch.ones(3, 9), x, 2, 0),
            (OPS.ash_backward, torch.ones(3, 10, dtype=torch.float64), x, 2, 0),
            (OPS.topk_stats, x, 11),
            (OPS.topk_stats, x, 0, torch.tensor([0, 1, -1])),
        ]

    def call(self, fn, *args, **kwargs):
        self.calls += 1
        return fn(*args, **kwargs)

    def round(self) -> None:
        for x, k, ks, grad, slice_of in self.cases:
            for variant in VARIANTS:
                self.call(OPS.ash, x, k, variant)
                self.call(OPS.ash, x, 0, variant, ks, -0.5, 1.5)
                self.call(OPS.ash_, x.clone(), k, variant, None, None, 2.0)
                self.call(OPS.ash_, slice_of, k, variant)
                self.call(OPS.ash_backward, grad, x, k, variant)
                self.call(OPS.ash_backward, grad, x, 0, variant, ks)
                for clamp in ((None, None), (-0.25, 1.0)):
                    leaf = x.detach().clone().requires_grad_(True)
                    out = self.call(OPS.ash, leaf, k, variant, None, *clamp)
                    out.float().sum().backward()
            self.call(OPS.topk_stats, x, k)
            self.call(OPS.topk_stats, x, 0, ks, -1.0, 1.0)
            for fn in (ash_ext.ash_p, ash_ext.ash_b, ash_ext.ash_s, ash_ext.scale):
                self.call(fn, x, 0.65)
                self.call(fn, x.clone(), 0.65, inplace=True, clip=1.0)
        for fn, *args in self.error_cases:
            self.calls += 1
            try:
                fn(*args)
            except (RuntimeError, ValueError, TypeError, IndexError):
                continue
            raise AssertionError(f"no error from {fn} on {[getattr(a, 'shape', a) for a in args]}")


def allocated_bytes() -> int:
    gc.collect()
    get = ctypes.CDLL(None).__sanitizer_get_current_allocated_bytes
    get.restype = ctypes.c_size_t
    return int(get())


def checkpoint(work: Workload, rounds: int) -> dict:
    """LeakSanitizer's report now (to stderr, after a marker line), and the heap in use."""
    heap = allocated_bytes()
    print(f"leak-checkpoint {rounds}", file=sys.stderr, flush=True)
    leaked = ctypes.CDLL(None).__lsan_do_recoverable_leak_check()
    print(f"leak-checkpoint-end {rounds}", file=sys.stderr, flush=True)
    return {"rounds": rounds, "calls": work.calls, "heap": heap, "leaks_reported": bool(leaked)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", required=True, help="comma-separated round counts at which to check, ascending")
    args = parser.parse_args()
    expected = os.environ.get("ASH_EXT_SANITIZED_MODULE", "")
    library = ash_ext._ops._C.__file__ if ash_ext.extension_loaded() else "none"
    if not expected or os.path.realpath(library) != os.path.realpath(expected):
        print(f"ash_ext._C is {library}, not the sanitized build {expected or '(ASH_EXT_SANITIZED_MODULE unset)'}")
        return 2
    isas = ash_ext.cpu_isas()
    work = Workload()
    done = 0
    for isa in isas:  # the first rounds fill torch's and Python's caches
        ash_ext.set_cpu_isa(isa)
        work.round()
        done += 1
    checkpoints = [checkpoint(work, done)]
    for target in sorted(int(r) for r in args.rounds.split(",")):
        while done < target:  # the ISA builds in turn
            ash_ext.set_cpu_isa(isas[done % len(isas)])
            work.round()
            done += 1
        checkpoints.append(checkpoint(work, done))
    print("leak-workload " + json.dumps({"isas": list(isas), "checkpoints": checkpoints}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
