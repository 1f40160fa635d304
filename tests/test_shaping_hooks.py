"""ash_ext.shaping and from_model: hooks on any layer of any model, against hand-split models run
through pytorch-ood's detectors (torchvision models with random weights; nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ash_ext
from ash_ext.shaping import ModelSuffix, active_shapings

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small inputs: one intra-op thread is faster, and on a loaded 2-core machine OpenMP's
    spinning threads slow these forwards down by 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def energy(logits):
    return -torch.logsumexp(logits, dim=1)


# --------------------------------------------------------------------------------------------
# A toy model: hooks, nesting, errors
# --------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


@pytest.fixture
def toy():
    return Toy().double().eval()


def _toy_x(seed=1):
    return torch.randn(3, 3, 5, 5, generator=_gen(seed), dtype=torch.float64) + 0.2


def _toy_by_hand(toy, x, shape):
    with torch.no_grad():
        return toy.fc(torch.flatten(toy.pool(shape(toy.body(x))), 1))


@pytest.mark.parametrize(
    "method, kwargs, by_hand",
    [
        ("ash-p", {"percentile": 0.6}, lambda t: ash_ext.ash_p(t, 0.6)),
        ("ash-b", {"percentile": 0.6}, lambda t: ash_ext.ash_b(t, 0.6)),
        ("ash-s", {"percentile": 0.6}, lambda t: ash_ext.ash_s(t, 0.6)),
        ("scale", {"percentile": 0.6}, lambda t: ash_ext.scale(t, 0.6)),
        ("react", {"threshold": 0.4}, lambda t: t.clamp(max=0.4)),
        ("ash-s", {"percentile": 0.6, "clip": 0.5}, lambda t: ash_ext.ash_s(t.clamp(max=0.5), 0.6)),
        ("scale", {"percentile": 0.6, "clip": 0.5}, lambda t: ash_ext.scale(t.clamp(max=0.5), 0.6)),
    ],
)
def test_methods_match_by_hand(toy, method, kwargs, by_hand):
    x = _toy_x()
    with torch.no_grad():
        plain = toy(x)
        with ash_ext.shaping(toy, "body", method=method, **kwargs) as model:
            assert model is toy
            assert active_shapings(toy) == 1
            shaped = toy(x)
    expected = _toy_by_hand(toy, x, by_hand)
    torch.testing.assert_close(shaped, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(shaped, plain)
    assert hook_count(toy) == 0 and active_shapings(toy) == 0
    torch.testing.assert_close(toy(x), plain, rtol=0, atol=0)


def test_input_side_equals_output_side_of_the_previous_layer(toy):
    x = _toy_x(2)
    with torch.no_grad():
        with ash_ext.shaping(toy, "body", "ash-s", 0.7):
            out_side = toy(x)
        with ash_ext.shaping(toy, "pool", "ash-s", 0.7, on="input"):
            in_side = toy(x)
    assert torch.equal(out_side, in_side)


def test_hooks_never_accumulate_and_results_never_compound(toy):
    x = _toy_x(3)
    with torch.no_grad():
        with ash_ext.shaping(toy, "body", "ash-s", 0.5):
            once = toy(x)
        for _ in range(3):  # repeated use
            with ash_ext.shaping(toy, "body", "ash-s", 0.5):
                assert hook_count(toy) == 1
                assert torch.equal(toy(x), once)
        assert hook_count(toy) == 0

        ctx = ash_ext.shaping(toy, "body", "ash-s", 0.5)
        with ctx:  # re-entrant use of one context object
            with ctx:
                assert hook_count(toy) == 1
                assert torch.equal(toy(x), once)
            assert hook_count(toy) == 1
            assert torch.equal(toy(x), once)
        assert hook_count(toy) == 0

        with ash_ext.shaping(toy, "body", "ash-p", 0.9):  # nested, different settings: the inner applies
            outer = toy(x)
            with ash_ext.shaping(toy, "body", "ash-s", 0.5):
                assert hook_count(toy) == 1
                assert torch.equal(toy(x), once)
            assert torch.equal(toy(x), outer)  # the outer is back
        assert hook_count(toy) == 0

        # different layers (or sides) compose
        with ash_ext.shaping(toy, "body", "ash-s", 0.5), ash_ext.shaping(toy, "fc", "ash-p", 0.5, on="input"):
            assert hook_count(toy) == 2
            both = toy(x)
        expected = toy.fc(ash_ext.ash_p(torch.flatten(toy.pool(ash_ext.ash_s(toy.body(x), 0.5)), 1), 0.5))
        assert torch.equal(both, expected)
        assert hook_count(toy) == 0


def test_hooks_removed_on_exception(toy):
    with pytest.raises(KeyError):
        with ash_ext.shaping(toy, "body", "ash-s", 0.5):
            with ash_ext.shaping(toy, "fc", "scale", 0.5, on="input"):
                assert hook_count(toy) == 2
                raise KeyError("boom")
    assert hook_count(toy) == 0 and active_shapings(toy) == 0
    with pytest.raises(RuntimeError):  # a failing forward inside the block (4 channels for 3)
        with ash_ext.shaping(toy, "body", "ash-s", 0.5):
            toy(torch.zeros(2, 4, 5, 5, dtype=torch.float64))
    assert hook_count(toy) == 0


def test_other_hooks_are_left_alone(toy):
    seen = []
    handle = toy.body.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    x = _toy_x(4)
    with torch.no_grad():
        with ash_ext.shaping(toy, "body", "ash-p", 0.5):
            toy(x)
        toy(x)
    assert hook_count(toy) == 1
    assert torch.equal(seen[0], seen[1])  # the user's hook ran first and saw the unshaped output
    handle.remove()


@pytest.mark.parametrize("layer, on", [("body", "output"), ("pool", "input")])
def test_shaped_tensors_are_not_modified(toy, layer, on):
    """The layer's own output (or input) tensor is left as it was; the shaped one is a new tensor."""
    x = _toy_x(5)
    with torch.no_grad():
        expected = toy.body(x)
    seen = []
    if on == "output":
        handle = toy.body.register_forward_hook(lambda m, a, out: seen.append(out))
    else:
        handle = toy.pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad(), ash_ext.shaping(toy, layer, "ash-p", 0.8, on=on):
        toy(x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    assert (expected != 0).sum() > (ash_ext.ash_p(expected, 0.8) != 0).sum()


def test_errors(toy):
    with pytest.raises(ValueError, match=r"no submodule 'bod'.*'body'"):
        ash_ext.shaping(toy, "bod")
    with pytest.raises(ValueError, match=r"'body\.0'"):
        ash_ext.shaping(toy, "body.7")
    resnet = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match=r"no submodule 'layer5'[^']*'layer\d'"):
        ash_ext.shaping(resnet, "layer5")
    with pytest.raises(ValueError, match="on must be 'input' or 'output', got 'outputs'"):
        ash_ext.shaping(toy, "body", on="outputs")
    with pytest.raises(ValueError, match="method must be one of .*'ash-q'"):
        ash_ext.shaping(toy, "body", method="ash-q")
    with pytest.raises(ValueError, match="needs threshold"):
        ash_ext.shaping(toy, "body", method="react")
    with pytest.raises(ValueError, match="pass clip="):
        ash_ext.shaping(toy, "body", method="ash-s", threshold=1.0)
    with pytest.raises(ValueError, match="NaN"):
        ash_ext.shaping(toy, "body", method="ash-s", clip=float("nan"))
    with pytest.raises(ValueError, match="percentile"):
        ash_ext.shaping(toy, "body", percentile=1.5)
    with pytest.raises(TypeError, match="layer must be"):
        ash_ext.shaping(toy, 3)
    assert hook_count(toy) == 0
    with pytest.raises(TypeError, match="returns a tensor"):  # a layer returning a tuple
        lstm = nn.LSTM(4, 4)
        with ash_ext.shaping(lstm, ""):
            lstm(torch.randn(2, 3, 4))
    assert hook_count(lstm) == 0


