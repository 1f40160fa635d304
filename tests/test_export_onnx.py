"""ONNX export of models that call ash_ext (ash_ext.onnx_export), run in onnxruntime without ash_ext.

Each exported model is compared with the same model run eagerly (the compiled kernels): ASH-P and
the thresholds bit for bit, the sums' results within the dtype's tolerance, NaN positions and the
kept sets exactly. The kept sets on data full of ties are also checked against the independent
numpy oracle of conftest (exactly k kept, ties to the lower index). Exports are the slow part, so
each model is exported once per exporter (module-scoped fixtures) and run on every data set; the
data sets use other batch sizes than the export's.
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch
from conftest import integer_ties, needs_kernel, normal, oracle_k, oracle_mask, relu_like

import ash_ext

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

pytestmark = needs_kernel

EXPORTERS = ("dynamo", "torchscript")
FUNCTIONS = {"ash-p": ash_ext.ash_p, "ash-b": ash_ext.ash_b, "ash-s": ash_ext.ash_s, "scale": ash_ext.scale}
#: n = 15: k = 15, 10, 1 and 0
PERCENTILES = (0.0, 0.35, 0.9, 1.0)
EXPORT_BATCH = 4
RTOL = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}


# --------------------------------------------------------------------------------------------
# Exporting and running
# --------------------------------------------------------------------------------------------


def export(model: torch.nn.Module, args: tuple, exporter: str, names: tuple, *, optimize: bool = True) -> bytes:
    """The ONNX model of ``model`` with a dynamic batch (dimension 0 of every input)."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer warnings
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=list(names),
                dynamic_shapes=tuple({0: batch} for _ in args),
                custom_translation_table=ash_ext.onnx_translation_table(),
                optimize=optimize,
                verbose=False,
            )
            return program.model_proto.SerializeToString()
        ash_ext.register_onnx_symbolics()
        buffer = io.BytesIO()
        torch.onnx.export(
            model,
            args,
            buffer,
            dynamo=False,
            input_names=list(names),
            dynamic_axes={name: {0: "batch"} for name in names},
        )
        return buffer.getvalue()


class Exported:
    """An exported model in an onnxruntime session (CPU provider), and its graph's operators."""

    def __init__(self, model_bytes: bytes) -> None:
        import onnx

        self.proto = onnx.load_from_string(model_bytes)
        self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> list:
        return self.session.run(None, {name: t.numpy() for name, t in zip(self.names, inputs)})

    def domains(self) -> set:
        return {node.domain for node in self.proto.graph.node} | {op.domain for op in self.proto.opset_import}


def eager(model: torch.nn.Module, *inputs: torch.Tensor) -> list:
    with torch.no_grad():
        out = model.eval()(*(t.clone() for t in inputs))
    return list(out) if isinstance(out, tuple) else [out]


