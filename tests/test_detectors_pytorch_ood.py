"""ASH, SCALE, LTS and ReAct against pytorch-ood 0.4.0's detectors: constructors, defaults,
scores, fitting, hyperparameters, devices, the base-class behaviour, and pytorch-ood's own tools
(GridSearch, OODMetrics) run on ash_ext's detectors."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ash_ext
from ash_ext.detector_base import FeatureMapsDetector, FeaturesDetector

NAMES = ("ASH", "SCALE", "LTS", "ReAct")


@pytest.fixture(scope="module")
def ood():
    return pytest.importorskip("pytorch_ood")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _maps_model(seed=0, channels=8, classes=5):
    """float64 conv backbone (positive-leaning 4-D maps, few ties) and pooled linear head."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()).double().eval()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)).double().eval()
    with torch.no_grad():
        backbone[0].bias.add_(0.3)
    return backbone, head


def _features_model(seed=0, dim=64, classes=5):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()
    head = nn.Linear(dim, classes).double().eval()
    return encoder, head


def _images(n, seed, shift=0.0, scale=1.0):
    return torch.randn(n, 3, 6, 6, generator=_gen(seed), dtype=torch.float64) * scale + shift


def _loaders(seed=0, batch=8):
    """ID (labels 0..4) and OOD (label -1) images; fit loader of ID only."""
    x_id = _images(24, seed)
    x_ood = _images(24, seed + 1, shift=0.4, scale=1.6)
    y_id = torch.arange(24) % 5
    y_ood = -torch.ones(24, dtype=torch.long)
    val = DataLoader(TensorDataset(torch.cat([x_id, x_ood]), torch.cat([y_id, y_ood])), batch_size=batch)
    fit = DataLoader(TensorDataset(_images(32, seed + 2), torch.arange(32) % 5), batch_size=batch)
    return fit, val


def _pair(ood, name, **kwargs):
    """(ash_ext detector, pytorch-ood detector) of class ``name`` on the same model."""
    if name == "LTS":
        encoder, head = _features_model()
        parts = (encoder, head)
    else:
        parts = _maps_model()
    return getattr(ash_ext, name)(*parts, **kwargs), getattr(ood.detector, name)(*parts, **kwargs)


# --------------------------------------------------------------------------------------------
# Constructors, defaults, class attributes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_constructor_and_class_attributes_match(ood, name):
    ours, theirs = getattr(ash_ext, name), getattr(ood.detector, name)

    def params(cls):
        return [(p.name, p.default, p.kind) for p in inspect.signature(cls.__init__).parameters.values()]

    assert params(ours) == params(theirs)
    assert ours.hyperparameter_space == theirs.hyperparameter_space
    assert ours.requires_fit == theirs.requires_fit
    assert ours.info is not None and ours.info.paper.url == theirs.info.paper.url


@pytest.mark.parametrize("name", ["ASH", "SCALE", "ReAct"])
def test_feature_map_detectors_are_feature_map_detectors(ood, name):
    ours, _ = _pair(ood, name)
    assert isinstance(ours, FeatureMapsDetector) and not isinstance(ours, FeaturesDetector)
    assert isinstance(ours, ood.api.Detector)
    assert isinstance(ours, ood.api.FeatureMapsDetector)
    assert not isinstance(ours, (ood.api.FeaturesDetector, ood.api.LogitsDetector, ood.api.GradientDetector))


def test_lts_is_a_features_detector(ood):
    ours, _ = _pair(ood, "LTS")
    assert isinstance(ours, ood.api.Detector) and isinstance(ours, ood.api.FeaturesDetector)
    assert not isinstance(ours, ood.api.FeatureMapsDetector)


