"""Shows that each of the emulator's checks catches the bug it is there for.

For every planted bug below, copies the kernels and the emulator to a scratch tree, plants the
bug (one textual change, which must match exactly once), builds the emulation (float32 kernels
only, to keep builds short) and runs a set of cases with the check that should catch it. The bug
counts as caught when the run fails with the expected signature. A clean run of each check mode
comes first: it must pass, or a "caught" bug would mean nothing.

    python tests/emulation/planted_bugs.py [--only NAME ...] [--build-dir DIR]

Exit status 0 when every clean run passed and every planted bug was caught. About 2 minutes a
build on two cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@dataclass(frozen=True)
class PlantedBug:
    name: str
    check: str  # which check of the emulator should catch it
    sanitize: str  # none, address or thread
    cases: str  # run_emulation.py --cases
    path: str  # file to change, relative to the repository root
    edits: tuple  # (old, new) pairs; each old text must occur exactly once
    signature: str  # regular expression the failing run must print


BUGS = (
    PlantedBug(
        "missing __syncthreads",
        "ThreadSanitizer (barriers are the only happens-before inside a block)",
        "thread",
        "sanitize",
        "csrc/cuda/block_ops.cuh",
        (
            (
                "  __syncthreads();  // an earlier call may still be reading warp_totals\n  if (lane == 0) {",
                "  if (lane == 0) {",
            ),
        ),
        r"ThreadSanitizer: data race",
    ),
    PlantedBug(
        "plain += instead of atomicAdd",
        "ThreadSanitizer (blocks of a grid share no happens-before)",
        "thread",
        "sanitize",
        "csrc/cuda/ash_kernels.cuh",
        (
            (
                "      atomicAdd(&state->hist[d], static_cast<unsigned long long>(count));",
                "      state->hist[d] += static_cast<unsigned long long>(count);",
            ),
        ),
        r"ThreadSanitizer: data race",
    ),
    PlantedBug(
        "missing fences at the last-block handshake",
        "ThreadSanitizer (a fence is the only happens-before between blocks)",
        "thread",
        "sanitize",
        "csrc/cuda/ash_kernels.cuh",
        (
            ("    __threadfence();  // release: the block's global writes and atomics before the arrival\n", ""),
            ("      __threadfence();  // acquire: the other blocks' writes before the reads that follow\n", ""),
        ),
        r"ThreadSanitizer: data race",
    ),
    PlantedBug(
        "uninitialised static shared histogram",
        "static shared memory poisoned per block",
        "none",
        "smoke",
        "csrc/cuda/ash_kernels.cuh",
        (
            (
                "  for (int d = static_cast<int>(threadIdx.x); d < digit.bins(); d += static_cast<int>(blockDim.x)) {\n"
                "    hist[d] = 0u;\n  }\n  __syncthreads();\n  const int64_t begin = chunk * chunk_len;",
                "  __syncthreads();\n  const int64_t begin = chunk * chunk_len;",
            ),
        ),
        r"FAIL |CUDA emulation:",
    ),
    PlantedBug(
        "partial sum written after the arrival",
        "blocks of a grid run interleaved",
        "none",
        "smoke",
        "csrc/cuda/ash_kernels.cuh",
        (
            (
                "  if (threadIdx.x == 0) {\n    partials[blockIdx.x] = sums;\n  }\n"
                "  if (!arrive_last(&state->arrivals, chunks)) {\n    return;\n  }\n",
                "  const bool last = arrive_last(&state->arrivals, chunks);\n"
                "  if (threadIdx.x == 0) {\n    partials[blockIdx.x] = sums;\n  }\n"
                "  if (!last) {\n    return;\n  }\n",
            ),
        ),
        r"FAIL ",
    ),
    PlantedBug(
        "off-by-one read past a sample",
        "AddressSanitizer",
        "address",
        "sanitize",
        "csrc/cuda/radix_select.cuh",
        (("    for (int64_t i = tail; i < end; ++i) {\n      const unsigned digit = digit_of(i,",
          "    for (int64_t i = tail; i <= end; ++i) {\n      const unsigned digit = digit_of(i,"),),
        r"AddressSanitizer: heap-buffer-overflow",
    ),
    PlantedBug(
        "attribute set only above 48 KiB (review finding 1)",
        "launch rules: dynamic shared memory vs 48 KiB minus static",
        "none",
        "smoke",
        "csrc/cuda/kernel_setup.h",
        (("      kernel, device, shared_bytes > 0, dynamic_limit, large_clusters",
          "      kernel, device, shared_bytes > 48 * 1024, dynamic_limit, large_clusters"),),
        r"fails with cudaErrorInvalidValue: \d+ bytes of dynamic shared memory over the kernel's limit",
    ),
    PlantedBug(
        "attribute set to each launch's size (review finding 2)",
        "launch rules: a kernel's limit is never lowered",
        "none",
        "smoke",
        "csrc/cuda/kernel_setup.h",
        (
            ("    if (uses_dynamic_shared && !entry.dynamic_limit_set) {", "    if (uses_dynamic_shared) {"),
            ("      kernel, device, shared_bytes > 0, dynamic_limit, large_clusters",
             "      kernel, device, shared_bytes > 0, shared_bytes, large_clusters"),
        ),
        r"lowers the dynamic shared-memory limit",
    ),
    # The shaping family (per-sample k, clamp, SCALE): caught by the comparisons with
    # spec_reference.py in the family cases.
    PlantedBug(
        "chunked pipeline selects every sample with the first sample's k",
        "per-sample ks differing within one launch (family cases, chunked regime)",
        "none",
        "smoke",
        "csrc/cuda/ash_kernels.cuh",
        (("  const int64_t k = ks.of(sample);\n  if (k == 0 || invalid_k(k, n)) {",
          "  const int64_t k = ks.of(0);\n  if (k == 0 || invalid_k(k, n)) {"),),
        r"FAIL family .* chunked",
    ),
    PlantedBug(
        "clamp pass only for the chunked regime",
        "clamped cases in every regime, and op(x, clamp) == op(x.clamp()) bit for bit",
        "none",
        "smoke",
        "csrc/cuda/launch_sequence.cuh",
        (("  if (clamp.enabled && !stages) {",
          "  if (clamp.enabled && plan.regime == Regime::kChunked) {"),),
        r"FAIL family .* block-per-sample .* clamp",
    ),
    PlantedBug(
        "SCALE backward sums G over the kept elements only",
        "SCALE's backward against the spec's formula",
        "none",
        "smoke",
        "csrc/cuda/ash_kernels.cuh",
        (("        sums.grad += static_cast<acc_t>(g) * x_acc;  // G over every element: each one is scaled",
          "        if (selection.kept(offset, x)) sums.grad += static_cast<acc_t>(g) * x_acc;"),),
        r"FAIL family .* scale backward",
    ),
    # The cluster regime: the emulator's model of clusters and its traffic count.
    PlantedBug(
        "missing cluster barrier before the block totals are read",
        "ThreadSanitizer (cluster barriers are the only happens-before between a cluster's blocks)",
        "thread",
        "sanitize",
        "csrc/cuda/cluster_kernel.cuh",
        (("    cluster_sync();  // every block's totals are written\n", ""),),
        r"ThreadSanitizer: data race",
    ),
    PlantedBug(
        "histograms combined before the other blocks have counted",
        "another block's shared memory poisoned until written; cluster cases against the spec",
        "none",
        "smoke",
        "csrc/cuda/cluster_ops.cuh",
        (("  __device__ __forceinline__ void counted() const { cluster_sync(); }",
          "  __device__ __forceinline__ void counted() const { __syncthreads(); }"),),
        r"FAIL .*cluster|CUDA emulation:",
    ),
    PlantedBug(
        "a block exits while the others still read its totals",
        "the cluster exit rule (a cluster barrier between the last remote read and the exit)",
        "none",
        "smoke",
        "csrc/cuda/cluster_kernel.cuh",
        (("    cluster_sync();  // no block leaves (or its totals go) before every block has read them\n", ""),),
        r"exits while another block of its cluster may still read|of a block of the cluster that has exited",
    ),
    PlantedBug(
        "cluster output pass reads the sample from global memory again",
        "traffic counted against the plan (the values stay right)",
        "none",
        "smoke",
        "csrc/cuda/cluster_kernel.cuh",
        (("  const scalar_t* slice = staged;", "  const scalar_t* slice = x + sample * n + begin;"),),
        r"FAIL .*cluster.* traffic: counted",
    ),
    PlantedBug(
        "planned traffic forgets the tie phase",
        "traffic counted against the plan, on tied inputs",
        "none",
        "smoke",
        "csrc/cuda/launch_plan.h",
        (("(samples.selecting * value_digit_passes(element_bytes) + samples.tied * tie_digit_passes(n))",
          "(samples.selecting * value_digit_passes(element_bytes))"),),
        r"FAIL .*integers.* traffic: counted",
    ),
)


def scratch_tree(base: str) -> str:
    """A copy of what the emulation build reads: csrc/, tests/emulation/ and tools/sanitizers.py."""
    tree = tempfile.mkdtemp(prefix="ash_planted_", dir=base)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
    shutil.copytree(HERE, os.path.join(tree, "tests", "emulation"), ignore=shutil.ignore_patterns("__pycache__"))
    os.makedirs(os.path.join(tree, "tools"))
    shutil.copy2(os.path.join(ROOT, "tools", "sanitizers.py"), os.path.join(tree, "tools", "sanitizers.py"))
    return tree


def plant(tree: str, bug: PlantedBug) -> None:
    path = os.path.join(tree, bug.path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for old, new in bug.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"planted bug {bug.name!r}: the text to change occurs {count} times in {bug.path}")
        text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run(tree: str, build_dir: str, sanitize: str, cases: str) -> tuple:
    command = [
        sys.executable, os.path.join(tree, "tests", "emulation", "run_emulation.py"), "--dtypes", "float32",
        "--cases", cases, "--sanitize", sanitize, "--source-root", tree, "--build-dir", build_dir,
    ]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    return result.returncode, result.stdout + result.stderr, time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="names (substrings) of the bugs to plant")
    parser.add_argument("--build-dir", default=os.path.join(tempfile.gettempdir(), "ash_ext_planted"))
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or any(o in b.name for o in args.only)]
    os.makedirs(args.build_dir, exist_ok=True)
    ok = True
    for sanitize, cases in sorted({(b.sanitize, b.cases) for b in bugs}):
        tree = scratch_tree(args.build_dir)
        rc, output, took = run(tree, os.path.join(tree, "build"), sanitize, cases)
        passed = rc == 0
        ok &= passed
        print(f"clean run  sanitize={sanitize:8} cases={cases:8} {'passed' if passed else 'FAILED'} ({took:.0f}s)")
        if not passed:
            print(output[-4000:])
        shutil.rmtree(tree, ignore_errors=True)
    for bug in bugs:
        tree = scratch_tree(args.build_dir)
        plant(tree, bug)
        rc, output, took = run(tree, os.path.join(tree, "build"), bug.sanitize, bug.cases)
        match = re.search(bug.signature, output)
        caught = rc != 0 and match is not None
        ok &= caught
        line = next((ln for ln in output.splitlines() if re.search(bug.signature, ln)), "")
        print(f"{'caught' if caught else 'MISSED'}  {bug.name}  [{bug.check}] ({took:.0f}s)")
        print(f"         {line.strip()[:200]}")
        if not caught:
            print(output[-4000:])
        shutil.rmtree(tree, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
