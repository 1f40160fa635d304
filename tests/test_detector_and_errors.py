"""The ASH detector, argument errors, and the fallback switch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    INT64_MAX,
    INT64_MIN,
    RAW_OPS,
    VARIANTS,
    assert_matches_oracle,
    assert_raises_alike,
    integer_ties,
    kernel_available,
    needs_kernel,
    normal,
    oracle,
)
from torch import nn

import ash_ext
from ash_ext import fallback

# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).to(dtype)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to(dtype)
    with torch.no_grad():
        backbone[0].bias.add_(0.3)  # most activations positive: few ties at the threshold
    return backbone, head


def _hand_scores(backbone, head, x, percentile, variant):
    """-logsumexp(head(ASH(backbone(x)))) with ASH from the numpy oracle."""
    with torch.no_grad():
        fm = backbone(x)
        shaped = torch.from_numpy(oracle(fm, percentile, variant).values).reshape(fm.shape).to(fm.dtype)
        return -torch.logsumexp(head(shaped), dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("percentile", [0.0, 0.65, 0.9])
def test_detector_scores_by_hand(variant, percentile):
    backbone, head = _model(torch.float64)
    x = normal((4, 3, 6, 6), torch.float64, seed=1)
    detector = ash_ext.ASH(backbone, head, variant=variant, percentile=percentile)
    scores = detector.predict(x)
    assert scores.shape == (4,)
    torch.testing.assert_close(scores, _hand_scores(backbone, head, x, percentile, variant), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(detector(x), scores, rtol=0, atol=0)
    fm = backbone(x).detach()
    torch.testing.assert_close(detector.predict_feature_maps(fm), scores, rtol=1e-12, atol=1e-12)


def test_detector_defaults_and_custom_detector():
    backbone, head = _model()
    x = normal((3, 3, 5, 5), torch.float32, seed=2)
    default = ash_ext.ASH(backbone, head)
    assert default.variant == "ash-s" and default.percentile == 0.65
    torch.testing.assert_close(default.predict(x), _hand_scores(backbone, head, x, 0.65, "ash-s"), rtol=1e-5, atol=1e-5)

    def max_logit(logits):
        return -logits.max(dim=1).values

    custom = ash_ext.ASH(backbone, head, variant="ash-p", percentile=0.5, detector=max_logit)
    with torch.no_grad():
        fm = backbone(x)
        shaped = torch.from_numpy(oracle(fm, 0.5, "ash-p").values).reshape(fm.shape).float()
        expected = max_logit(head(shaped))
    torch.testing.assert_close(custom.predict(x), expected, rtol=1e-6, atol=1e-6)


def test_energy_score():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([-math.log(math.e + math.e**2 + math.e**3), -math.log(3.0)], dtype=torch.float64)
    torch.testing.assert_close(ash_ext.energy_score(logits), expected)


def test_fit_returns_self():
    backbone, head = _model()
    detector = ash_ext.ASH(backbone, head)
    assert detector.fit() is detector
    assert detector.fit(object(), device="cpu") is detector
    assert detector.fit_features(torch.zeros(2, 3), torch.zeros(2)) is detector


def test_predict_does_not_track_grad():
    backbone, head = _model()
    x = normal((2, 3, 5, 5), torch.float32, seed=3).requires_grad_()
    detector = ash_ext.ASH(backbone, head, variant="ash-b")
    assert torch.is_grad_enabled()
    for scores in (detector.predict(x), detector(x), detector.predict_feature_maps(backbone(x))):
        assert not scores.requires_grad and scores.grad_fn is None
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_feature_maps_leaves_input_alone(variant):
    backbone, head = _model()
    fm = backbone(normal((2, 3, 5, 5), torch.float32, seed=4)).detach()
    before = fm.clone()
    ash_ext.ASH(backbone, head, variant=variant).predict_feature_maps(fm)
    assert torch.equal(fm, before)


def test_detector_channels_last_feature_maps():
    backbone, head = _model()
    x = normal((3, 3, 6, 6), torch.float32, seed=5)
    fm = backbone(x).detach()
    detector = ash_ext.ASH(backbone, head, variant="ash-p", percentile=0.7)
    torch.testing.assert_close(
        detector.predict_feature_maps(fm.to(memory_format=torch.channels_last)),
        detector.predict_feature_maps(fm),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("percentile", [0.5, 0.65, 0.9])
def test_detector_matches_pytorch_ood(variant, percentile):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import ASH as OodASH

    backbone, head = _model(torch.float64, seed=6)
    x = normal((5, 3, 6, 6), torch.float64, seed=7)
    # no ties around the threshold (topk breaks ties its own way)
    with torch.no_grad():
        fm = backbone(x).reshape(5, -1)
    k = fm.shape[1] - int(np.round(fm.shape[1] * percentile))
    top = torch.topk(fm, k + 1, dim=1).values
    assert (top[:, k - 1] > top[:, k]).all()
    ours = ash_ext.ASH(backbone, head, variant=variant, percentile=percentile)
    theirs = OodASH(backbone, head, variant=variant, percentile=percentile)
    torch.testing.assert_close(ours.predict(x), theirs.predict(x), rtol=1e-10, atol=1e-10)
    fm4 = backbone(x).detach()
    torch.testing.assert_close(ours.predict_feature_maps(fm4), theirs.predict_feature_maps(fm4), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Bad percentiles
# --------------------------------------------------------------------------------------------


def _all_entry_points():
    """Callables f(x, percentile) that must validate the percentile."""
    x = torch.randn(2, 4)
    entries = [
        ("ash_p", lambda p: ash_ext.ash_p(x, p)),
        ("ash_b", lambda p: ash_ext.ash_b(x, p)),
        ("ash_s", lambda p: ash_ext.ash_s(x, p)),
        ("shape", lambda p: ash_ext.shape(x, p, "ash-p")),
        ("inplace", lambda p: ash_ext.ash_s(x.clone(), p, inplace=True)),
        ("fallback.ash_p", lambda p: fallback.ash_p(x, p)),
        ("fallback.ash_s", lambda p: fallback.ash_s(x, p)),
        ("ASH", lambda p: ash_ext.ASH(nn.Identity(), nn.Identity(), percentile=p)),
    ]
    return entries


ENTRY_POINTS = _all_entry_points()


@pytest.mark.parametrize("name, call", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
@pytest.mark.parametrize(
    "percentile, pattern",
    [
        (-0.1, r"-0\.1"),
        (1.5, r"1\.5"),
        (1.0000001, r"1\.0000001"),
        (-1e-300, r"-1e-300"),
        (float("nan"), r"nan"),
        (float("inf"), r"inf"),
        (float("-inf"), r"-inf"),
        (65, r"65"),
        (np.float64(2.5), r"2\.5"),
    ],
    ids=lambda v: str(v),
)
def test_bad_percentile_value(name, call, percentile, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(percentile)


@pytest.mark.parametrize("name, call", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
@pytest.mark.parametrize(
    "percentile, pattern",
    [(True, r"True"), (False, r"False"), ("0.5", r"'0\.5'"), (None, r"None"), ([0.5], r"\[0\.5\]"), (1j, r"1j")],
    ids=lambda v: repr(v),
)
def test_bad_percentile_type(name, call, percentile, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(percentile)


def test_percent_hint():
    with pytest.raises(ValueError, match=r"0\.65"):
        ash_ext.ash_p(torch.randn(2, 4), 65)


@pytest.mark.parametrize("percentile", [0, 1, 0.0, 1.0, np.float32(0.5), np.float64(0.65), 1e-300])
def test_good_percentiles_accepted(percentile):
    x = normal((2, 10), torch.float32, seed=8)
    assert_matches_oracle(ash_ext.ash_p(x, percentile), x, float(percentile), "ash-p")
    assert_matches_oracle(fallback.ash_p(x, percentile), x, float(percentile), "ash-p")


# --------------------------------------------------------------------------------------------
# Bad tensors
# --------------------------------------------------------------------------------------------

FUNCS = [
    ("ash_p", ash_ext.ash_p),
    ("ash_b", ash_ext.ash_b),
    ("ash_s", ash_ext.ash_s),
    ("fallback.ash_p", fallback.ash_p),
    ("fallback.ash_b", fallback.ash_b),
    ("fallback.ash_s", fallback.ash_s),
]


@pytest.mark.parametrize("name, fn", FUNCS, ids=[f[0] for f in FUNCS])
@pytest.mark.parametrize("x", [torch.randn(5), torch.tensor(1.0), torch.randn(0)], ids=["1d", "0d", "1d-empty"])
def test_rank_below_two(name, fn, x):
    with pytest.raises(ValueError, match=rf"{x.dim()}-D"):
        fn(x, 0.5)
    with pytest.raises(ValueError, match=rf"{x.dim()}-D"):
        fn(x.clone(), 0.5, inplace=True)


@pytest.mark.parametrize("name, fn", FUNCS, ids=[f[0] for f in FUNCS])
@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool, torch.complex64, torch.complex128], ids=str
)
def test_unsupported_dtype(name, fn, dtype):
    x = torch.zeros(2, 4, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        fn(x, 0.5)
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        fn(x, 0.5, inplace=True)


@pytest.mark.parametrize("not_a_tensor", [[[1.0, 2.0]], np.ones((2, 3)), None])
def test_not_a_tensor(not_a_tensor):
    with pytest.raises(TypeError):
        ash_ext.ash_p(not_a_tensor, 0.5)


@pytest.mark.parametrize("variant", ["ash-x", "ashs", "", "ash", "ash--s", "ash-s2"])
def test_unknown_variant(variant):
    x = torch.randn(2, 4)
    valid = "ash-p, ash-b, ash-s, scale"
    with pytest.raises(ValueError, match=f"{valid}.*{variant!r}"):
        ash_ext.shape(x, 0.5, variant)
    with pytest.raises(ValueError, match=f"{valid}.*{variant!r}"):
        ash_ext.shape(x, 0.5, variant, inplace=True)
    with pytest.raises(ValueError, match=f"ash-s, ash-p, ash-b .*{variant!r}"):
        ash_ext.ASH(nn.Identity(), nn.Identity(), variant=variant)
    with pytest.raises(ValueError, match=f"ash-p, ash-b, ash-s, scale, react.*{variant!r}"):
        ash_ext.shaping(nn.Sequential(nn.Identity()), "0", method=variant)


@pytest.mark.parametrize("spelling", ["ASH-S", "ash_s", " Ash-S ", "ASH_S", "Scale", "ASH-p", "ash_b"])
def test_one_spelling_rule_for_variants(spelling):
    """Case, surrounding spaces and '_' for '-' do not matter, in the functions, the detector and
    the shaping hooks alike; every one resolves to pytorch-ood's spelling."""
    canonical = spelling.strip().lower().replace("_", "-")
    x = torch.randn(3, 40)
    assert torch.equal(ash_ext.shape(x, 0.5, spelling), ash_ext.shape(x, 0.5, canonical))
    y = x.clone()
    ash_ext.shape(y, 0.5, spelling, inplace=True)
    assert torch.equal(y, ash_ext.shape(x, 0.5, canonical))
    if canonical == "scale":  # SCALE is a detector of its own, not an ASH variant
        with pytest.raises(ValueError, match="ash-s, ash-p, ash-b.*'Scale'"):
            ash_ext.ASH(nn.Identity(), nn.Identity(), variant=spelling)
    else:
        assert ash_ext.ASH(nn.Identity(), nn.Identity(), variant=spelling).variant == canonical
    with ash_ext.shaping(nn.Sequential(nn.Identity()), "0", method=spelling, percentile=0.5) as model:
        assert torch.equal(model(x), ash_ext.shape(x, 0.5, canonical))


