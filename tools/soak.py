"""Repeated calls and concurrent threads: resident memory stays flat, and results do not depend
on which thread computed them or what it computed before.

    python tools/soak.py memory [--calls 10000]           # resident memory over 10^4 calls of each op
    python tools/soak.py threads [--threads 8 --rounds 3]  # 8 threads at once vs one thread

``memory``: for each op (forward, in place, raw backward, autograd backward, topk_stats, the
public functions), calls cycling through every dtype and the pooled [8, 512], 4-D [4, 64, 7, 7]
and channels_last 4-D inputs; resident memory is read after a warm-up (allocator pools and the
kernel's per-thread scratch filled) and at the end; the growth must stay within --margin-mib.
``threads``: every op on every dtype and layout, on samples of 37 to 70,000 values from
different distributions, run first on one thread, then by N threads at once, each in its own
shuffled order (so each thread's threshold guess comes from different samples) for R rounds;
every result must be bit-identical to the one-thread result. On the CPU kernel and on the
pure-PyTorch fallback. Exit status non-zero on any failure. tests/test_soak.py runs both.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import threading
from typing import Callable

import torch

import ash_ext
from ash_ext.functional import shape_with

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VARIANTS = ("ash-p", "ash-b", "ash-s", "scale")
CODES = {name: code for code, name in enumerate(VARIANTS)}
Call = Callable[[], object]


def trimmed_resident_mib() -> float:
    """resident_mib() after glibc has handed its free heap memory back (malloc_trim), so that
    what is left is memory still allocated, not memory the allocator keeps for reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the plain reading
        pass
    return resident_mib()