# --------------------------------------------------------------------------------------------
# torchvision models against hand-split models and pytorch-ood
# --------------------------------------------------------------------------------------------

_MODELS: dict = {}


def _model(name, dtype=torch.float64):
    key = (name, dtype)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        if name.startswith("vit"):
            nn.init.normal_(model.heads.head.weight, std=0.05)  # torchvision zero-initialises the head
        _MODELS[key] = model.to(dtype).eval()
    return _MODELS[key]


def _resnet_split(model, layer):
    stem = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4]
    if layer == "avgpool":
        return nn.Sequential(*stem, model.avgpool), lambda t: model.fc(torch.flatten(t, 1))
    assert layer == "layer4"
    return nn.Sequential(*stem), lambda t: model.fc(torch.flatten(model.avgpool(t), 1))


def _vit_backbone(model):
    def backbone(x):
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return model.encoder(tokens)[:, 0]

    return backbone


def _images(shape, dtype=torch.float64, seed=7):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _assert_untied(fm, percentile):
    rows = fm.reshape(fm.shape[0], -1)
    k = rows.shape[1] - int(np.round(rows.shape[1] * percentile))
    top = torch.topk(rows, k + 1, dim=1).values
    assert (top[:, k - 1] > top[:, k]).all(), "ties at the threshold: topk's choice is unspecified"