@pytest.mark.parametrize("variant", [None, 1, ("ash-s",)])
def test_variant_of_wrong_type(variant):
    with pytest.raises(ValueError, match=repr(variant).replace("(", r"\(").replace(")", r"\)")):
        ash_ext.shape(torch.randn(2, 4), 0.5, variant)


@pytest.mark.parametrize("name, fn", FUNCS, ids=[f[0] for f in FUNCS])
def test_inplace_requires_grad_raises(name, fn):
    x = torch.randn(2, 6, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="inplace"):
        fn(x, 0.5, inplace=True)
    assert torch.equal(x.detach(), before)
    # a non-leaf that requires grad too
    y = x * 2
    with pytest.raises(RuntimeError, match="inplace"):
        fn(y, 0.5, inplace=True)


def test_inplace_requires_grad_public_api_unchanged_on_error():
    x = torch.randn(2, 6, requires_grad=True)
    before = x.detach().clone()
    for variant in VARIANTS:
        with pytest.raises(RuntimeError):
            ash_ext.shape(x, 0.5, variant, inplace=True)
    assert torch.equal(x.detach(), before)


# --------------------------------------------------------------------------------------------
# The raw ops
# --------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("k", [-1, 13, 2**40, -(2**40), 2**62, INT64_MAX, INT64_MIN])
@pytest.mark.parametrize("op", RAW_OPS)
def test_raw_op_k_out_of_range(op, k):
    """On CPU, fake and meta tensors alike (more hostile arguments in test_hostile_args.py)."""
    assert_raises_alike(
        op, lambda device, _: {"x": torch.randn(2, 3, 4, device=device), "k": k}, ValueError, f"12 elements, got {k}"
    )


