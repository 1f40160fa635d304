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

The rounds take the CPU kernel's ISA builds (``ash_ext.cpu_isas()``) in turn. Prints one line
``leak-workload {json}``: the rounds, the calls made, and the heap in use
(``__sanitizer_get_current_allocated_bytes``) after the first round on each ISA build and after
the last round.
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
    def __init__(self) -> None:
        self.calls = 0
        self.cases = [x for dtype in DTYPES for x in inputs(dtype)]

    def call(self, fn, *args, **kwargs):
        self.calls += 1
        return fn(*args, **kwargs)

    def expect_error(self, fn, *args) -> None:
        self.calls += 1
        try:
            fn(*args)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return
        raise AssertionError(f"no error from {fn} on {[getattr(a, 'shape', a) for a in args]}")

    def round(self) -> None:
        for x in self.cases:
            batch, n = x.shape[0], x[0].numel()
            k = n // 3
            ks = torch.arange(batch, dtype=torch.long) % (n + 1)
            grad = torch.ones_like(x)
            for variant in VARIANTS:
                self.call(OPS.ash, x, k, variant)
                self.call(OPS.ash, x, 0, variant, ks, -0.5, 1.5)
                self.call(OPS.ash_, x.clone(), k, variant, None, None, 2.0)
                wide = torch.cat([x, x], dim=1)
                self.call(OPS.ash_, wide[:, : x.shape[1]], k, variant)  # a non-dense slice
                self.call(OPS.ash_backward, grad, x, k, variant)
                self.call(OPS.ash_backward, grad, x, 0, variant, ks)
                for clamp in ((None, None), (-0.25, 1.0)):
                    leaf = x.detach().clone().requires_grad_(True)
                    out = self.call(OPS.ash, leaf, k, variant, None, *clamp)
                    (out.float().sum()).backward()
            self.call(OPS.topk_stats, x, k)
            self.call(OPS.topk_stats, x, 0, ks, -1.0, 1.0)
            for fn in (ash_ext.ash_p, ash_ext.ash_b, ash_ext.ash_s, ash_ext.scale):
                self.call(fn, x, 0.65)
                self.call(fn, x.clone(), 0.65, inplace=True, clip=1.0)
        self.errors()

    def errors(self) -> None:
        x = torch.randn(3, 10)
        self.expect_error(OPS.ash, x, 11, 0)
        self.expect_error(OPS.ash, x, -1, 1)
        self.expect_error(OPS.ash, x, 2, 4)
        self.expect_error(OPS.ash, x, 0, 2, torch.tensor([1, 2, 11]))
        self.expect_error(OPS.ash, x, 0, 2, torch.tensor([1, 2]))
        self.expect_error(OPS.ash, x, 0, 2, torch.tensor([1.0, 2.0, 3.0]))
        self.expect_error(OPS.ash, x, 2, 0, None, float("nan"), None)
        self.expect_error(OPS.ash, x, 2, 0, None, 2.0, 1.0)
        self.expect_error(OPS.ash, torch.ones(3, 10, dtype=torch.int32), 2, 0)
        self.expect_error(OPS.ash, torch.ones(10), 2, 0)
        self.expect_error(OPS.ash_, torch.ones(1, 10).expand(3, 10), 2, 0)
        self.expect_error(OPS.ash_backward, torch.ones(3, 9), x, 2, 0)
        self.expect_error(OPS.ash_backward, torch.ones(3, 10, dtype=torch.float64), x, 2, 0)
        self.expect_error(OPS.topk_stats, x, 11)


def allocated_bytes() -> int:
    gc.collect()
    get = ctypes.CDLL(None).__sanitizer_get_current_allocated_bytes
    get.restype = ctypes.c_size_t
    return int(get())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    expected = os.environ.get("ASH_EXT_SANITIZED_MODULE", "")
    library = ash_ext._ops._C.__file__ if ash_ext.extension_loaded() else "none"
    if not expected or os.path.realpath(library) != os.path.realpath(expected):
        print(f"ash_ext._C is {library}, not the sanitized build {expected or '(ASH_EXT_SANITIZED_MODULE unset)'}")
        return 2
    isas = ash_ext.cpu_isas()
    work = Workload()
    for isa in isas:  # the first rounds fill torch's and Python's caches
        ash_ext.set_cpu_isa(isa)
        work.round()
    first = allocated_bytes()
    for index in range(len(isas), args.rounds):  # the ISA builds in turn
        ash_ext.set_cpu_isa(isas[index % len(isas)])
        work.round()
    last = allocated_bytes()
    report = {"rounds": max(args.rounds, len(isas)), "calls": work.calls, "isas": list(isas),
              "heap_after_first_rounds": first, "heap_after_last_round": last}
    print("leak-workload " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
