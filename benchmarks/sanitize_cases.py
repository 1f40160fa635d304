"""One small case of each CUDA regime, for compute-sanitizer (memcheck, racecheck, synccheck).

Runs every variant forward (out of place and in place) and backward on: the on-chip regime, one
block per sample (batch 2 x SMs), and the chunked pipeline (a few chunks), each with continuous
data and with ReLU-like data whose threshold ties are broken by index (channels_last too), in
float32 plus one float16 case. Checks ASH-P against the fallback so that a wrong answer also
fails. Sizes are kept small: racecheck is slow. Exit status 0 when all ran and matched.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_cases.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ash_ext  # noqa: E402
from ash_ext import fallback  # noqa: E402

ON_CHIP_FLOAT32 = 48 * 1024 // 4


def cases():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    yield "on-chip", torch.randn(4, 2048, device="cuda")
    yield (
        "on-chip relu channels_last",
        torch.randn(2, 32, 6, 6, device="cuda").relu().to(memory_format=torch.channels_last),
    )
    yield "block-per-sample", torch.randn(2 * sms, ON_CHIP_FLOAT32 + 8, device="cuda")
    yield "block-per-sample relu", torch.randn(2 * sms, ON_CHIP_FLOAT32 + 8, device="cuda").relu()
    yield "chunked", torch.randn(1, 5 * 4096 + 3, device="cuda")
    yield (
        "chunked relu channels_last",
        torch.randn(1, 512, 7, 7, device="cuda").relu().to(memory_format=torch.channels_last),
    )
    yield "chunked float16 relu", torch.randn(2, 2048, 7, 7, device="cuda").relu().half()


def main() -> int:
    assert ash_ext.implementation_for(torch.zeros(1, 1, device="cuda")) == "cuda-kernel"
    failures = 0
    for label, x in cases():
        for name in ("ash_p", "ash_b", "ash_s"):
            fn = getattr(ash_ext, name)
            out = fn(x, 0.65)
            inplace = x.clone()
            fn(inplace, 0.65, inplace=True)
            leaf = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(leaf, 0.65), leaf, torch.ones_like(x))
            torch.cuda.synchronize()
            if name == "ash_p" and not (torch.equal(out, fallback.ash_p(x, 0.65)) and torch.equal(inplace, out)):
                print(f"MISMATCH {label} {name}")
                failures += 1
            del out, inplace, grad
        print(f"ok {label} {tuple(x.shape)} {x.dtype}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