def _ood_detector(ood, method, backbone, head, percentile, threshold=None):
    if method.startswith("ash"):
        return ood.detector.ASH(backbone, head, variant=method, percentile=percentile)
    if method == "scale":
        return ood.detector.SCALE(backbone, head, percentile=percentile)
    return ood.detector.ReAct(backbone, head, threshold=threshold)


def _ours_from_model(method, model, layer, percentile, threshold=None, **kwargs):
    if method.startswith("ash"):
        return ash_ext.ASH.from_model(model, layer, variant=method, percentile=percentile, **kwargs)
    if method == "scale":
        return ash_ext.SCALE.from_model(model, layer, percentile=percentile, **kwargs)
    return ash_ext.ReAct.from_model(model, layer, threshold=threshold, **kwargs)


def _check_against_hand_split(model, layer, on, x, methods, percentile, hand_backbone, hand_head, tol):
    """shaping and from_model scores against pytorch-ood's detector on the hand-split model."""
    ood = pytest.importorskip("pytorch_ood")
    with torch.no_grad():
        fm = hand_backbone(x)
    for number, method in enumerate(methods):
        threshold = float(fm.quantile(0.8)) if method == "react" else None
        if method != "react":
            _assert_untied(fm, percentile)
        shape_kwargs = {"threshold": threshold} if method == "react" else {"percentile": percentile}
        with torch.no_grad(), ash_ext.shaping(model, layer, method=method, on=on, **shape_kwargs):
            scores_hooked = energy(model(x))
        assert hook_count(model) == 0

        reference = _ood_detector(ood, method, hand_backbone, hand_head, percentile, threshold)
        expected = reference.predict_feature_maps(fm)  # = reference.predict(x)
        torch.testing.assert_close(scores_hooked, expected, rtol=tol, atol=tol)

        detector = _ours_from_model(method, model, layer, percentile, threshold, on=on)
        torch.testing.assert_close(detector.predict(x), expected, rtol=tol, atol=tol)
        if number == 0:  # the backbone, and the head that replays the model
            with torch.no_grad():
                captured = detector.backbone(x)
            assert torch.equal(captured.reshape(fm.shape), fm)
            torch.testing.assert_close(detector.predict_feature_maps(captured), expected, rtol=tol, atol=tol)
        assert hook_count(model) == 0


