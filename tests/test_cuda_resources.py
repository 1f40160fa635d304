"""The compiled CUDA kernels' resources, read from the built module with cuobjdump (no GPU needed).

For every kernel of every architecture in ash_ext._C: no stack frame and no local memory (spills),
registers within what its __launch_bounds__ allows, the launch bounds the source declares, and
static shared memory within what the launch planner leaves beside dynamic shared memory. Then the
planner (csrc/cuda/launch_plan.h, through ash_ext._C.cuda_launch_plan) is enumerated over a grid
of shapes, dtypes and the limits of an H100, an H200 and an A100, and every launch it can produce
is checked against those kernels' compiled resources and the attribute the launcher sets.

Runs wherever the CUDA kernels were compiled in (CI builds them); fails, rather than skips, when
they were but cuobjdump is not found.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import ash_ext

pytestmark = pytest.mark.skipif(not ash_ext.compiled_with_cuda(), reason="the CUDA kernels were not compiled in")

# (multiprocessors, opt-in shared memory per block in bytes, largest thread-block cluster) of the GPUs
# the planner must serve.
DEVICES = {
    "h100-sxm": (132, 232448, 16),
    "h200": (132, 232448, 16),
    "h100-pcie": (114, 232448, 16),
    "a100": (108, 166912, 0),
}
DTYPE_BYTES = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2, "double": 8}
FAMILIES = {
    "sample_per_block_kernel",
    "chunked_histogram_kernel",
    "chunked_sums_kernel",
    "chunked_output_kernel",
    "clamp_kernel",
    "nan_fill_kernel",
    "cluster_kernel",
}
MAX_THREADS = 512  # every kernel's __launch_bounds__ in csrc/cuda/ash_kernels.cuh


def min_blocks_per_sm(kernel: dict) -> int:
    """The second __launch_bounds__ argument (ash_kernels.cuh): two blocks for the forward chunked
    and on-chip kernels (and the chunked histogram kernel), one for the others and for the
    chunked output of 16-bit types; two for the clamp pass of regimes 2 and 3 and the chunked
    pipeline's NaN fill of samples with an invalid k."""
    if kernel["family"] in ("clamp_kernel", "nan_fill_kernel"):
        return 2
    if kernel["family"] == "cluster_kernel":
        return 1
    if kernel["family"] == "sample_per_block_kernel":
        return 2 if kernel["staged"] and not kernel["backward"] else 1
    if kernel["family"] == "chunked_output_kernel" and DTYPE_BYTES[kernel["dtype"]] == 2:
        return 1
    return 1 if kernel["backward"] else 2


REGISTERS_PER_SM = 65536
DEFAULT_DYNAMIC_LIMIT = 48 * 1024


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    # torch's triton package ships one.
    candidates += glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "triton", "backends",
                                         "nvidia", "bin", "cuobjdump"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("the CUDA kernels are compiled in but no cuobjdump was found (CUDA_HOME/bin, PATH, triton)")


def demangle(names: list) -> dict:
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines()))


@functools.lru_cache(maxsize=1)
def kernels() -> list:
    """One dict per compiled kernel and architecture: name, family, dtype, staged, registers, ..."""
    from ash_ext import _C

    tool = find_cuobjdump()
    usage = subprocess.run([tool, "--dump-resource-usage", _C.__file__], capture_output=True, text=True, check=True)
    elf = subprocess.run([tool, "-elf", _C.__file__], capture_output=True, text=True, check=True)
    found = []
    arch = None
    for line in usage.stdout.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            found.append({"mangled": match.group(1), "arch": arch})
        elif found and "REG:" in line and "resources" not in found[-1]:
            found[-1]["resources"] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    # Launch bounds and register caps, per kernel, from the .nv.info.<kernel> sections.
    info: dict = {}
    section = None
    attribute = None
    for line in elf.stdout.splitlines():
        if line.startswith(".nv.info._Z"):
            section = line[len(".nv.info."):].strip()
            info.setdefault(section, {})
        elif section and line.strip().startswith("Attribute:"):
            attribute = line.split(":", 1)[1].strip()
        elif section and attribute and line.strip().startswith("Value:"):
            values = line.split(":", 1)[1].split()
            if attribute in ("EIATTR_MAX_THREADS", "EIATTR_MAXREG_COUNT"):
                info[section][attribute] = int(values[0], 16)
            attribute = None
    names = demangle([k["mangled"] for k in found])
    for kernel in found:
        readable = names[kernel["mangled"]]
        match = re.search(r"cuda_detail::(\w+)<([^>]*)>", readable)
        assert match, readable
        arguments = [a.strip() for a in match.group(2).split(",")]
        kernel.update(
            readable=readable,
            family=match.group(1),
            dtype=arguments[0],
            staged=match.group(1) == "sample_per_block_kernel" and arguments[-1] == "true",
            backward=len(arguments) >= 3 and arguments[2] == "true",
            max_threads=info.get(kernel["mangled"], {}).get("EIATTR_MAX_THREADS"),
            max_registers=info.get(kernel["mangled"], {}).get("EIATTR_MAXREG_COUNT"),
        )
    return found


