"""tools/build_extension.py: what it announces and how it names each compile step."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("build_extension", os.path.join(ROOT, "tools", "build_extension.py"))
build_extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_extension)


def test_announce_names_what_is_built_and_estimates(capsys, monkeypatch):
    monkeypatch.setattr(build_extension, "ROOT", "/nonexistent")  # no earlier build: a first build
    plan = build_extension.PLAN.search("ash_ext: building the CPU and CUDA kernels for 8.0;9.0")
    build_extension.announce(plan, jobs=2)
    text = capsys.readouterr().out
    cores = min(2, os.cpu_count() or 1)
    seconds = (build_extension.CPU_CORE_SECONDS + 2 * build_extension.CUDA_CORE_SECONDS_PER_ARCH) / cores
    assert "CUDA kernels for 2 architecture(s) (sm_80, sm_90)" in text
    assert f"about {build_extension.minutes(seconds)}" in text
    plan = build_extension.PLAN.search("ash_ext: building the CPU kernel only")
    build_extension.announce(plan, jobs=2)
    assert "CPU kernel only" in capsys.readouterr().out


def test_steps_are_named_by_their_source_file():
    line = "[3/11] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c /r/csrc/cuda/ash_cuda_half.cu -o x"
    step = build_extension.STEP.match(line)
    assert step and step.group(1) == "3" and step.group(2) == "11"
    assert build_extension.describe(step.group(3)) == "csrc/cuda/ash_cuda_half.cu"
    assert build_extension.describe("c++ -MMD -c /r/csrc/cpu/isa_avx2.cpp -o y") == "csrc/cpu/isa_avx2.cpp"
    assert build_extension.minutes(125.4) == "2:05"