@pytest.mark.parametrize("layer", ["avgpool", "layer4"])
@pytest.mark.parametrize("method", ["ash-p", "ash-b", "ash-s", "scale", "react"])
def test_resnet18(layer, method):
    model = _model("resnet18")
    backbone, head = _resnet_split(model, layer)
    x = _images((2, 3, 64, 64))
    _check_against_hand_split(model, layer, "output", x, [method], 0.9, backbone, head, 1e-9)


@pytest.mark.parametrize("layer, method", [("avgpool", "ash-s"), ("layer4", "scale")])
def test_resnet50(layer, method):
    model = _model("resnet50")
    backbone, head = _resnet_split(model, layer)
    x = _images((2, 3, 64, 64))
    _check_against_hand_split(model, layer, "output", x, [method], 0.9, backbone, head, 1e-9)


@pytest.mark.slow
def test_wide_resnet50_2():
    model = _model("wide_resnet50_2", torch.float32)
    backbone, head = _resnet_split(model, "avgpool")
    x = _images((2, 3, 64, 64), torch.float32)
    _check_against_hand_split(model, "avgpool", "output", x, ["ash-s"], 0.9, backbone, head, 1e-4)


@pytest.mark.slow
def test_vit_b_16_class_token():
    """At the class-token feature: the input of ``heads`` (2-D; pytorch-ood's ASH takes 4-D, so
    its backbone adds two unit dimensions)."""
    model = _model("vit_b_16", torch.float32)
    backbone = _vit_backbone(model)

    def backbone4(x):
        return backbone(x)[:, :, None, None]

    def head4(t):
        return model.heads(t.flatten(1))

    x = _images((1, 3, 224, 224), torch.float32)
    _check_against_hand_split(model, "heads", "input", x, ["ash-s", "scale"], 0.9, backbone4, head4, 1e-4)


def test_react_from_model_fit_matches_pytorch_ood():
    ood = pytest.importorskip("pytorch_ood")
    model = _model("resnet18")
    backbone, head = _resnet_split(model, "avgpool")
    data = torch.utils.data.TensorDataset(_images((6, 3, 64, 64), seed=8), torch.tensor([0, 1, -1, 2, -1, 3]))
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    ours = ash_ext.ReAct.from_model(model, "avgpool").fit(loader)
    theirs = ood.detector.ReAct(backbone, head).fit(loader)
    assert ours.threshold == theirs.threshold
    x = _images((2, 3, 64, 64), seed=9)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
    assert hook_count(model) == 0


def test_from_model_with_an_explicit_head_and_hyperparameters():
    ood = pytest.importorskip("pytorch_ood")
    model = _model("resnet18")
    backbone, head = _resnet_split(model, "layer4")
    ours = ash_ext.ASH.from_model(model, "layer4", variant="ash-p", percentile=0.9, head=head)
    assert ours.head is head
    x = _images((2, 3, 64, 64), seed=10)
    ours.set_hyperparameters(percentile=0.95)  # predict uses the current value
    theirs = ood.detector.ASH(backbone, head, variant="ash-p", percentile=0.95)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.predict_feature_maps(backbone(x)), theirs(x), rtol=1e-9, atol=1e-9)