def assert_matches(got: np.ndarray, expected: torch.Tensor, *, exact: bool, rtol: float | None = None) -> None:
    """``got`` (onnxruntime) against ``expected`` (eager ash_ext): dtype, shape, NaN and zero
    positions exactly; the values bit for bit (``exact``) or within the dtype's tolerance."""
    expected = expected.detach()
    assert got.shape == tuple(expected.shape)
    assert got.dtype == expected.numpy().dtype
    want = expected.numpy().astype(np.float64)
    have = got.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(have), np.isnan(want), err_msg="NaN positions differ")
    np.testing.assert_array_equal(have == 0, want == 0, err_msg="zero (not kept) positions differ")
    if exact:
        np.testing.assert_array_equal(have, want)
        zeros = want == 0
        np.testing.assert_array_equal(np.signbit(have[zeros]), np.signbit(want[zeros]), err_msg="signs of zeros differ")
    else:
        tolerance = RTOL[got.dtype.type] if rtol is None else rtol
        np.testing.assert_allclose(have, want, rtol=tolerance, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# The family model: every public function, variant and edge case in one graph
# --------------------------------------------------------------------------------------------

INPUT_NAMES = ("x", "y", "p", "x64", "x16")


class Case(NamedTuple):
    name: str
    fn: Callable[[dict], Any]  # the inputs by name -> a tensor or a tuple of tensors
    exact: tuple  # per output: compared bit for bit
    rtol: float | None = None


def _stats(t: torch.Tensor, percentile: Any, clip: float | None = None) -> tuple:
    stats = ash_ext.topk_stats(t, percentile, clip=clip)
    return stats.threshold, stats.total, stats.kept


def _cases() -> list:
    cases = []
    for name, fn in FUNCTIONS.items():
        exact = (name == "ash-p",)
        for q in PERCENTILES:
            cases.append(Case(f"{name}@{q}", lambda i, fn=fn, q=q: fn(i["x"], q), exact))
        cases.append(Case(f"{name}@p", lambda i, fn=fn: fn(i["x"], i["p"]), exact))
        cases.append(Case(f"{name}@0.35/f64", lambda i, fn=fn: fn(i["x64"], 0.35), exact))
        cases.append(Case(f"{name}@0.35/f16", lambda i, fn=fn: fn(i["x16"], 0.35), exact))
    cases += [
        # the kept sets: + 100 keeps the order and the ties of the small integers (and of -0.0 / +0.0)
        *(Case(f"mask@{q}", lambda i, q=q: ash_ext.ash_p(i["x"] + 100, q), (True,)) for q in PERCENTILES),
        Case("mask@p", lambda i: ash_ext.ash_p(i["x"] + 100, i["p"]), (True,)),
        Case("ash-p@0.5/y", lambda i: ash_ext.ash_p(i["y"], 0.5), (True,)),
        Case("ash-s@0.5/y", lambda i: ash_ext.ash_s(i["y"], 0.5), (False,)),
        Case("ash-s@0.6 clip", lambda i: ash_ext.shape(i["x"], 0.6, "ash-s", clip=0.5), (False,)),
        Case("ash-p@0.35 clip", lambda i: ash_ext.shape(i["x"], 0.35, "ASH_P", clip=0.25), (True,)),
        Case("scale@p clip", lambda i: ash_ext.scale(i["x"], i["p"], clip=1.0), (False,)),
        # a clip of -0.0 turns every positive value into -0.0, which ASH-P keeps as -0.0
        Case("ash-p@0.35 clip -0.0", lambda i: ash_ext.ash_p(i["x"], 0.35, clip=-0.0), (True,)),
        Case("ash-s@p/f64", lambda i: ash_ext.ash_s(i["x64"], i["p"]), (False,)),
        Case("ash-s@p/f16", lambda i: ash_ext.ash_s(i["x16"], i["p"]), (False,)),
        Case("ash-s@0.35/bf16", lambda i: ash_ext.ash_s(i["x"].to(torch.bfloat16), 0.35).float(), (False,), 2**-7),
        Case("ash-p@p/bf16", lambda i: ash_ext.ash_p(i["x"].to(torch.bfloat16), i["p"]).float(), (True,)),
        Case("topk_stats@0.35", lambda i: _stats(i["x"], 0.35), (True, False, False)),
        Case("topk_stats@0.9", lambda i: _stats(i["x"], 0.9), (True, False, False)),
        Case("topk_stats@1.0", lambda i: _stats(i["x"], 1.0), (True, False, False)),
        Case("topk_stats@0.0 clip", lambda i: _stats(i["x"], 0.0, clip=0.5), (True, False, False)),
        Case("topk_stats@p", lambda i: _stats(i["x"], i["p"]), (True, False, False)),
        Case("topk_stats@p/f64", lambda i: _stats(i["x64"], i["p"]), (True, False, False)),
        Case("topk_stats@0.9/f16", lambda i: _stats(i["x16"], 0.9), (True, False, False)),
        Case("lts@0.05", lambda i: ash_ext.lts_factor(i["x"]), (False,)),
        Case("lts@p", lambda i: ash_ext.lts_factor(i["x"], i["p"]), (False,)),
    ]
    return cases


CASES = _cases()
#: (label, case, index within the case's outputs), in the order of the model's outputs
OUTPUTS = [
    (f"{case.name}[{part}]" if len(case.exact) > 1 else case.name, case, part)
    for case in CASES
    for part in range(len(case.exact))
]
OUTPUT_INDEX = {label: index for index, (label, _, _) in enumerate(OUTPUTS)}


class Family(torch.nn.Module):
    def forward(self, x, y, p, x64, x16):
        inputs = dict(zip(INPUT_NAMES, (x, y, p, x64, x16)))
        outputs = []
        for case in CASES:
            result = case.fn(inputs)
            outputs.extend(result if isinstance(result, tuple) else (result,))
        return tuple(outputs)


def _ties(batch: int) -> torch.Tensor:
    """Small integers (ties everywhere), with the edge samples first: constant, all zero, all
    negative, zeros above negatives (ASH-S's s2 = 0 with s1 < 0 at k = 1), -0.0 among +0.0."""
    x = integer_ties((batch, 3, 5), torch.float64, seed=3, low=-2, high=3)
    rows = [
        torch.ones(15),
        torch.zeros(15),
        torch.full((15,), -2.0),
        torch.cat([torch.zeros(5), -torch.ones(10)]),
        torch.tensor([0.0, -0.0] * 5 + [1.0, -0.0, 1.0, 0.0, 1.0]),
    ]
    for b, row in enumerate(rows[:batch]):
        x[b] = row.to(torch.float64).view(3, 5)
    return x


def _specials(batch: int) -> torch.Tensor:
    """NaN, +-inf, -0.0 and +0.0 among normal values; sample 0 has +inf before NaN (ash_ext ranks
    NaN above +inf), sample 1 two of each, interleaved."""
    nan, inf = float("nan"), float("inf")
    x = normal((batch, 3, 5), torch.float64, seed=5)
    x[0].view(-1)[:6] = torch.tensor([inf, 1.0, nan, inf, -inf, -0.0])
    x[1].view(-1)[:4] = torch.tensor([inf, nan, inf, nan])
    x[2].view(-1)[::2] = nan
    x[3].view(-1)[1::3] = inf
    return x


def _dataset(kind: str) -> tuple:
    batch = {"normal": EXPORT_BATCH, "ties": 7, "specials": 5, "one": 1}[kind]
    if kind == "normal":
        x = normal((batch, 3, 5), torch.float64, seed=1)
    elif kind == "one":
        x = relu_like((batch, 3, 5), torch.float64, seed=2)
    elif kind == "ties":
        x = _ties(batch)
    else:
        x = _specials(batch)
    y = normal((batch, 2, 2, 4), torch.float64, seed=7)
    p = torch.tensor([0.0, 1.0, 0.5, 0.9, 0.35, 0.2, 0.75][:batch], dtype=torch.float32)
    if kind == "one":
        p = torch.tensor([0.6])
    return x.float(), y.float(), p, x, x.half()


DATASETS = ("normal", "ties", "specials", "one")


@pytest.fixture(scope="module")
def family_reference() -> dict:
    """The eager outputs of the family model on every data set."""
    return {kind: eager(Family(), *_dataset(kind)) for kind in DATASETS}


@pytest.fixture(scope="module", params=EXPORTERS)
def family(request) -> tuple:
    """(exporter, the family model exported with a dynamic batch, its outputs on every data set)."""
    exported = Exported(export(Family(), _dataset("normal"), request.param, INPUT_NAMES, optimize=False))
    return request.param, exported, {kind: exported(*_dataset(kind)) for kind in DATASETS}


@pytest.mark.parametrize("kind", DATASETS)
@pytest.mark.parametrize("label", list(OUTPUT_INDEX))
def test_family_matches_eager(family, family_reference, label, kind):
    _, _, outputs = family
    index = OUTPUT_INDEX[label]
    _, case, part = OUTPUTS[index]
    assert_matches(outputs[kind][index], family_reference[kind][index], exact=case.exact[part], rtol=case.rtol)


@pytest.mark.parametrize("percentile", [*PERCENTILES, "p"])
def test_ties_keep_exactly_k_and_the_lower_index(family, percentile):
    """On the ties data, the kept set is exactly k values per sample: the oracle's (a stable
    descending order: among equal values the lower logical index first)."""
    _, _, outputs = family
    x, _, p, _, _ = _dataset("ties")
    shifted = x + 100  # as the "mask@" cases compute it (exact for these small integers)
    kept = outputs["ties"][OUTPUT_INDEX[f"mask@{percentile}"]].reshape(x.shape[0], -1) != 0
    n = kept.shape[1]
    for b in range(x.shape[0]):
        # (ash_ext takes a percentile tensor's k in the tensor's precision: float32 here)
        k = n - int(torch.round(p[b] * n)) if percentile == "p" else oracle_k(n, percentile)
        assert kept[b].sum() == k
        np.testing.assert_array_equal(kept[b], oracle_mask(shifted[b : b + 1], k)[0])


def test_invalid_per_sample_fraction_is_a_nan_sample(family):
    """A per-sample fraction outside [0, 1] (or NaN) gives a NaN sample, as ash_ext's CUDA kernels
    (eager CPU calls reject it). Only the dynamo export keeps that check in the graph: the
    TorchScript trace records the CPU path, whose check ran once, at trace time."""
    exporter, exported, _ = family
    if exporter != "dynamo":
        pytest.skip("the TorchScript trace has no per-sample validity check")
    x, y, _, x64, x16 = _dataset("normal")
    p = torch.tensor([1.5, -0.1, float("nan"), 0.5])
    outputs = exported(x, y, p, x64, x16)
    reference = eager(Family(), x[3:], y[3:], p[3:], x64[3:], x16[3:])
    per_sample = [label for label, case, _ in OUTPUTS if "@p" in case.name]
    assert per_sample
    for label in per_sample:
        index = OUTPUT_INDEX[label]
        assert np.isnan(outputs[index][:3].astype(np.float64)).all(), label
        _, case, part = OUTPUTS[index]
        assert_matches(outputs[index][3:], reference[index], exact=case.exact[part], rtol=case.rtol)


def test_family_graph_is_plain_onnx(family):
    """Only standard ONNX operators (the default domain): onnxruntime runs it without ash_ext."""
    _, exported, _ = family
    assert exported.domains() <= {"", "ai.onnx"}
    assert len(exported.proto.functions) == 0
    ops = {node.op_type for node in exported.proto.graph.node}
    assert "TopK" in ops and "ScatterElements" in ops


# --------------------------------------------------------------------------------------------
# Small models as deployed: a backbone, ASH, a head (the exporters' default optimisation on)
# --------------------------------------------------------------------------------------------


class Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 5)