@needs_kernel
@pytest.mark.parametrize("variant", [-1, 4, 100, 2**62, INT64_MIN])
@pytest.mark.parametrize("op", ["ash", "ash_", "ash_backward"])
def test_raw_op_bad_variant(op, variant):
    assert_raises_alike(
        op, lambda device, _: {"x": torch.randn(2, 4, device=device), "variant": variant}, ValueError, f"got {variant}"
    )


@needs_kernel
def test_raw_op_bad_tensors():
    with pytest.raises(ValueError, match="1-D"):
        torch.ops.ash_ext.ash(torch.randn(4), 2, 0)
    with pytest.raises(TypeError, match="Int|int"):
        torch.ops.ash_ext.ash(torch.zeros(2, 4, dtype=torch.int32), 2, 0)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.ash_ext.ash_backward(torch.ones(2, 5), x, 2, 0)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.ash_ext.ash_backward(torch.ones(2, 4, dtype=torch.float64), x, 2, 0)


@needs_kernel
def test_raw_op_k_on_empty_batch():
    x = torch.randn(0, 5)
    assert torch.ops.ash_ext.ash(x, 5, 2).shape == (0, 5)
    with pytest.raises(ValueError):
        torch.ops.ash_ext.ash(x, 6, 2)


# --------------------------------------------------------------------------------------------
# Which implementation runs; ASH_EXT_FORCE_FALLBACK
# --------------------------------------------------------------------------------------------


