"""``python -m ash_ext plan``: the CUDA backend's launch plan for a shape, without a GPU.

The plan comes from the launcher's own host code (csrc/cuda/launch_plan.h, through
``ash_ext._C.cuda_launch_plan``): the regime, the grid, cluster and block sizes, shared memory per
block, the number of launches and the global-memory bytes read and written, also as a ratio to
the least any implementation must move (one read of each input and one write of the output).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._semantics import VARIANT_CODES, check_variant

REGIME_CHOICES = ("auto", "cluster", "sample-per-block", "chunked")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Gpu:
    """What the planner needs of a GPU, and its memory bandwidth for the time a copy takes."""

    name: str
    sm_count: int
    shared_optin: int  # the opt-in shared memory per block, bytes
    max_cluster_blocks: int  # 0 before sm_90
    bandwidth: float | None  # HBM bytes per second, from the data sheet


# Data-sheet figures: SXM parts; 227 KiB / 163 KiB opt-in shared memory per block.
GPUS = {
    "h100": Gpu("H100 SXM", 132, 232448, 16, 3.35e12),
    "h200": Gpu("H200 SXM", 132, 232448, 16, 4.8e12),
    "a100": Gpu("A100 SXM", 108, 166912, 0, 2.04e12),
}


def current_gpu() -> Gpu:
    """The current CUDA device, as the launcher sees it."""
    if not torch.cuda.is_available():
        raise ValueError("--gpu current: no CUDA device is available; name one of " + ", ".join(GPUS))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Gpu(props.name, props.multi_processor_count, props.shared_memory_per_block_optin,
               16 if props.major >= 9 else 0, None)


def make_plan(shape: Sequence[int], dtype: str, gpu: Gpu, variant: str = "ash-s", backward: bool = False,
              clamped: bool = False, per_sample_k: bool = False, regime: str = "auto") -> dict:
    """The plan for ``shape`` (batch first) as a dict: the launcher's plan and what it costs."""
    from . import _C

    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"--shape {','.join(map(str, shape))}: a batch and at least one sample dimension, all >= 1")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_BYTES)}")
    try:
        variant = check_variant(variant)  # the one spelling rule; the error lists the valid names
    except ValueError as error:
        raise ValueError(f"--variant: {error}") from None
    batch, n, element = shape[0], math.prod(shape[1:]), DTYPE_BYTES[dtype]
    plan = _C.cuda_launch_plan(batch, n, element, gpu.sm_count, gpu.shared_optin, gpu.max_cluster_blocks, regime,
                               VARIANT_CODES[variant], backward, clamped, per_sample_k, False)
    tensor_bytes = batch * n * element
    minimum = tensor_bytes * ((2 if backward else 1) + 1)  # each input read once, the output written once
    plan.update(
        shape=list(shape), dtype=dtype, variant=variant, backward=backward, clamped=clamped,
        per_sample_k=per_sample_k, requested_regime=regime, gpu=gpu.name, sm_count=gpu.sm_count,
        shared_optin=gpu.shared_optin, max_cluster_blocks=gpu.max_cluster_blocks, tensor_bytes=tensor_bytes,
        minimum_bytes=minimum,
        traffic_ratio=(plan["bytes_read"] + plan["bytes_written"]) / minimum,
        traffic_ratio_tied=(plan["bytes_read_tied"] + plan["bytes_written_tied"]) / minimum,
        traffic_ratio_with_small=(plan["bytes_read_tied"] + plan["bytes_written_tied"] + plan["small_bytes"]) / minimum,
    )
    if gpu.bandwidth:
        plan["copy_us"] = 2 * tensor_bytes / gpu.bandwidth * 1e6
    return plan


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.2f} MB"