class ShapedNet(Backbone):
    """ASH-S on the feature map and ASH's energy score, with the feature map's ASH statistics (two
    ash_ext ops on one tensor) and ReAct + ASH-B on the pooled features."""

    def forward(self, images):
        features = self.features(images)
        logits = self.head(ash_ext.ash_s(features, 0.9).mean((2, 3)))
        pooled = ash_ext.ash_b(features.mean((2, 3)), 0.5, clip=0.6)
        return logits, torch.logsumexp(logits, 1), ash_ext.topk_stats(features, 0.9).kept, pooled


class InPlaceNet(Backbone):
    """``inplace=True`` on an intermediate tensor, and (``on_input``) on the model's input."""

    def __init__(self, on_input: bool) -> None:
        super().__init__()
        self.on_input = on_input

    def forward(self, images):
        if self.on_input:
            ash_ext.ash_p(images, 0.25, inplace=True)
        features = self.features(images)
        ash_ext.ash_s(features, 0.85, inplace=True)
        pooled = features.mean((2, 3))
        ash_ext.scale(pooled, 0.5, inplace=True)
        return self.head(pooled), features


def _images(batch: int, seed: int) -> torch.Tensor:
    return normal((batch, 3, 6, 6), torch.float32, seed=seed)


def _check_model(model: torch.nn.Module, exported: Exported) -> None:
    for batch, seed in ((2, 10), (5, 11), (1, 12)):  # exported with batch 2
        images = _images(batch, seed)
        for got, expected in zip(exported(images), eager(model, images)):
            assert_matches(got, expected, exact=False)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_shaped_net(exporter):
    model = ShapedNet()
    exported = Exported(export(model, (_images(2, 0),), exporter, ("images",)))
    assert exported.domains() <= {"", "ai.onnx"}
    _check_model(model, exported)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_inplace_net(exporter):
    # The TorchScript exporter cannot export an in-place write into a graph input (aten::copy).
    model = InPlaceNet(on_input=exporter == "dynamo")
    exported = Exported(export(model, (_images(2, 0),), exporter, ("images",)))
    _check_model(model, exported)


class PlainNet(Backbone):
    def forward(self, images):
        return self.head(self.features(images).mean((2, 3)))


def test_shaping_hook_exports():
    """ash_ext.shaping (a forward hook: ReAct's clip + ASH-S on a layer) is traced into the export."""
    model = PlainNet()
    with ash_ext.shaping(model, "features", "ash-s", 0.8, clip=0.7):
        exported = Exported(export(model, (_images(2, 0),), "dynamo", ("images",)))
        _check_model(model, exported)


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------


def test_translation_table():
    table = ash_ext.onnx_translation_table()
    assert set(table) == {torch.ops.ash_ext.ash.default, torch.ops.ash_ext.topk_stats.default}
    assert all(callable(fn) for fn in table.values())
    assert table is not ash_ext.onnx_translation_table()  # a fresh dict: callers may update it


def test_import_loads_no_onnx():
    """``import ash_ext`` imports neither ash_ext.onnx_export nor torch.onnx nor onnxscript."""
    code = (
        "import sys, ash_ext; "
        "print(sorted(m for m in ('ash_ext.onnx_export', 'torch.onnx', 'onnxscript', 'onnx') if m in sys.modules))"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