def test_implementation_for():
    x = torch.randn(2, 3)
    assert isinstance(ash_ext.compiled_with_cuda(), bool)
    if kernel_available():
        assert ash_ext.implementation_for(x) == "cpu-kernel"
        assert ash_ext.implementation_for(x.double().to(memory_format=torch.contiguous_format)) == "cpu-kernel"
    else:
        assert ash_ext.implementation_for(x) == "fallback"
    # a device without a kernel
    assert ash_ext.implementation_for(torch.empty(2, 3, device="meta")) == "fallback"
    if not ash_ext.compiled_with_cuda():
        assert ash_ext.implementation_for(torch.empty(2, 3, device="meta")) == "fallback"


def test_meta_tensors_use_fallback_semantics():
    x = torch.empty(2, 3, 4, device="meta")
    for variant in VARIANTS:
        out = ash_ext.shape(x, 0.5, variant)
        assert out.device.type == "meta" and out.shape == x.shape


_SUBPROCESS = r"""
import json, sys, torch, ash_ext
x = torch.tensor({data})
out = {{v: ash_ext.shape(x, 0.6, v).tolist() for v in ("ash-p", "ash-b", "ash-s")}}
print(json.dumps({{"impl": ash_ext.implementation_for(x), "forced": ash_ext.fallback_forced(),
                   "loaded": ash_ext.extension_loaded(), "out": out}}))
"""


ENV_CASES = {"1": True, "0": False}


@pytest.fixture(scope="module")
def subprocess_results():
    """Runs one interpreter per ASH_EXT_FORCE_FALLBACK setting (concurrently: each imports torch)."""
    x = integer_ties((3, 10), torch.float32, seed=9)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = {}
    for env_value in ENV_CASES:
        env = dict(os.environ)
        env.pop("ASH_EXT_FORCE_FALLBACK", None)
        if env_value is not None:
            env["ASH_EXT_FORCE_FALLBACK"] = env_value
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        env["OMP_NUM_THREADS"] = "1"
        procs[env_value] = subprocess.Popen(
            [sys.executable, "-c", _SUBPROCESS.format(data=x.tolist())],
            env=env,
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for env_value, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        results[env_value] = json.loads(stdout.strip().splitlines()[-1])
    return x, results


@pytest.mark.parametrize("env_value", [v for v, forced in ENV_CASES.items() if forced])
def test_force_fallback_env(subprocess_results, env_value):
    x, results = subprocess_results
    result = results[env_value]
    assert result["impl"] == "fallback"
    assert result["forced"] is True
    for variant, values in result["out"].items():
        assert_matches_oracle(torch.tensor(values), x, 0.6, variant)


@pytest.mark.parametrize("env_value", [v for v, forced in ENV_CASES.items() if not forced])
def test_without_force_fallback_env(subprocess_results, env_value):
    x, results = subprocess_results
    result = results[env_value]
    assert result["forced"] is False
    assert result["impl"] == ("cpu-kernel" if result["loaded"] else "fallback")
    if ash_ext.extension_loaded():
        assert result["loaded"] is True
    for variant, values in result["out"].items():
        assert_matches_oracle(torch.tensor(values), x, 0.6, variant)
