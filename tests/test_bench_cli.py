"""The ``ash-ext`` command line: ``bench`` (tiny runs, the files it writes, bad options) and help."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ash_ext
from ash_ext import bench
from ash_ext.__main__ import main

TINY = [
    "--device",
    "cpu",
    "--batches",
    "2",
    "--variants",
    "ash-s",
    "--dtypes",
    "float32",
    "--percentiles",
    "0.65",
    "--quick",
    "--no-progress",
    "--min-time",
    "0.002",
]


def test_tiny_run_writes_json_csv_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "resnet50-pooled", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for column in bench.TABLE_COLUMNS:
        assert column in out
    assert "resnet50-pooled" in out

    data = json.loads((tmp_path / "results.json").read_text())
    machine = data["meta"]["machine"]
    keys = ("platform", "cpu", "python", "torch", "ash_ext", "pytorch_ood", "device", "device_name", "torch_threads")
    assert set(keys) <= set(machine)
    assert machine["ash_ext"] == ash_ext.__version__
    assert machine["torch"] == torch.__version__
    assert machine["device"] == "cpu"
    assert data["meta"]["data"]["resnet50-pooled"]
    assert data["meta"]["interrupted"] is False

    (row,) = data["results"]
    assert row["case"] == "resnet50-pooled-B2-float32-p0.65-ash-s"
    assert row["size"] == [2, 2048] and row["k"] == 2048 - round(2048 * 0.65)
    timed = set(row["timings"])
    assert {"reference", "fallback", "ash_ext", "clone"} <= timed
    assert ("pytorch-ood" in timed) == (bench.pytorch_ood_version() is not None)
    for summary in row["timings"].values():
        assert summary["reps"] >= 3 and len(summary["samples_ms"]) == summary["reps"]
        assert 0 < summary["min_ms"] <= summary["median_ms"] <= summary["max_ms"]
    ref, ext = row["timings"]["reference"]["median_ms"], row["timings"]["ash_ext"]["median_ms"]
    assert math.isclose(row["speedup_vs_reference"], ref / ext)
    assert row["ash_ext_gbps"] > 0 and row["pct_of_clone"] > 0
    assert row["mask_mismatch"] == 0
    assert row["max_rel_dev"] < 1e-5
    assert row["ash_ext_implementation"] == ash_ext.implementation_for(torch.zeros(2, 2))

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    assert rows[0]["case"] == row["case"]
    assert float(rows[0]["ash_ext_median_ms"]) == pytest.approx(ext)
    assert rows[0]["torch"] == torch.__version__

    png = tmp_path / "speedup.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()
        assert "matplotlib is not installed" in out


def test_library_run_half_dtype_on_feature_maps() -> None:
    config = bench.BenchConfig(
        device="cpu",
        shapes=["densenet100"],
        batches=[1],
        variants=["ash-b"],
        dtypes=["bfloat16"],
        percentiles=[0.9],
        impls=["reference", "ash_ext", "clone"],
        min_time=0.002,
        progress=False,
    )
    data = bench.run(config)
    (row,) = data["results"]
    assert set(row["timings"]) == {"reference", "ash_ext", "clone"}
    assert row["mask_mismatch"] == 0
    assert row["max_rel_dev"] <= bench.deviation_tolerance("bfloat16")
    assert row["same_dtype_reference"]["mask_mismatch"] == 0
    assert "float32" in row["deviation_baseline"]
    table = bench.format_table(data["results"], markdown=True)
    assert table.splitlines()[0].startswith("| shape")


def test_suites_cover_the_issue() -> None:
    cases = bench.suite("cpu")
    assert {c.shape for c in cases} == set(bench.SHAPES)
    assert {c.variant for c in cases} == {"ash-p", "ash-b", "ash-s"}
    assert {c.percentile for c in cases} == {0.65, 0.9}
    assert {c.dtype for c in cases} == {"float32", "float16", "bfloat16"}
    assert min(c.batch for c in cases) == 1 and max(c.batch for c in cases) == 256
    assert {c.batch for c in bench.suite("cuda")} >= {1, 256}
    quick = bench.suite("cpu", quick=True)
    assert {c.dtype for c in quick} == {"float32"} and len(quick) < len(cases)
    assert set(bench.pytest_cases("cpu")) <= set(quick)
    assert bench.pytest_cases("cpu", all_cases=True) == cases
    assert len({c.id for c in cases}) == len(cases)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "resnet18"], "unknown shape"),
        (["--batches", "0"], "positive integer"),
        (["--batches", "two"], "positive integer"),
        (["--dtypes", "float8"], "unknown dtype"),
        (["--percentiles", "65"], "did you mean 0.65"),
        (["--percentiles", "x"], "not a number"),
        (["--variants", "ash-q"], "unknown variant"),
        (["--impls", "numpy"], "unknown implementation"),
        (["--device", "tpu"], "--device"),
        (["--min-reps", "0"], "at least 1"),
        (["--min-time", "-1"], "positive"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_options_exit_nonzero_with_a_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda", "--no-files"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark"]) == 2
    assert "unknown subcommand 'benchmark'" in capsys.readouterr().err


def test_python_m_ash_ext_without_arguments_lists_the_subcommands() -> None:
    done = subprocess.run([sys.executable, "-m", "ash_ext"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "bench" in done.stdout and "demo" in done.stdout


def test_inplace_rotation_is_refilled_before_it_wraps_around() -> None:
    case = bench.Case("vit-b16-cls", 2, "float32", 0.65, "ash-p")
    shared, own = bench.make_rotations(case, "cpu", cache_bytes=4 * case.nbytes, memory_budget_bytes=1 << 20)
    assert own is not None and len(own) == len(shared) == 8  # inputs of twice the "cache" in all
    assert len({x.data_ptr() for x in shared.inputs}) == len(shared)
    for _ in range(len(own)):
        own.take().fill_(-1.0)  # what an in-place function does to its input
    first = own.take()
    assert torch.equal(first, shared.inputs[0])
    assert not bool((shared.buffer == -1.0).any())


def test_deviation_names_a_reference_that_gives_nan() -> None:
    # Keeping k = 0 values: the reference's ASH-S computes 0 * exp(s1 / 0); ash_ext documents zeros.
    case = bench.Case("vit-b16-cls", 2, "float32", 1.0, "ash-s")
    dev = bench.deviation(case, "cpu")
    assert dev["reference_nonfinite"] and not dev["ash_ext_nonfinite"]
    row = {"case": case.id, "dtype": case.dtype, **dev}
    assert bench._fmt_dev(row) == "ref inf/NaN" and not bench._dev_too_large(row)
