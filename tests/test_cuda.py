"""The CUDA kernels against the pure-PyTorch fallback and the CPU kernel (needs a GPU).

Covers each regime of csrc/cuda/ash_kernels.cuh and the shapes around its boundaries (the
on-chip limit, from the device's opt-in shared memory per block; the window below 48 KiB of
dynamic shared memory where launches once failed; batch 2 x SMs where long samples switch from
the chunked pipeline to one block per sample), every dtype, ties, NaN/inf, channels_last, in place,
gradients, CUDA graphs, streams, devices, torch.compile, and run-to-run bit identity.
ASH-P must match exactly; ASH-B and ASH-S up to the rounding of differently ordered sums.
"""

from __future__ import annotations

import pytest
import torch

import ash_ext
from ash_ext import fallback

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# csrc/cuda/launch_plan.h: a sample goes on chip when histogram + staged sample fit the dynamic
# shared-memory limit the launcher sets (the planner reports it).
HISTOGRAM_BYTES = 2048 * 4
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NAMES = ("ash_p", "ash_b", "ash_s")
TOLERANCE = {
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def shared_optin() -> int:
    if not torch.cuda.is_available():
        return 232448  # an H100's, for building the parameter lists without a GPU
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def on_chip_limit(dtype: torch.dtype) -> int:
    """The largest sample (elements) that the on-chip regime takes on this device."""
    dynamic_limit = plan((1, 1), dtype)["dynamic_shared_limit"]
    return (dynamic_limit - HISTOGRAM_BYTES) // 16 * 16 // element_size(dtype)


def window_n(dtype: torch.dtype) -> int:
    """A sample whose on-chip launch needs just under 48 KiB of dynamic shared memory: more than
    the default limit of 48 KiB minus the kernel's static shared memory."""
    return (48 * 1024 - HISTOGRAM_BYTES - 64) // element_size(dtype)


def plan(shape, dtype) -> dict:
    sms = sm_count() if torch.cuda.is_available() else 132
    n = 1
    for size in shape[1:]:
        n *= size
    return ash_ext._C.cuda_launch_plan(shape[0], n, element_size(dtype), sms, shared_optin())


def make(kind: str, shape, dtype=torch.float32, seed: int = 0, device="cuda") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float64)
    elif kind == "relu":  # about 70% zeros: partial ties at the threshold 0
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float64)
        x = torch.where(torch.rand(shape, generator=g, device=device, dtype=torch.float64) < 0.7, 0.0, x.abs())
    elif kind == "integers":  # seven distinct values: ties everywhere
        x = torch.randint(-3, 4, shape, generator=g, device=device).to(torch.float64)
    elif kind == "special":  # NaN, +-inf, -0.0 among normal values
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float64)
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (max(8, flat.numel() // 50),), generator=g, device=device)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch.float64, device=device)
        flat[picks] = specials[torch.arange(picks.numel(), device=device) % specials.numel()]
    else:
        raise ValueError(kind)
    return x.to(dtype)


def assert_matches(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if name == "ash_p":
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCE[got.dtype])


def check_forward(name: str, x: torch.Tensor, percentile: float) -> torch.Tensor:
    got = getattr(ash_ext, name)(x, percentile)
    assert got.device == x.device
    assert_matches(name, got, getattr(fallback, name)(x, percentile))
    assert_matches(name, got.cpu(), getattr(ash_ext, name)(x.cpu(), percentile))
    return got


def test_cuda_kernel_serves_cuda_tensors():
    assert ash_ext.compiled_with_cuda(), "ash_ext was built without its CUDA kernels"
    assert ash_ext.implementation_for(torch.zeros(2, 2, device="cuda")) == "cuda-kernel"


def regime_shapes():
    """(id, shape) around every regime boundary, for float32."""
    limit = on_chip_limit(torch.float32)
    sms = sm_count() if torch.cuda.is_available() else 132
    long_n = limit + 4096 + 7
    return [
        ("pooled", (64, 2048)),
        ("map-512x4x4", (16, 512, 4, 4)),
        ("tiny", (5, 3)),
        ("onchip-limit-1", (3, limit - 1)),
        ("onchip-limit", (3, limit)),
        ("onchip-limit+1", (3, limit + 1)),
        ("chunked-batch-below-switch", (2 * sms - 1, long_n)),
        ("block-per-sample-at-switch", (2 * sms, long_n)),
        ("chunked-2048x7x7", (4, 2048, 7, 7)),
    ]


@pytest.mark.parametrize("shape", [s for _, s in regime_shapes()], ids=[i for i, _ in regime_shapes()])
@pytest.mark.parametrize("kind", ["normal", "relu", "integers", "special"])
def test_regimes_match_fallback_and_cpu(shape, kind):
    x = make(kind, shape, seed=sum(shape) + len(kind))
    for name in NAMES:
        for percentile in (0.65, 0.9):
            check_forward(name, x, percentile)


def test_planned_regimes_at_the_boundaries():
    for dtype in DTYPES:
        limit = on_chip_limit(dtype)
        assert plan((4, limit), dtype)["regime"] == "on-chip"
        assert plan((4, limit + 1), dtype)["regime"] == "chunked"
        assert plan((2 * sm_count(), limit + 1), dtype)["regime"] == "block-per-sample"
        window = plan((4, window_n(dtype)), dtype)
        assert window["regime"] == "on-chip" and 48 * 1024 - 1024 < window["dynamic_shared"] <= 48 * 1024


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["window", "limit-1", "limit", "limit+1", "chunked", "block-per-sample"])
@pytest.mark.parametrize("kind", ["normal", "relu", "special"])
def test_dtypes_at_boundaries(dtype, where, kind):
    limit = on_chip_limit(dtype)
    shape = {
        "window": (4, window_n(dtype)),
        "limit-1": (4, limit - 1),
        "limit": (4, limit),
        "limit+1": (4, limit + 1),
        "chunked": (2, 3 * limit + 5),
        "block-per-sample": (2 * sm_count(), limit + 9),
    }[where]
    x = make(kind, shape, dtype, seed=3)
    for name in NAMES:
        check_forward(name, x, 0.65)


@pytest.mark.parametrize("shape", [(4, 10240), (4, 640, 4, 4), (2, 640, 8, 8), (64, 640, 8, 8)], ids=str)
def test_old_48_kib_window_and_wide_resnet_maps(shape):
    """[B, 10240] and [B, 640, 4, 4] once failed to launch; WideResNet's [B, 640, 8, 8] maps go
    on chip with an H100's shared memory."""
    for kind in ("relu", "integers", "normal"):
        x = make(kind, shape, seed=5)
        for name in NAMES:
            check_forward(name, x, 0.65)


@pytest.mark.parametrize("kind", ["normal", "relu"])
def test_one_sample_of_2_pow_20(kind):
    x = make(kind, (1, 1 << 20), seed=11)
    for name in NAMES:
        check_forward(name, x, 0.65)
        check_forward(name, x, 0.9)


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_resnet_features(batch):
    x = make("relu", (batch, 2048, 7, 7), seed=batch)
    for name in NAMES:
        check_forward(name, x, 0.65)


@pytest.mark.parametrize("kept", ["none", "one", "all-but-one", "all"])
@pytest.mark.parametrize("shape", [(3, 100), (2, 30000)], ids=["onchip", "chunked"])
def test_extreme_k(kept, shape):
    n = shape[1]
    percentile = {"none": 1.0, "one": (n - 1) / n, "all-but-one": 1 / n, "all": 0.0}[kept]
    assert ash_ext.kept_count(n, percentile) == {"none": 0, "one": 1, "all-but-one": n - 1, "all": n}[kept]
    x = make("relu", shape, seed=5)
    for name in NAMES:
        check_forward(name, x, percentile)


@pytest.mark.parametrize(
    "shape", [(4, 64, 7, 7), (2, 512, 14, 14), (2 * 132, 256, 8, 8)], ids=["onchip", "chunked", "block-per-sample"]
)
@pytest.mark.parametrize("kind", ["relu", "integers"])
def test_channels_last(shape, kind):
    if shape[0] == 2 * 132:
        shape = (2 * sm_count(),) + shape[1:]
    x = make(kind, shape, seed=9).to(memory_format=torch.channels_last)
    for name in NAMES:
        got = check_forward(name, x, 0.65)
        assert got.is_contiguous(memory_format=torch.channels_last)
        inplace = x.clone()
        assert getattr(ash_ext, name)(inplace, 0.65, inplace=True) is inplace
        assert_matches(name, inplace, got)


@pytest.mark.parametrize("shape", [s for _, s in regime_shapes()], ids=[i for i, _ in regime_shapes()])
def test_inplace_equals_out_of_place(shape):
    x = make("relu", shape, seed=21)
    for name in NAMES:
        want = getattr(ash_ext, name)(x, 0.65)
        y = x.clone()
        assert getattr(ash_ext, name)(y, 0.65, inplace=True) is y
        torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)


