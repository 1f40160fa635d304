"""TorchScript: ``torch.jit.trace`` and ``torch.jit.script`` of models that call the public
functions, saved, loaded and run; equal to eager (the same op runs, so bit for bit)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import ash_ext
from ash_ext.scripting import round_half_even

needs_kernel = pytest.mark.skipif(not ash_ext.extension_loaded(), reason="the compiled extension is not built")
pytestmark = [needs_kernel, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")]


class Backbone(nn.Module):
    """A conv block, then one call per public shaping function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x).relu()
        a = ash_ext.ash_p(z, 0.6)
        b = ash_ext.ash_b(z, 0.75)
        s = ash_ext.ash_s(z, percentile=0.5, clip=0.8)
        c = ash_ext.scale(z, 0.9)
        d = ash_ext.shape(z, 0.25, "ASH_S")  # any spelling, under script too
        return a + b + s + c + d


class PerSample(nn.Module):
    """A [B] tensor of fractions (one k per sample) and the in-place form."""

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        y = ash_ext.ash_s(x, p)
        z = x.clone()
        ash_ext.ash_b(z, 0.5, inplace=True)
        return y + z


def ash_p_at_quarter(x: torch.Tensor) -> torch.Tensor:
    return ash_ext.ash_p(x, 0.25)


def misspelt_variant(x: torch.Tensor) -> torch.Tensor:
    return ash_ext.shape(x, 0.5, "ash-q")


def percent_not_fraction(x: torch.Tensor) -> torch.Tensor:
    return ash_ext.ash_s(x, 1.5)


def roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Save and load, as a deployment would."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def tied(shape: tuple[int, ...]) -> torch.Tensor:
    """Values on a few levels, so most samples have ties at the threshold."""
    return torch.randint(-2, 3, shape).float() / 2


@pytest.mark.parametrize("how", ["trace", "script"])
def test_conv_model_exports_and_matches_eager(how):
    torch.manual_seed(0)
    model = Backbone().eval()
    example = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a trace that would be wrong warns
        exported = torch.jit.trace(model, example) if how == "trace" else torch.jit.script(model)
    loaded = roundtrip(exported)
    assert "ash_ext::ash" in str(loaded.graph) or "ash_ext.functional" in loaded.code
    for batch in (2, 5, 1):  # other batch sizes than the traced one: k depends only on n
        for x in (torch.randn(batch, 3, 6, 6), tied((batch, 3, 6, 6))):
            with torch.no_grad():
                assert torch.equal(loaded(x), model(x))


def test_script_per_sample_percentiles_and_inplace():
    model = PerSample()
    scripted = roundtrip(torch.jit.script(model))
    x = tied((4, 10, 3))
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])  # k = n, half-even rounding, k = 0
    assert torch.equal(scripted(x, p), model(x, p))
    with pytest.raises(Exception, match="fraction"):
        scripted(x, torch.tensor([0.5, 1.5, 0.5, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_script_every_dtype(dtype):
    model = Backbone().to(dtype)
    scripted = roundtrip(torch.jit.script(model))
    x = torch.randn(3, 3, 5, 5, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


def test_script_k_matches_eager_rounding():
    """k = n - round(n * p), half to even, for products that are exact halves and for others."""
    for n in (10, 14, 49, 2048):
        for p in (0.05, 0.25, 0.35, 0.5, 0.65, 0.75, 0.9, 0.95):
            assert round_half_even(n * p) == round(n * p), (n, p)
    x = torch.randn(2, 10)
    fn = torch.jit.script(ash_p_at_quarter)  # n * p = 2.5: k = 8, not 7
    assert int((fn(x) != 0).sum()) == 2 * ash_ext.kept_count(10, 0.25) == 16


def test_script_errors_name_the_bad_value():
    scripted = torch.jit.script(misspelt_variant)
    with pytest.raises(Exception, match="ash-q"):
        scripted(torch.randn(2, 4))
    scripted = torch.jit.script(percent_not_fraction)
    with pytest.raises(Exception, match="fraction"):
        scripted(torch.randn(2, 4))