def test_default_detector_is_pytorch_ood_energy(ood):
    logits = torch.randn(7, 5, generator=_gen(3), dtype=torch.float64)
    assert torch.equal(ash_ext.energy_score(logits), ood.detector.EnergyBased.score(logits))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: ash_ext.SCALE(nn.Identity(), nn.Identity(), percentile=p),
        lambda p: ash_ext.ReAct(nn.Identity(), nn.Identity(), percentile=p),
        lambda p: ash_ext.LTS(None, nn.Identity(), p=p),
    ],
    ids=["SCALE", "ReAct", "LTS"],
)
def test_bad_fractions(make):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            make(bad)
    for bad in ("0.5", None, True, [0.5], torch.tensor([0.5])):
        with pytest.raises(TypeError):
            make(bad)
    with pytest.raises(ValueError, match=r"0\.65"):
        make(65)
    assert make(torch.tensor(0.25, dtype=torch.float64)).get_hyperparameters() in ({"percentile": 0.25}, {})


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["ash-p", "ash-b", "ash-s"])
@pytest.mark.parametrize("percentile", [0.5, 0.9])
def test_ash_scores_match(ood, variant, percentile):
    ours, theirs = _pair(ood, "ASH", variant=variant, percentile=percentile)
    x = _images(5, 11)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    fm = ours.backbone(x).detach()
    torch.testing.assert_close(ours.predict_feature_maps(fm), theirs.predict_feature_maps(fm), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("percentile", [0.0, 0.65, 0.9])
def test_scale_scores_match(ood, percentile):
    ours, theirs = _pair(ood, "SCALE", percentile=percentile)
    x = _images(5, 12)
    torch.testing.assert_close(ours.predict(x), theirs.predict(x), rtol=1e-10, atol=1e-10)
    fm = ours.backbone(x).detach()
    torch.testing.assert_close(ours.predict_feature_maps(fm), theirs.predict_feature_maps(fm), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [0.05, 0.2, 1.0])
def test_lts_scores_and_factor_match(ood, p):
    ours, theirs = _pair(ood, "LTS", p=p)
    x = _images(6, 13)
    z = ours.encoder(x).detach()
    torch.testing.assert_close(ash_ext.LTS.scaling_factor(z, p), ood.detector.LTS.scaling_factor(z, p))
    torch.testing.assert_close(ours.predict(x), theirs.predict(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.predict_features(z), theirs.predict_features(z), rtol=1e-10, atol=1e-10)
    # rank > 2 features (pytorch-ood takes 2-D only): the factor is that of the flattened sample
    z3 = z.reshape(6, 8, 8)
    torch.testing.assert_close(ash_ext.LTS.scaling_factor(z3, p), ood.detector.LTS.scaling_factor(z, p))


def test_lts_needs_an_encoder(ood):
    detector = ash_ext.LTS(None, nn.Linear(4, 3))
    with pytest.raises(ood.api.ModelNotSetException):
        detector.predict(torch.randn(2, 4))
    with pytest.raises(ash_ext.ModelNotSetException):
        detector.predict(torch.randn(2, 4))
    assert detector.predict_features(torch.rand(2, 4)).shape == (2,)


def test_react_fit_and_scores_match(ood):
    ours, theirs = _pair(ood, "ReAct")
    fit, val = _loaders()
    x = _images(5, 14)
    for detector in (ours, theirs):
        with pytest.raises(ood.api.RequiresFittingException):
            detector.predict(x)
    assert ours.fit(fit) is ours
    theirs.fit(fit)
    assert ours.threshold == theirs.threshold  # np.percentile, bit for bit
    torch.testing.assert_close(ours.predict(x), theirs.predict(x), rtol=1e-12, atol=1e-12)

    # OOD samples are ignored; fit_feature_maps is the same estimate
    maps = torch.cat([ours.backbone(xb) for xb, _ in val]).detach()
    labels = torch.cat([yb for _, yb in val])
    ours.fit_feature_maps(maps, labels)
    theirs.fit_feature_maps(maps, labels)
    assert ours.threshold == theirs.threshold
    expected = float(np.percentile(maps[labels >= 0].numpy(), 90))
    assert ours.threshold == expected

    # setting percentile keeps the fitted threshold until the next fit (as pytorch-ood)
    ours.set_hyperparameters(percentile=0.5)
    theirs.set_hyperparameters(percentile=0.5)
    assert ours.threshold == theirs.threshold == expected
    ours.fit(fit)
    theirs.fit(fit)
    assert ours.threshold == theirs.threshold != expected


def test_react_errors(ood):
    backbone, head = _maps_model()
    with pytest.raises(ValueError, match="No ID"):
        ash_ext.ReAct(backbone, head).fit_feature_maps(torch.rand(3, 8, 2, 2), -torch.ones(3))
    only_ood = DataLoader(TensorDataset(_images(4, 1), -torch.ones(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="No ID"):
        ash_ext.ReAct(backbone, head).fit(only_ood)
    with pytest.raises(ood.api.ModelNotSetException):
        ash_ext.ReAct(backbone, None, threshold=1.0).predict_feature_maps(torch.rand(2, 8, 2, 2))
    given = ash_ext.ReAct(backbone, head, threshold=0.5)
    theirs = ood.detector.ReAct(backbone, head, threshold=0.5)
    x = _images(3, 2)
    torch.testing.assert_close(given(x), theirs(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        ash_ext.ReAct(backbone, head, threshold=float("nan"))


@pytest.mark.parametrize("name", NAMES)
def test_inputs_untouched_and_no_grad(ood, name):
    ours, _ = _pair(ood, name, **({"threshold": 0.4} if name == "ReAct" else {}))
    x = _images(3, 15).requires_grad_()
    before = x.detach().clone()
    scores = ours(x)
    assert not scores.requires_grad and scores.grad_fn is None
    assert torch.equal(x.detach(), before)
    rep = (ours.encoder if name == "LTS" else ours.backbone)(x.detach())
    rep_before = rep.clone()
    (ours.predict_features if name == "LTS" else ours.predict_feature_maps)(rep)
    assert torch.equal(rep, rep_before)


@pytest.mark.parametrize("shape", [(4, 8), (4, 2, 3, 4), (4, 3, 2, 2, 2)])
def test_feature_maps_of_any_rank(ood, shape):
    """Ranks other than 4 score as pytorch-ood's 4-D path on the reshaped maps."""
    n = int(np.prod(shape[1:]))
    fm = torch.rand(shape, generator=_gen(5), dtype=torch.float64) + 0.1
    lin = nn.Linear(n, 3).double()

    def head(t):
        return lin(t.reshape(t.shape[0], -1))

    fm4 = fm.reshape(shape[0], n, 1, 1)
    cases = [
        (ash_ext.ASH(None, head, "ash-s", 0.7), ood.detector.ASH(None, head, "ash-s", 0.7)),
        (ash_ext.SCALE(None, head, 0.7), ood.detector.SCALE(None, head, 0.7)),
        (ash_ext.ReAct(None, head, threshold=0.6), ood.detector.ReAct(None, head, threshold=0.6)),
    ]
    for ours, theirs in cases:
        torch.testing.assert_close(ours.predict_feature_maps(fm), theirs.predict_feature_maps(fm4))


# --------------------------------------------------------------------------------------------
# Base-class behaviour
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters(ood, name):
    ours, theirs = _pair(ood, name)
    assert ours.get_hyperparameters() == theirs.get_hyperparameters()
    key = {"LTS": "p"}.get(name, "percentile")
    ours.hyperparameter_space = {key: [0.3, 0.4]}
    assert ours.set_hyperparameters(**{key: 0.3}) is ours
    assert ours.get_hyperparameters() == {key: 0.3}
    with pytest.raises(ValueError, match="Unknown hyperparameter 'nope'"):
        ours.set_hyperparameters(nope=1)
    with pytest.raises(ValueError):
        ours.set_hyperparameters(**{key: 1.5})
    assert ours.get_hyperparameters() == {key: 0.3}


@pytest.mark.parametrize("name", NAMES)
def test_device_and_to(ood, name):
    ours, theirs = _pair(ood, name)
    assert ours.device == theirs.device == torch.device("cpu")
    assert ours.to("meta") is ours
    theirs.to("meta")
    assert ours.device == theirs.device == torch.device("meta")
    module = ours.encoder if name == "LTS" else ours.backbone
    assert all(p.device.type == "meta" for p in module.parameters())
    bare = getattr(ash_ext, name)(None, (lambda t: t), **({"threshold": 1.0} if name == "ReAct" else {}))
    assert bare.device is None
    assert bare.to("cpu").device == torch.device("cpu")


def test_predict_moves_representation_to_device(ood):
    """predict_feature_maps / predict_features move tensor arguments to the detector's device (as
    pytorch-ood's wrappers do): on 'meta' the result is on 'meta' for CPU input."""
    backbone, head = _maps_model()
    detector = ash_ext.ReAct(backbone, head, threshold=1.0).to("meta")
    assert detector.predict_feature_maps(torch.rand(2, 8, 3, 3, dtype=torch.float64)).device.type == "meta"


def test_fit_without_fitting(ood):
    for name in ("ASH", "SCALE", "LTS"):
        ours, _ = _pair(ood, name)
        assert ours.fit(None) is ours
    ours, _ = _pair(ood, "LTS")
    assert ours.fit_features(torch.rand(2, 4), torch.zeros(2)) is ours
    ours, _ = _pair(ood, "SCALE")
    assert ours.fit_feature_maps(torch.rand(2, 4), torch.zeros(2)) is ours


def test_base_class_without_pytorch_ood():
    """ash_ext's base classes alone: abstract predict, __call__, the requires_fit rule."""

    class Constant(ash_ext.detector_base.Detector):
        requires_fit = True

        def predict(self, x):
            return torch.zeros(x.shape[0])

    detector = Constant()
    assert detector(torch.rand(3, 2)).shape == (3,)
    with pytest.raises(NotImplementedError, match="requires fitting"):
        detector.fit(None)
    with pytest.raises(TypeError):
        ash_ext.detector_base.Detector()


# --------------------------------------------------------------------------------------------
# pytorch-ood's tools on ash_ext's detectors
# --------------------------------------------------------------------------------------------


def _grid(ood, detector, fit, val, space=None):
    search = ood.utils.GridSearch(detector, fit_loader=fit, val_loader=val, hyperparameter_space=space)
    best = search.run()
    return best, search.best_score_, [(r["params"], r["score"]) for r in search.results_]


@pytest.mark.parametrize(
    "name, kwargs, space",
    [
        ("ASH", {}, None),
        ("ASH", {"variant": "ash-p"}, None),
        ("SCALE", {}, None),
        ("ReAct", {}, None),
        ("LTS", {}, {"p": [0.02, 0.05, 0.1, 0.3, 0.6]}),
    ],
)
def test_grid_search_matches_pytorch_ood(ood, name, kwargs, space):
    fit, val = _loaders(seed=4)
    ours, theirs = _pair(ood, name, **kwargs)
    needs_fit = name == "ReAct"
    best_ours, score_ours, results_ours = _grid(ood, ours, fit if needs_fit else None, val, space)
    best_theirs, score_theirs, results_theirs = _grid(ood, theirs, fit if needs_fit else None, val, space)
    assert [p for p, _ in results_ours] == [p for p, _ in results_theirs]
    np.testing.assert_allclose([s for _, s in results_ours], [s for _, s in results_theirs], rtol=0, atol=1e-12)
    assert best_ours == best_theirs and score_ours == pytest.approx(score_theirs, abs=1e-12)
    assert len({round(s, 9) for _, s in results_ours}) > 1, "the grid must tell the candidates apart"
    # the detector is left configured with the best parameters (and re-fitted)
    assert ours.get_hyperparameters() == best_ours
    if needs_fit:
        assert ours.threshold == theirs.threshold

    # OODMetrics on the scores
    x = torch.cat([xb for xb, _ in val])
    y = torch.cat([yb for _, yb in val])
    m_ours = ood.metrics.OODMetrics().update(ours(x), y).compute()
    m_theirs = ood.metrics.OODMetrics().update(theirs(x), y).compute()
    assert m_ours.keys() == m_theirs.keys() and "AUROC" in m_ours
    for key in m_ours:
        assert m_ours[key] == pytest.approx(m_theirs[key], abs=1e-9), key


def test_grid_search_caches_lts_features(ood):
    """GridSearch takes its cached-features path for ash_ext's LTS (it is a FeaturesDetector):
    the encoder runs once per validation batch, not once per candidate."""
    _, val = _loaders(seed=5)
    encoder, head = _features_model()
    calls = []

    def counting_encoder(x):
        calls.append(x.shape[0])
        return encoder(x)

    detector = ash_ext.LTS(counting_encoder, head)
    ood.utils.GridSearch(detector, None, val, hyperparameter_space={"p": [0.05, 0.1, 0.3]}).run()
    assert len(calls) == len(val)


# --------------------------------------------------------------------------------------------
# Registration and import cost (fresh interpreters)
# --------------------------------------------------------------------------------------------

_ISINSTANCE_SCRIPT = r"""
import json, sys
order = sys.argv[1]
if order == "ood-first":
    import pytorch_ood.api
import ash_ext
from torch import nn
loaded_by_ash_ext = order == "ash-first" and "pytorch_ood" in sys.modules
det = ash_ext.SCALE(nn.Identity(), nn.Identity())
lts = ash_ext.LTS(None, nn.Identity())
import pytorch_ood.api as api
try:
    ash_ext.ReAct(nn.Identity(), nn.Identity()).predict_feature_maps(__import__("torch").zeros(1, 2))
    caught = False
except api.RequiresFittingException:
    caught = True
print(json.dumps({
    "loaded_by_ash_ext": loaded_by_ash_ext,
    "detector": isinstance(det, api.Detector),
    "maps": isinstance(det, api.FeatureMapsDetector),
    "features": isinstance(lts, api.FeaturesDetector),
    "caught": caught,
    "hook_left": any(type(f).__name__ == "_PytorchOodApiFinder" for f in sys.meta_path),
}))
"""


@pytest.mark.slow
def test_registration_in_fresh_interpreters(ood):
    """ash_ext imported before pytorch-ood (which it must not import) and after it: both register."""
    procs = {
        order: subprocess.Popen(
            [sys.executable, "-c", _ISINSTANCE_SCRIPT, order], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for order in ("ash-first", "ood-first")
    }
    for order, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result == {
            "loaded_by_ash_ext": False,
            "detector": True,
            "maps": True,
            "features": True,
            "caught": True,
            "hook_left": False,
        }, order