def test_non_contiguous_and_offset_inputs():
    base = make("relu", (9, 4099), seed=4)
    for x in (base[1:], base[:, 3:], base[::2], base.t().contiguous().t()[:, :4000]):
        for name in NAMES:
            check_forward(name, x, 0.65)


@pytest.mark.parametrize(
    "shape", [(6, 300), (3, 2048, 7, 7), (2 * 132, 30000)], ids=["onchip", "chunked", "block-per-sample"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_fallback(shape, dtype, name):
    if shape[0] == 2 * 132:
        shape = (2 * sm_count(),) + shape[1:]
    x = make("relu", shape, dtype, seed=13)
    x = x + 0.01 * make("normal", shape, dtype, seed=14).abs()  # mostly distinct values
    grad = make("normal", shape, dtype, seed=15)
    leaf = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(getattr(ash_ext, name)(leaf, 0.65), leaf, grad)
    leaf_ref = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(getattr(fallback, name)(leaf_ref, 0.65), leaf_ref, grad)
    tolerance = dict(TOLERANCE[dtype])
    if dtype == torch.float16:
        tolerance = dict(rtol=5e-3, atol=5e-3)  # the fallback rounds some intermediate sums to half
    torch.testing.assert_close(got, want, **tolerance)
    leaf_cpu = x.cpu().requires_grad_(True)
    (want_cpu,) = torch.autograd.grad(getattr(ash_ext, name)(leaf_cpu, 0.65), leaf_cpu, grad.cpu())
    torch.testing.assert_close(got.cpu(), want_cpu, **tolerance)


@pytest.mark.parametrize(
    "shape",
    [(32, 2048), (4, window_n(torch.float32)), (8, 2048, 7, 7), (1, 1 << 20)],
    # onchip-limit: more than 48 KiB of shared memory, so the launch raises the kernel's limit
    # (cudaFuncSetAttribute) while the stream is being captured.
    ids=["onchip", "onchip-limit", "chunked", "chunked-2^20"],
)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_graph_capture_and_replay(shape, name):
    static_x = make("relu", shape, seed=1)
    fn = getattr(ash_ext, name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the capture
            fn(static_x, 0.65)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x, 0.65)
    for seed in (2, 3):
        fresh = make("relu", shape, seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(name, static_out, getattr(fallback, name)(fresh, 0.65))


@pytest.mark.parametrize(
    "shape", [(32, 2048), (4, 2048, 7, 7), (2 * 132, 13000)], ids=["onchip", "chunked", "block-per-sample"]
)
def test_non_default_stream(shape):
    if shape[0] == 2 * 132:
        shape = (2 * sm_count(),) + shape[1:]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # Produced and consumed on the side stream only: ordering must come from that stream.
        x = torch.randn(shape, device="cuda").relu_()
        outs = {name: getattr(ash_ext, name)(x, 0.65) for name in NAMES}
    torch.cuda.current_stream().wait_stream(stream)
    for name, out in outs.items():
        assert_matches(name, out, getattr(fallback, name)(x, 0.65))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    with torch.cuda.device(0):
        for shape in ((16, 2048), (2, 2048, 7, 7)):
            x = make("relu", shape, seed=6, device="cuda:1")
            for name in NAMES:
                out = check_forward(name, x, 0.65)
                assert out.device == torch.device("cuda:1")


def test_torch_compile_reduce_overhead():
    def features_to_scores(x):
        return ash_ext.ash_s(x, 0.65).flatten(1).sum(1)

    compiled = torch.compile(features_to_scores, mode="reduce-overhead")
    for seed in range(4):
        x = make("relu", (8, 2048, 7, 7), seed=seed)
        got = compiled(x)
        want = fallback.ash_s(x, 0.65).flatten(1).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape",
    [(64, 2048), (3, 2048, 7, 7), (1, 1 << 20), (2 * 132, 13000)],
    ids=["onchip", "chunked", "chunked-2^20", "block-per-sample"],
)
@pytest.mark.parametrize("name", ["ash_b", "ash_s"])
def test_run_to_run_bit_identity(shape, name):
    if shape[0] == 2 * 132:
        shape = (2 * sm_count(),) + shape[1:]
    x = make("normal", shape, seed=8)
    fn = getattr(ash_ext, name)
    first = fn(x, 0.65)
    for _ in range(3):
        assert torch.equal(fn(x, 0.65), first)
    # The summation order does not depend on where the data sits in memory either.
    shifted = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)[1:].view(x.shape).copy_(x)
    assert torch.equal(fn(shifted, 0.65), first)
    leaf = x.clone().requires_grad_(True)
    grad = make("normal", shape, seed=9)
    (g1,) = torch.autograd.grad(fn(leaf, 0.65), leaf, grad)
    (g2,) = torch.autograd.grad(fn(leaf, 0.65), leaf, grad)
    assert torch.equal(g1, g2)


# --------------------------------------------------------------------------------------------
# The shaping family on CUDA: SCALE, clip, per-sample percentiles, topk_stats, LTS, ReAct's fit
# --------------------------------------------------------------------------------------------

FAMILY_SHAPES = [s for i, s in regime_shapes() if i in ("pooled", "onchip-limit+1", "chunked-2048x7x7",
                                                          "block-per-sample-at-switch")]


@pytest.mark.parametrize("shape", FAMILY_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["relu", "integers", "special"])
def test_family_matches_the_fallback_without_host_sync(shape, dtype, kind):
    x = make(kind, shape, dtype, seed=len(shape) + len(kind))
    fractions = torch.rand(shape[0], device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    fractions[0] = 0.0
    fractions[-1] = 1.0
    calls = {
        "scale": lambda f, p: f.scale(x, p),
        "ash_s clip": lambda f, p: f.ash_s(x, p, clip=1.0),
        "ash_b clip": lambda f, p: f.ash_b(x, p, clip=0.5),
        "scale clip": lambda f, p: f.scale(x, p, clip=2.0),
    }
    for label, call in calls.items():
        for percentile in (0.65, fractions):
            torch.cuda.set_sync_debug_mode("error")  # a host synchronisation inside raises
            try:
                got = call(ash_ext, percentile)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            want = call(fallback, percentile)
            assert_matches(label, got, want)
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = ash_ext.topk_stats(x, fractions, clip=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = fallback.topk_stats(x, stats.k, None, 1.0)
    torch.testing.assert_close(stats.threshold, want[0], rtol=0, atol=0, equal_nan=True)
    tol = TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(stats.total, want[1], equal_nan=True, **tol)
    torch.testing.assert_close(stats.kept, want[2], equal_nan=True, **tol)


def test_family_invalid_fraction_gives_a_nan_sample_on_cuda():
    x = make("relu", (3, 100), seed=2)
    fractions = torch.tensor([0.5, 1.5, float("nan")], device="cuda")
    for name in ("ash_p", "ash_s", "scale"):
        out = getattr(ash_ext, name)(x, fractions)
        assert not torch.isnan(out[0]).any() and torch.isnan(out[1:]).all()
    stats = ash_ext.topk_stats(x, fractions)
    assert torch.isnan(stats.threshold[1:]).all() and torch.isnan(stats.kept[1:]).all()


def test_lts_factor_and_react_threshold_on_cuda():
    import numpy as np

    z = make("normal", (64, 768), torch.float32, seed=3)
    torch.testing.assert_close(ash_ext.lts_factor(z, 0.05), ash_ext.lts_factor(z.cpu(), 0.05).cuda(),
                               rtol=1e-5, atol=0)
    acts = make("relu", (100, 2048), torch.float32, seed=4)
    assert ash_ext.react_threshold(acts, 0.9) == float(np.percentile(acts.cpu().numpy(), 90))


@pytest.mark.parametrize("shape", FAMILY_SHAPES[:3], ids=str)
def test_family_gradients_match_the_fallback(shape):
    x = make("normal", shape, torch.float64, seed=5)
    fractions = torch.full((shape[0],), 0.7, device="cuda", dtype=torch.float64)
    for name, kwargs in (("scale", {}), ("ash_s", {"clip": 0.5}), ("scale", {"clip": 1.0})):
        leaf = x.clone().requires_grad_()
        (got,) = torch.autograd.grad(getattr(ash_ext, name)(leaf, fractions, **kwargs).square().sum(), leaf)
        leaf2 = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(getattr(fallback, name)(leaf2, fractions, **kwargs).square().sum(), leaf2)
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])


def has_clusters() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).major >= 9