def test_from_model_inside_a_residual_block():
    """A layer inside a block is no cut: predict (one hooked forward) still works; the replayed
    head refuses."""
    model = _model("resnet18")
    detector = ash_ext.ASH.from_model(model, "layer4.0.bn1", percentile=0.7)
    x = _images((2, 3, 64, 64), seed=11)
    with torch.no_grad(), ash_ext.shaping(model, "layer4.0.bn1", "ash-s", 0.7):
        expected = energy(model(x))
    torch.testing.assert_close(detector(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="depends on more than"):
        detector.predict_feature_maps(detector.backbone(x))
    assert hook_count(model) == 0


def test_replayed_head_needs_an_input_shape_and_eval_mode():
    model = Toy().double().eval()
    detector = ash_ext.SCALE.from_model(model, "pool")
    fm = torch.rand(2, 6, 1, 1, dtype=torch.float64)  # the output of pool
    with pytest.raises(RuntimeError, match="example_input"):
        detector.predict_feature_maps(fm)
    seeded = ash_ext.SCALE.from_model(model, "pool", example_input=torch.zeros(1, 3, 5, 5, dtype=torch.float64))
    expected = energy(model.fc(torch.flatten(ash_ext.scale(fm, 0.65), 1)))
    torch.testing.assert_close(seeded.predict_feature_maps(fm), expected, rtol=1e-12, atol=1e-12)
    assert isinstance(seeded.head, ModelSuffix)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        seeded.predict_feature_maps(fm)
    model.eval()


def test_from_model_errors():
    model = Toy()
    with pytest.raises(ValueError, match="closest"):
        ash_ext.ASH.from_model(model, "head")
    with pytest.raises(ValueError, match="on must be"):
        ash_ext.ReAct.from_model(model, "pool", on="in")
    with pytest.raises(ash_ext.RequiresFittingException):
        ash_ext.ReAct.from_model(model, "pool")(torch.rand(1, 3, 4, 4))
    assert hook_count(model) == 0


# --------------------------------------------------------------------------------------------
# Layouts, autocast, compile
# --------------------------------------------------------------------------------------------


def test_channels_last_model():
    model = _model("resnet18", torch.float32)
    x = _images((2, 3, 64, 64), torch.float32)
    with torch.no_grad(), ash_ext.shaping(model, "layer4", "ash-s", 0.9):
        contiguous = energy(model(x))
    cl_model = torchvision.models.resnet18(weights=None).eval()
    cl_model.load_state_dict(model.state_dict())
    cl_model = cl_model.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    seen = []
    cl_model.layer4.register_forward_hook(
        lambda m, a, out: seen.append(out.is_contiguous(memory_format=torch.channels_last))
    )
    backbone, head = _resnet_split(cl_model, "layer4")
    with torch.no_grad():
        with ash_ext.shaping(cl_model, "layer4", "ash-s", 0.9):
            hooked = energy(cl_model(x_cl))
        by_hand = energy(head(ash_ext.ash_s(backbone(x_cl), 0.9)))
    assert seen and all(seen)
    assert torch.equal(hooked, by_hand)
    torch.testing.assert_close(hooked, contiguous, rtol=1e-4, atol=1e-4)
    detector = ash_ext.ASH.from_model(cl_model, "layer4", percentile=0.9)
    assert torch.equal(detector(x_cl), hooked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model = _model("resnet18", torch.float32)
    backbone, head = _resnet_split(model, "layer4")
    x = _images((2, 3, 64, 64), torch.float32)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            fm = backbone(x)
            by_hand = energy(head(ash_ext.ash_s(fm, 0.9)))
            with ash_ext.shaping(model, "layer4", "ash-s", 0.9):
                hooked = energy(model(x))
            detector_scores = ash_ext.ASH.from_model(model, "layer4", percentile=0.9)(x)
    except RuntimeError as error:  # a CPU op without this dtype
        if "not implemented for" in str(error):
            pytest.skip(f"CPU autocast to {dtype}: {error}")
        raise
    assert fm.dtype == dtype
    assert torch.equal(hooked, by_hand)
    assert torch.equal(detector_scores, by_hand)
    with torch.no_grad():
        full = energy(head(ash_ext.ash_s(backbone(x), 0.9)))
    torch.testing.assert_close(hooked.float(), full, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_torch_compile_through_hooks():
    torch._dynamo.reset()
    model = Toy().eval()
    x = torch.randn(3, 3, 5, 5, generator=_gen(12)) + 0.2
    compiled = torch.compile(model)
    with torch.no_grad():
        plain = model(x)
        with ash_ext.shaping(model, "body", "ash-s", 0.6):
            eager = model(x)
            shaped = compiled(x)
        after = compiled(x)  # the hook is gone: the compiled model must not keep shaping
    torch.testing.assert_close(shaped, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager, plain)
    assert hook_count(model) == 0