def test_every_kernel_was_found():
    found = kernels()
    families = {k["family"] for k in found}
    assert families == FAMILIES, families
    # Per dtype: sample_per_block for 4 variants (ASH-P, ASH-B, ASH-S, SCALE) x forward/backward
    # x staged or not (16; topk_stats runs ASH-S's forward kernels, and the on-chip kernels clamp
    # while staging, both under runtime flags); the histogram kernel's value and tie versions
    # (2); sums where the variant needs them (forward and backward ASH-B, ASH-S, SCALE: 6);
    # output for 4 variants x forward/backward (8); the clamp pass of regimes 2 and 3 (1); the
    # chunked pipeline's NaN fill of samples whose per-sample k is invalid (1); the cluster kernel
    # for 4 variants x forward/backward (8).
    per_arch = {}
    for k in found:
        per_arch.setdefault(k["arch"], []).append(k)
    for arch, listed in per_arch.items():
        assert len(listed) == 4 * (16 + 2 + 6 + 8 + 1 + 1 + 8), (arch, len(listed))


def test_no_kernel_spills_or_keeps_a_stack_frame():
    offenders = [
        f"{k['arch']} {k['readable'][:140]}: stack {k['resources']['STACK']} B, local {k['resources']['LOCAL']} B"
        for k in kernels()
        if k["resources"]["STACK"] != 0 or k["resources"]["LOCAL"] != 0
    ]
    assert not offenders, "\n".join(offenders)