def resident_mib() -> float:
    """This process's resident set size in MiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for dtype in DTYPES:
        for shape in ((8, 512), (4, 64, 7, 7)):
            inputs.append(torch.randn(shape, generator=generator).relu().to(dtype))
        inputs.append(inputs[-1].contiguous(memory_format=torch.channels_last))
    return inputs


def memory_ops(inputs: list[torch.Tensor]) -> dict[str, Callable[[int], object]]:
    """Each op as f(i): its i-th call (input and variant chosen by i)."""
    grads = [torch.ones_like(x) for x in inputs]
    ks = [torch.full((x.shape[0],), x[0].numel() // 3, dtype=torch.int64) for x in inputs]

    def pick(i: int):
        x = inputs[i % len(inputs)]
        return x, x[0].numel() // 3, CODES[VARIANTS[(i // len(inputs)) % len(VARIANTS)]]

    def inplace(i: int):
        x, k, code = pick(i)
        y = x.clone()
        torch.ops.ash_ext.ash_(y, k, code)
        return y

    def autograd_backward(i: int):
        x, _, code = pick(i)
        leaf = x.detach().requires_grad_()
        ash_ext.shape(leaf, 0.65, VARIANTS[code]).backward(grads[i % len(inputs)])
        return leaf.grad

    return {
        "ash": lambda i: torch.ops.ash_ext.ash(*pick(i)),
        "ash per-sample k, clamp": lambda i: torch.ops.ash_ext.ash(
            pick(i)[0], 0, pick(i)[2], ks[i % len(inputs)], 0.0, 2.0
        ),
        "ash_ (in place)": inplace,
        "ash_backward": lambda i: torch.ops.ash_ext.ash_backward(grads[i % len(inputs)], *pick(i)),
        "autograd backward": autograd_backward,
        "topk_stats": lambda i: torch.ops.ash_ext.topk_stats(pick(i)[0], pick(i)[1]),
        "ash_s(x, 0.65)": lambda i: ash_ext.ash_s(pick(i)[0], 0.65),
    }


def run_memory(calls: int, margin_mib: float, warmup: int = 500) -> list[str]:
    inputs = memory_inputs()
    failures = []
    print(f"resident memory over {calls:,} calls of each op (after {warmup} warm-up calls), "
          f"{len(inputs)} inputs (4 dtypes x pooled, 4-D, channels_last)")
    for name, op in memory_ops(inputs).items():
        for i in range(warmup):
            op(i)
        before = resident_mib()
        halfway = before
        for i in range(calls):
            op(i)
            if i == calls // 2:
                halfway = resident_mib()
        after = resident_mib()
        growth = after - before
        print(f"  {name:<26} {before:8.1f} MiB -> {halfway:8.1f} (halfway) -> {after:8.1f} MiB: "
              f"growth {growth:+.2f} MiB", flush=True)
        if growth > margin_mib:
            failures.append(f"{name}: resident memory grew {growth:.2f} MiB over {calls} calls (> {margin_mib})")
    failures += run_long_sample(margin_mib)
    return failures


def run_long_sample(margin_mib: float, n: int = 1 << 24) -> list[str]:
    """One call on a sample of n float32 values (past the kernel's retained scratch, 2^22 values)
    must not leave its buffers behind: resident memory after the tensors are freed is what it
    was before (the thread's scratch would otherwise keep n keys and a clamped copy)."""
    def calls(x: torch.Tensor) -> None:
        torch.ops.ash_ext.ash(x, x.shape[1] // 3, CODES["ash-s"])
        torch.ops.ash_ext.topk_stats(x, x.shape[1] // 3, None, -1.0, 1.0)
        torch.ops.ash_ext.ash_(x.clone(), x.shape[1] // 3, CODES["ash-b"], None, -1.0, 1.0)
        leaf = x.clone().requires_grad_()
        ash_ext.shape(leaf, 0.65, "ash-s").backward(torch.ones_like(x))

    calls(torch.randn(1, 1 << 16))  # threads, autograd and allocator pools started on a short sample
    before = trimmed_resident_mib()
    calls(torch.randn(1, n))
    growth = trimmed_resident_mib() - before
    print(f"  one sample of {n:,} float32 values (forward, topk_stats, in place, backward; {n * 4 / 2**20:.0f} MiB "
          f"a tensor): {growth:+.2f} MiB left resident after the tensors are freed", flush=True)
    if growth > margin_mib:
        return [f"a sample of {n} values left {growth:.2f} MiB resident (> {margin_mib})"]
    return []


def thread_cases(fallback: bool) -> list[tuple[str, Call]]:
    """(label, call) pairs covering every op, dtype and layout; each call returns a tuple of tensors."""
    generator = torch.Generator().manual_seed(1)
    cases = []
    # One long sample: the CPU kernel splits it over threads. The fallback keeps no state between
    # calls and sorts, so it gets the short ones only.
    shapes = [(6, 37), (3, 5000), (2, 64, 7, 7)] + ([] if fallback else [(1, 70000)])
    for dtype in DTYPES:
        for shape in shapes:
            for kind in ("normal", "relu", "ties", "wide"):
                x = torch.randn(shape, generator=generator)
                if kind == "relu":
                    x = x.relu()
                elif kind == "ties":
                    x = x.mul(2).round()
                elif kind == "wide":
                    x = x * torch.logspace(-3, 3, shape[0]).view(-1, *([1] * (len(shape) - 1)))
                x = x.to(dtype)
                if len(shape) == 4 and kind in ("relu", "wide"):
                    x = x.contiguous(memory_format=torch.channels_last)
                cases += cases_for(x, f"{dtype} {list(shape)} {kind}", fallback)
    return cases


def cases_for(x: torch.Tensor, label: str, fallback: bool) -> list[tuple[str, Call]]:
    k = max(1, x[0].numel() // 3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    cases = []
    for variant in VARIANTS:
        if fallback:
            cases.append((f"{label} {variant}", lambda x=x, v=variant: (
                shape_with(x, 0.65, v, force_fallback=True),
                shape_with(x.clone(), 0.65, v, inplace=True, force_fallback=True))))
            cases.append((f"{label} {variant} backward", lambda x=x, v=variant: (
                autograd_grad(x, v, grad, force_fallback=True),)))
            continue
        code = CODES[variant]
        cases.append((f"{label} {variant}", lambda x=x, c=code: (torch.ops.ash_ext.ash(x, k, c),)))
        cases.append((f"{label} {variant} in place", lambda x=x, c=code: (inplace_result(x, k, c),)))
        cases.append((f"{label} {variant} backward", lambda x=x, c=code: (
            torch.ops.ash_ext.ash_backward(grad, x, k, c), autograd_grad(x, VARIANTS[c], grad))))
    if fallback:
        cases.append((f"{label} topk_stats", lambda x=x: ash_ext.fallback.topk_stats(x, k)))
    else:
        cases.append((f"{label} topk_stats", lambda x=x: torch.ops.ash_ext.topk_stats(x, k)))
        cases.append((f"{label} topk_stats clamp", lambda x=x: torch.ops.ash_ext.topk_stats(x, k, None, -0.5, 1.0)))
    return cases


def inplace_result(x: torch.Tensor, k: int, code: int) -> torch.Tensor:
    y = x.clone()
    torch.ops.ash_ext.ash_(y, k, code)
    return y


def autograd_grad(x: torch.Tensor, variant: str, grad: torch.Tensor, force_fallback: bool = False) -> torch.Tensor:
    leaf = x.detach().requires_grad_()
    shape_with(leaf, 0.65, variant, force_fallback=force_fallback).backward(grad)
    return leaf.grad


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_threads(threads: int, rounds: int, fallback: bool) -> list[str]:
    # At least two intra-op threads, so that the long sample is split inside each Python thread.
    intra_op = torch.get_num_threads()
    torch.set_num_threads(max(2, intra_op))
    try:
        return _run_threads(threads, rounds, fallback)
    finally:
        torch.set_num_threads(intra_op)


def _run_threads(threads: int, rounds: int, fallback: bool) -> list[str]:
    cases = thread_cases(fallback)
    expected = [tuple(bits(t).clone() for t in call()) for _, call in cases]
    mismatches: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        order = list(range(len(cases)))
        shuffler = random.Random(seed)
        try:
            for _ in range(rounds):
                shuffler.shuffle(order)
                for index in order:
                    got = cases[index][1]()
                    if any(not torch.equal(bits(g), e) for g, e in zip(got, expected[index])):
                        with lock:
                            mismatches.append(f"thread {seed}: {cases[index][0]}")
        except Exception as error:  # reported, not swallowed: the run fails
            with lock:
                errors.append(f"thread {seed}: {type(error).__name__}: {error}")

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    calls = threads * rounds * len(cases)
    where = "fallback" if fallback else f"CPU kernel ({ash_ext.cpu_isa()})"
    print(f"  {where}: {threads} threads x {rounds} rounds x {len(cases)} cases = {calls:,} calls at once: "
          f"{len(mismatches)} results not bit-identical to one thread's, {len(errors)} errors", flush=True)
    return mismatches[:20] + errors[:20]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("memory", "threads", "all"))
    parser.add_argument("--calls", type=int, default=10_000, help="calls of each op (memory)")
    parser.add_argument("--margin-mib", type=float, default=2.0, help="allowed growth (memory)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not ash_ext.extension_loaded():
        print("ash_ext's compiled module is not loaded: nothing to check", file=sys.stderr)
        return 2
    failures = []
    if args.check in ("memory", "all"):
        failures += run_memory(args.calls, args.margin_mib)
    if args.check in ("threads", "all"):
        print(f"{args.threads} Python threads at once, every op, dtype and layout, against one thread")
        failures += run_threads(args.threads, args.rounds, fallback=False)
        failures += run_threads(args.threads, args.rounds, fallback=True)
    for failure in failures:
        print("FAIL", failure)
    print(f"soak: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
