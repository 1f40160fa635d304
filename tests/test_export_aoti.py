"""torch.export + AOTInductor: a model with ASH inside compiled into a ``.pt2`` package, loaded
and run from it in a fresh process (which needs only ``import ash_ext`` for the op), equal to
eager within float32's tolerance (Inductor's own conv/linear/mean may round differently; the ASH
op itself is ash_ext's kernel, called from the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ash_ext

pytestmark = pytest.mark.skipif(not ash_ext.extension_loaded(), reason="the compiled extension is not built")


class Classifier(nn.Module):
    """conv -> ReLU -> ASH-S (ReAct clip) and ASH-B -> pooled -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x).relu()
        z = ash_ext.ash_s(z, 0.65, clip=1.0) + ash_ext.shape(z, 0.9, "ash-b")
        return self.fc(z.mean((2, 3)))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The model, exported with a dynamic batch and compiled once for the module's tests."""
    torch.manual_seed(0)
    model = Classifier().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 6, 6),), dynamic_shapes={"x": {0: batch}})
    assert "torch.ops.ash_ext.ash.default" in program.graph_module.code
    path = str(tmp_path_factory.mktemp("aoti") / "classifier.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return model, path


def test_package_runs_in_process(package):
    model, path = package
    loaded = torch._inductor.aoti_load_package(path)
    for batch in (2, 7):
        x = torch.randn(batch, 3, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_package_runs_in_a_fresh_process(package, tmp_path):
    model, path = package
    x = torch.randn(5, 3, 6, 6)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import torch, ash_ext  # ash_ext registers the op the package calls
        loaded = torch._inductor.aoti_load_package({path!r})
        torch.save(loaded(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x), rtol=1e-5, atol=1e-5)
