"""Small cases of every CUDA regime, for compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

On chip (one sample length per dtype in the window just under the 48 KiB default limit of dynamic
shared memory, and blocks of 128 and 256 threads), one block per sample (batch 2 x SMs, samples
just over the on-chip limit: big, so only float32 and float16) and the chunked pipeline (1 to 3
samples just over the on-chip limit), in every dtype, with tied data (70% zeros, small integers)
and continuous data, and one channels_last case per regime. Each case runs ASH-P, ASH-B and
ASH-S out of place, in place and backward (block per sample: the backward of ASH-S only) and
checks them against ash_ext.fallback (gpu_cases.check_case); the "-family" cases check per-sample k
(with invalid ks), clamping, SCALE and topk_stats instead (gpu_cases.check_family). The data are drawn and the fallback
runs on the CPU, so that the GPU runs little but ash_ext's kernels: quicker under the tools, and
no reports from torch's own kernels. ``--quick`` (for racecheck, which is slow) runs 15 cases
instead of 33, its block-per-sample case not in place. With ASH_CHECK_STOP_AT (Unix time) set, no case
starts after that time. One line per case, "ok|MISMATCH|ERROR <label> <shape> <dtype> <regime>",
then a "summary:" line; exit status 1 if any case failed.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_cases.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_cases  # noqa: E402
from gpu_cases import DTYPES, Case, Limits, on_chip_limit, window_n  # noqa: E402

import ash_ext  # noqa: E402  (gpu_cases put the repository first on sys.path)


def cases(limits: Limits, quick: bool) -> list:
    """The cases; the big block-per-sample ones last, so that a deadline cuts them first."""
    f32_limit = on_chip_limit(torch.float32, limits)
    top = window_n(torch.float32, limits, 0)
    window_map = (2, top // 16, 4, 4) if top % 16 == 0 else (2, 32, 6, 6)  # [2, 640, 4, 4]: n = 10240
    long_map = (f32_limit // 49 + 1, 7, 7)  # [C, 7, 7] just over the float32 on-chip limit
    out = []
    # On chip. 160 bytes under 48 KiB: n = 10200 (float32), 20400 (16-bit), 5100 (float64) on an H100.
    out += [Case("on-chip-window", (4, window_n(d, limits, 160)), d, "zeros70") for d in DTYPES]
    if quick:
        out += [
            Case("on-chip-128t", (3, 700), torch.float16, "ints"),
            Case("on-chip-256t", (2, 3000), torch.bfloat16, "normal"),
        ]
    else:
        out += [Case("on-chip-128t", (3, 700), d, "ints") for d in DTYPES]
        out += [Case("on-chip-256t", (2, 3000), d, "normal") for d in DTYPES]
    out.append(Case("on-chip-window", window_map, torch.float32, "ints", channels_last=True))
    # Chunked: few samples just over the on-chip limit; n + 4099 leaves a short last chunk.
    chunked = [((1, 1), "zeros70"), ((2, 37), "ints"), ((1, 4099), "normal")]
    for i, dtype in enumerate(DTYPES):
        limit = on_chip_limit(dtype, limits)
        picks = [chunked[i % 3]] if quick else chunked
        out += [Case("chunked", (batch, limit + extra), dtype, kind) for (batch, extra), kind in picks]
    out.append(Case("chunked", (3,) + long_map, torch.float32, "mixed", channels_last=True))
    # The shaping family (per-sample k, clamp, SCALE, topk_stats; gpu_cases.check_family) in every
    # regime: small cases, mixed data (one kind per sample).
    family = dict(family=True)
    out.append(Case("on-chip-family", (5, 700), torch.float32, "mixed", **family))
    out.append(Case("chunked-family", (3, f32_limit + 37), torch.float32, "mixed", **family))
    if not quick:
        out.append(Case("on-chip-family", (5, 3000), torch.float16, "mixed", **family))
        f64_limit = on_chip_limit(torch.float64, limits)
        out.append(Case("chunked-family", (3, f64_limit + 4099), torch.float64, "mixed", **family))
    # One block per sample: 2 x SMs samples of each kind of data (mixed), the backward of ASH-S only.
    sms2 = 2 * limits.sms
    big = dict(grads=("ash_s",), inplace=not quick)
    out.append(Case("block-per-sample", (sms2,) + long_map, torch.float32, "mixed", channels_last=True, **big))
    if not quick:
        f16_limit = on_chip_limit(torch.float16, limits)
        out.append(Case("block-per-sample", (sms2, f16_limit + 8), torch.float16, "mixed", **big))
        out.append(Case("block-per-sample-family", (sms2, f32_limit + 8), torch.float32, "mixed", **family))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (for racecheck)")
    parser.add_argument("--list", action="store_true", help="list the cases and their regimes, run nothing")
    parser.add_argument("--device", default="cuda", help="cpu: the CPU kernel instead (to try the script out)")
    parser.add_argument("--sms", type=int, help="plan for this many SMs instead of the device's")
    parser.add_argument("--shared-optin", type=int, help="plan for this opt-in shared memory per block (bytes)")
    args = parser.parse_args()
    limits = gpu_cases.device_limits(args.device, args.sms, args.shared_optin)
    todo = cases(limits, args.quick)
    if args.list:
        for i, case in enumerate(todo):
            print(
                f"{gpu_cases.label(i, case)} {gpu_cases.shape_text(case.shape)} "
                f"{gpu_cases.dtype_name(case.dtype)} {gpu_cases.regime_of(case.shape, case.dtype, limits)}"
            )
        return 0
    serving = ash_ext.implementation_for(torch.zeros(1, 1, device=args.device))
    if args.device == "cuda" and serving != "cuda-kernel":
        print(f"ash_ext serves CUDA tensors with {serving!r}, not its kernels (built without CUDA?)")
        return 1
    counts, why, reached = gpu_cases.run_cases(todo, limits, args.device, ref_device="cpu", data_device="cpu")
    if why == "broken":
        print(f"skipped {len(todo) - reached} cases: the CUDA context is broken")
        counts["skipped"] += len(todo) - reached
    failed = counts["MISMATCH"] + counts["ERROR"]
    print(
        f"summary: {counts['ok']} ok / {failed} failed / {counts['skipped']} skipped, of {len(todo)}"
        f"{' (quick)' if args.quick else ''}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