def describe(plan: dict) -> str:
    """The plan as text for people."""
    shape = "[" + ", ".join(map(str, plan["shape"])) + "]"
    batch = plan["shape"][0]
    n = math.prod(plan["shape"][1:])
    direction = "backward" if plan["backward"] else "forward"
    lines = [
        f"ash_ext plan: {plan['variant']} {direction}{' clamped' if plan['clamped'] else ''}"
        f"{' per-sample k' if plan['per_sample_k'] else ''}, {shape} {plan['dtype']} "
        f"({batch} samples of {n:,}, {_megabytes(plan['tensor_bytes'])})",
        f"GPU: {plan['gpu']}: {plan['sm_count']} SMs, {plan['shared_optin'] // 1024} KiB shared memory per block, "
        + (f"clusters of up to {plan['max_cluster_blocks']} blocks" if plan["max_cluster_blocks"] else "no clusters"),
        f"regime: {plan['regime']}"
        + (f" (asked: {plan['requested_regime']})" if plan["requested_regime"] != "auto" else ""),
    ]
    if plan["regime"] == "cluster":
        lines.append(f"grid: {plan['grid']:,} blocks in clusters of {plan['cluster_blocks']} (one sample each), "
                     f"{plan['threads']} threads a block; each block stages {plan['chunk_len']:,} elements")
    elif plan["regime"] == "chunked":
        lines.append(f"grid: {plan['grid']:,} blocks ({plan['chunks']} chunks of {plan['chunk_len']:,} elements "
                     f"per sample), {plan['threads']} threads a block")
    else:
        lines.append(f"grid: {plan['grid']:,} blocks (one sample each), {plan['threads']} threads a block")
    lines.append(f"shared memory: {plan['dynamic_shared']:,} bytes of dynamic shared memory per block")
    lines.append(f"launches: {plan['launches']}")
    lines.append(
        f"global traffic: {_megabytes(plan['bytes_read'])} read + {_megabytes(plan['bytes_written'])} written = "
        f"{plan['traffic_ratio']:.3f} x (each input read once + the output written once)"
    )
    if plan["bytes_read_tied"] != plan["bytes_read"] or plan["bytes_written_tied"] != plan["bytes_written"]:
        lines.append(f"  where every sample's threshold is tied: {_megabytes(plan['bytes_read_tied'])} read = "
                     f"{plan['traffic_ratio_tied']:.3f} x")
    lines.append(f"  besides: at most {plan['small_bytes']:,} bytes of per-sample ks, state and partial sums "
                 f"({plan['traffic_ratio_with_small']:.3f} x with them, ties everywhere)")
    if "copy_us" in plan:
        lines.append(f"  (x.clone() at the data sheet's bandwidth: {plan['copy_us']:.1f} us)")
    return "\n".join(lines)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, help="comma-separated, batch first, e.g. 64,2048,7,7")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPE_BYTES))
    parser.add_argument("--gpu", default="h100", help=f"{', '.join(GPUS)} or current (the CUDA device here)")
    parser.add_argument("--variant", default="ash-s", help=f"one of {', '.join(VARIANT_CODES)}")
    parser.add_argument("--backward", action="store_true", help="the backward pass")
    parser.add_argument("--clamp", action="store_true", help="with a clamp (ReAct+ASH)")
    parser.add_argument("--per-sample-k", action="store_true", help="with a k per sample")
    parser.add_argument("--regime", default="auto", choices=REGIME_CHOICES,
                        help="a regime to force, as ASH_EXT_CUDA_REGIME does")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "ash-ext plan") -> int:
    """Prints the plan; returns the exit status (2 for bad arguments)."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        shape = [int(d) for d in args.shape.replace(" ", "").split(",") if d]
    except ValueError:
        parser.error(f"--shape {args.shape}: expected comma-separated integers")
    try:
        gpu = current_gpu() if args.gpu == "current" else GPUS.get(args.gpu.lower())
        if gpu is None:
            raise ValueError(f"--gpu {args.gpu}: expected one of {', '.join(GPUS)} or current")
        plan = make_plan(shape, args.dtype, gpu, args.variant, args.backward, args.clamp, args.per_sample_k,
                         args.regime)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(plan, indent=2) if args.json else describe(plan))
    return 0
