"""The CUDA launch planner (csrc/cuda/launch_plan.h) through ash_ext._C.cuda_launch_plan and the
``plan`` command: the issue's targets for the cluster regime, the geometry of every cluster plan,
forced regimes, and the command line. Host code only: runs without a GPU or the CUDA kernels."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ash_ext
from ash_ext import plan as plan_module

pytestmark = pytest.mark.skipif(not ash_ext.extension_loaded(), reason="needs the compiled extension")

TARGETS = [
    ((64, 2048, 7, 7), "float32"),
    ((256, 2048, 7, 7), "float32"),
    ((8, 2048, 7, 7), "float32"),
    ((32, 1024, 14, 14), "float32"),
    ((64, 2048, 7, 7), "bfloat16"),
]


@pytest.mark.parametrize("gpu", ["h100", "h200"])
@pytest.mark.parametrize(("shape", "dtype"), TARGETS)
@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s", "scale"])
def test_hopper_targets_are_one_launch_at_one_read_and_one_write(gpu, shape, dtype, variant):
    plan = plan_module.make_plan(shape, dtype, plan_module.GPUS[gpu], variant)
    assert plan["regime"] == "cluster", plan
    assert plan["launches"] == 1
    assert plan["traffic_ratio_with_small"] <= 1.02, plan
    assert plan["bytes_read"] == plan["bytes_written"] == plan["tensor_bytes"]
    # Small batches spread over more blocks per sample than large ones.
    assert plan["grid"] >= min(64, shape[0] * 2)


def test_small_batches_spread_over_the_gpu():
    h100 = plan_module.GPUS["h100"]
    eight = plan_module.make_plan((8, 2048, 7, 7), "float32", h100)
    big = plan_module.make_plan((64, 2048, 7, 7), "float32", h100)
    assert eight["cluster_blocks"] == 8 and eight["grid"] == 64
    assert big["cluster_blocks"] == 2 and big["grid"] == 128


def test_a100_keeps_the_regimes_before_clusters():
    a100 = plan_module.GPUS["a100"]
    headline = plan_module.make_plan((64, 2048, 7, 7), "float32", a100)
    assert headline["regime"] == "chunked" and headline["launches"] > 1
    assert headline["traffic_ratio"] > 2
    with pytest.raises(ValueError, match="ASH_EXT_CUDA_REGIME=cluster: this GPU has no thread-block clusters") as info:
        plan_module.make_plan((64, 2048, 7, 7), "float32", a100, regime="cluster")
    assert "frame #" not in str(info.value)  # the message, not a C++ backtrace


def test_forced_regimes_and_their_traffic():
    h100 = plan_module.GPUS["h100"]
    shape = (64, 2048, 7, 7)
    chunked = plan_module.make_plan(shape, "float32", h100, "ash-s", regime="chunked")
    per_block = plan_module.make_plan(shape, "float32", h100, "ash-s", regime="sample-per-block")
    assert chunked["regime"] == "chunked" and per_block["regime"] == "block-per-sample"
    tensor = chunked["tensor_bytes"]
    # Chunked ASH-S: 3 value passes + sums + output read the tensor, 2 tie passes more when tied;
    # zero fill + 3 + 2 digit kernels + sums + output launches.
    assert chunked["bytes_read"] == 5 * tensor and chunked["bytes_read_tied"] == 7 * tensor
    assert chunked["bytes_written"] == tensor and chunked["launches"] == 8
    assert per_block["bytes_read"] == 5 * tensor and per_block["launches"] == 1
    # A forced cluster on a sample that fits one block: a cluster of one.
    small = plan_module.make_plan((512, 1000), "float32", h100, regime="cluster")
    assert small["regime"] == "cluster" and small["cluster_blocks"] == 1
    with pytest.raises(ValueError, match="does not fit the shared memory of a cluster of 16 blocks"):
        plan_module.make_plan((1, 10**7), "float32", h100, regime="cluster")
    with pytest.raises(ValueError, match="ASH_EXT_CUDA_REGIME=bogus: expected auto, cluster"):
        ash_ext._C.cuda_launch_plan(1, 10, 4, 132, 232448, 16, "bogus")


def test_backward_and_clamped_traffic():
    h100 = plan_module.GPUS["h100"]
    backward = plan_module.make_plan((64, 2048, 7, 7), "float32", h100, "ash-s", backward=True)
    # x once into shared memory, the gradient in the sums pass and the output pass.
    assert backward["regime"] == "cluster" and backward["bytes_read"] == 3 * backward["tensor_bytes"]
    assert backward["minimum_bytes"] == 3 * backward["tensor_bytes"]
    clamped = plan_module.make_plan((64, 2048, 7, 7), "float32", plan_module.GPUS["a100"], "ash-s", clamped=True)
    plain = plan_module.make_plan((64, 2048, 7, 7), "float32", plan_module.GPUS["a100"], "ash-s")
    assert clamped["launches"] == plain["launches"] + 1
    assert clamped["bytes_read"] == plain["bytes_read"] + plain["tensor_bytes"]


DEVICES = st.sampled_from([(132, 232448, 16), (114, 232448, 16), (108, 166912, 0), (8, 65536, 8), (2, 65536, 16)])


@settings(max_examples=300, deadline=None)
@given(batch=st.integers(1, 5000), n=st.integers(1, 3_000_000), element=st.sampled_from([2, 4, 8]), device=DEVICES)
def test_every_cluster_plan_covers_its_sample(batch, n, element, device):
    sms, optin, clusters = device
    plan = ash_ext._C.cuda_launch_plan(batch, n, element, sms, optin, clusters)
    assert plan["dynamic_shared"] <= plan["dynamic_shared_limit"]
    if plan["regime"] != "cluster":
        return
    blocks, slice_len = plan["cluster_blocks"], plan["chunk_len"]
    assert 2 <= blocks <= min(clusters, 16) and plan["grid"] == batch * blocks
    assert slice_len * (blocks - 1) < n <= slice_len * blocks  # no block without elements
    assert slice_len * element % 16 == 0  # slices start on 16-byte packs
    assert plan["dynamic_shared"] == 2048 * 4 + slice_len * element
    assert plan["bytes_read"] == plan["bytes_written"] == batch * n * element and plan["launches"] == 1
    assert blocks <= 8 or math.ceil(n * element / (plan["dynamic_shared_limit"] - 8192)) > 8


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ash_ext", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_plan_command_prints_the_headline_plan():
    result = run_plan("--shape", "64,2048,7,7", "--dtype", "float32", "--gpu", "h100")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "regime: cluster" in out and "launches: 1" in out
    assert "128 blocks in clusters of 2" in out and "1.000 x" in out


def test_plan_command_json_and_errors():
    result = run_plan("--shape", "8,2048,7,7", "--gpu", "h200", "--json", "--variant", "ASH_B")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["regime"] == "cluster" and data["cluster_blocks"] == 8 and data["variant"] == "ash-b"
    bad = run_plan("--shape", "64,x", "--gpu", "h100")
    assert bad.returncode == 2 and "--shape 64,x" in bad.stderr
    bad = run_plan("--shape", "64,2048", "--gpu", "v100")
    assert bad.returncode == 2 and "--gpu v100: expected one of h100, h200, a100 or current" in bad.stderr
    bad = run_plan("--shape", "64,2048", "--variant", "ash-q")
    assert bad.returncode == 2 and "--variant: variant must be one of ash-p, ash-b, ash-s, scale" in bad.stderr
    assert "'ash-q'" in bad.stderr
    if not torch.cuda.is_available():
        bad = run_plan("--shape", "64,2048", "--gpu", "current")
        assert bad.returncode == 2 and "no CUDA device is available" in bad.stderr