def test_launch_bounds_and_registers():
    for k in kernels():
        assert k["max_threads"] == MAX_THREADS, (k["readable"], k["max_threads"])
        # The register file must hold min_blocks blocks of max_threads threads (8-register steps).
        allowed = min(255, REGISTERS_PER_SM // (MAX_THREADS * min_blocks_per_sm(k)) // 8 * 8)
        assert k["resources"]["REG"] <= allowed, (k["readable"], k["resources"]["REG"], allowed)


def static_shared(kernel: dict) -> int:
    # cuobjdump's SHARED includes the 1 KiB the driver reserves per block on sm_80 and later,
    # which the opt-in limit already excludes: counting it keeps the checks below conservative.
    return kernel["resources"]["SHARED"]


def test_static_shared_memory_within_the_planners_allowance():
    plan = ash_ext._C.cuda_launch_plan(1, 1, 4, 1, 232448)
    allowance = plan["static_shared_allowance"]
    for k in kernels():
        uses_dynamic = k["family"] in ("sample_per_block_kernel", "cluster_kernel")
        limit = allowance if uses_dynamic else DEFAULT_DYNAMIC_LIMIT
        assert static_shared(k) <= limit, (k["readable"], static_shared(k), limit)


HISTOGRAM_BYTES = 2048 * 4  # the kernels' 11-bit histogram, in dynamic shared memory


def sample_sizes(element: int, optin: int) -> list:
    # The longest on-chip sample: histogram + 16-byte packs within the launcher's dynamic limit.
    dynamic_limit = ash_ext._C.cuda_launch_plan(1, 1, element, 1, optin)["dynamic_shared_limit"]
    on_chip = (dynamic_limit - HISTOGRAM_BYTES) // 16 * 16 // element
    window = [(DEFAULT_DYNAMIC_LIMIT - HISTOGRAM_BYTES - s) // element for s in (0, 64, 288, 544, 1024)]
    sizes = {1, 2, 3, 31, 37, 1024, 1025, 2048, 4096, 4097, 100352, 1 << 20, on_chip - 1, on_chip, on_chip + 1}
    return sorted(sizes | set(window))


def cluster_sizes(element: int, optin: int) -> list:
    """Samples around each cluster size's capacity (the largest a cluster of c blocks holds)."""
    dynamic_limit = ash_ext._C.cuda_launch_plan(1, 1, element, 1, optin)["dynamic_shared_limit"]
    per_block = (dynamic_limit - HISTOGRAM_BYTES) // 16 * 16 // element
    return sorted({c * per_block + d for c in (2, 3, 8, 9, 16) for d in (-1, 0, 1)} | {17 * per_block})


def test_every_plan_fits_the_compiled_kernels():
    """Every launch the planner can produce fits the kernels' limits with the attribute set."""
    by_family = {}
    for k in kernels():
        by_family.setdefault((k["family"], k["dtype"], k["staged"]), []).append(k)
    checked = 0
    for device, (sms, optin, clusters) in DEVICES.items():
        for dtype, element in DTYPE_BYTES.items():
            for n in sample_sizes(element, optin) + cluster_sizes(element, optin):
                for batch in (1, 2, 8, 64, 2 * sms - 1, 2 * sms, 1024):
                    plan = ash_ext._C.cuda_launch_plan(batch, n, element, sms, optin, clusters)
                    limit = plan["dynamic_shared_limit"]
                    if plan["regime"] == "cluster":
                        launched = by_family[("cluster_kernel", dtype, False)]
                        assert 1 <= plan["cluster_blocks"] <= clusters and plan["grid"] % plan["cluster_blocks"] == 0
                        assert plan["chunk_len"] * (plan["cluster_blocks"] - 1) < n <= plan["chunk_len"] * plan[
                            "cluster_blocks"], plan
                    elif plan["regime"] == "chunked":
                        launched = [
                            k
                            for (family, kernel_dtype, _), listed in by_family.items()
                            if kernel_dtype == dtype and family != "sample_per_block_kernel"
                            for k in listed
                        ]
                    else:
                        launched = by_family[("sample_per_block_kernel", dtype, plan["regime"] == "on-chip")]
                        if plan["regime"] != "on-chip":  # a clamped op clamps in a pass of its own first
                            launched = launched + by_family[("clamp_kernel", dtype, False)]
                    assert launched
                    where = f"{device} {dtype} batch {batch} n {n}: {plan}"
                    assert plan["dynamic_shared"] <= limit, where
                    for k in launched:
                        assert plan["threads"] <= k["max_threads"], where
                        assert plan["threads"] % 32 == 0, where
                        assert static_shared(k) + plan["dynamic_shared"] <= optin, (where, k["readable"])
                        if plan["dynamic_shared"] > 0:
                            # cudaFuncSetAttribute(limit) succeeds only if static + limit fits.
                            assert static_shared(k) + limit <= optin, (where, k["readable"])
                    if plan["regime"] == "chunked":
                        assert plan["chunks"] * batch <= 2**31 - 1, where
                    checked += 1
    assert checked > 1000


def test_planner_uses_the_opt_in_limit():
    """The review's finding 6: WideResNet's [B, 640, 8, 8] float32 maps (160 KiB) go on chip on
    an H100, and the old 48 KiB window shapes are on-chip launches (which need the attribute)."""
    sms, optin, _ = DEVICES["h100-sxm"]
    assert ash_ext._C.cuda_launch_plan(128, 640 * 64, 4, sms, optin)["regime"] == "on-chip"
    assert ash_ext._C.cuda_launch_plan(2, 640 * 64, 4, sms, optin)["regime"] == "on-chip"
    window = ash_ext._C.cuda_launch_plan(4, 10200, 4, sms, optin)
    assert window["regime"] == "on-chip" and 48 * 1024 - 544 < window["dynamic_shared"] <= 48 * 1024
    # An A100 has less: 160 KiB + the histogram does not fit in 163 KiB.
    sms, optin, _ = DEVICES["a100"]
    assert ash_ext._C.cuda_launch_plan(2, 640 * 64, 4, sms, optin)["regime"] == "chunked"
    with pytest.raises(ValueError, match="positive"):
        ash_ext._C.cuda_launch_plan(0, 10, 4, sms, optin)