@pytest.mark.parametrize("shape", [(64, 2048, 7, 7), (8, 2048, 7, 7), (3, 70001), (5, 3000)], ids=str)
@pytest.mark.parametrize("kind", ["relu", "integers", "special"])
def test_every_forced_regime_matches_the_fallback(shape, kind, monkeypatch):
    """ASH_EXT_CUDA_REGIME: each regime on the same input, ASH-P bit-identical across them, all
    against the fallback, forward and backward."""
    x = make(kind, shape, seed=len(kind))
    regimes = ["auto", "sample-per-block", "chunked"] + (["cluster"] if has_clusters() else [])
    outputs = {}
    for regime in regimes:
        monkeypatch.setenv("ASH_EXT_CUDA_REGIME", regime)
        for name in NAMES:
            outputs[(regime, name)] = check_forward(name, x, 0.65)
        leaf = x.clone().requires_grad_(True)
        ash_ext.ash_s(leaf, 0.65).sum().backward()
        ref = x.clone().requires_grad_(True)
        fallback.ash_s(ref, 0.65).sum().backward()
        torch.testing.assert_close(leaf.grad, ref.grad, **TOLERANCE[x.dtype])
    for regime in regimes[1:]:
        assert torch.equal(outputs[(regime, "ash_p")], outputs[("auto", "ash_p")]), regime


def test_forced_cluster_regime_where_it_cannot_serve(monkeypatch):
    monkeypatch.setenv("ASH_EXT_CUDA_REGIME", "cluster")
    x = torch.randn(2, 3000, device="cuda")
    if has_clusters():
        ash_ext.ash_s(x, 0.65)  # a cluster of one block
        with pytest.raises(ValueError, match="does not fit the shared memory of a cluster"):
            ash_ext.ash_s(torch.randn(1, 1 << 22, device="cuda"), 0.65)
    else:
        with pytest.raises(ValueError, match="has no thread-block clusters"):
            ash_ext.ash_s(x, 0.65)
    monkeypatch.setenv("ASH_EXT_CUDA_REGIME", "fastest")
    with pytest.raises(ValueError, match="ASH_EXT_CUDA_REGIME=fastest: expected auto, cluster"):
        ash_ext.ash_s(x, 0.65)
