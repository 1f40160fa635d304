"""The ``ash-ext`` command line: ``bench`` (tiny runs, the files it writes, bad options) and help."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ash_ext
from ash_ext.__main__ import main
from ash_ext._semantics import check_variant
from ash_ext.bench import cases, cli, correctness, estimate, family, impls, report, runner, timing
from ash_ext.bench.config import BenchConfig
from ash_ext.bench.estimate import TimingPlan
from ash_ext.bench.family import report as family_report
from ash_ext.bench.machine import machine_info

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
    "--wait-quiet",
    "0",
]


def test_tiny_run_writes_json_csv_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "resnet50-pooled", *TINY, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # the forecast comes first, the wall time beside it at the end
    assert re.search(r"ash_ext bench: 1 cases on cpu \(.*threads\): about \d+ s\n", captured.err)
    assert re.search(r"1 cases in \d+ s \(forecast \d+ s\)", out)
    for column in report.TABLE_COLUMNS:
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
    assert ("pytorch-ood" in timed) == (impls.pytorch_ood_version() is not None)
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
    config = BenchConfig(
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
    data = runner.run(config)
    (row,) = data["results"]
    assert set(row["timings"]) == {"reference", "ash_ext", "clone"}
    assert row["mask_mismatch"] == 0
    assert row["max_rel_dev"] <= correctness.deviation_tolerance("bfloat16")
    assert row["same_dtype_reference"]["mask_mismatch"] == 0
    assert "float32" in row["deviation_baseline"]
    table = report.format_table(data["results"], markdown=True)
    assert table.splitlines()[0].startswith("| shape")


def test_default_suite_has_the_readme_headline_shapes() -> None:
    # the CPU targets of the README's performance section: [64, 2048, 7, 7] and [256, 2048] (and the
    # CPU ISA suite's [8, 2048, 7, 7]), every variant at p = 0.65 and 0.9, in float32
    suite = cases.suite("cpu")
    for size in ([64, 2048, 7, 7], [256, 2048], [8, 2048, 7, 7]):
        chosen = {(c.variant, c.percentile) for c in suite if list(c.size) == size and c.dtype == "float32"}
        assert chosen == {(v, p) for v in cases.VARIANTS for p in (0.65, 0.9)}, size
    assert BenchConfig(device="cpu", methods=["all"]).cases() == suite  # what make bench runs


def test_the_forecast_follows_the_timing_loop() -> None:
    plan = TimingPlan(min_time=0.02, warmup=1, min_reps=5, slow_min_reps=3, slow_call_s=0.004, max_reps=200, threads=2)
    fast = 1e-4 - estimate.CALL_OVERHEAD_S
    assert plan.timed_seconds(fast) == pytest.approx((1 + 200) * 1e-4)  # min_time / 1e-4 = 200 calls
    assert plan.timed_seconds(0.1 - estimate.CALL_OVERHEAD_S) == pytest.approx(4 * 0.1)  # warm-up + 3 slow reps
    default = BenchConfig(device="cpu", methods=["all"])
    quick = BenchConfig(device="cpu", methods=["all"], quick=True)
    assert 0 < runner.estimated_seconds(quick) < runner.estimated_seconds(default)
    assert 0 < family.estimated_seconds(quick) < family.estimated_seconds(default)
    longer = BenchConfig(device="cpu", methods=["all"], min_time=0.2)
    assert runner.estimated_seconds(longer) > runner.estimated_seconds(default)
    assert [estimate.format_duration(s) for s in (0.2, 44.6, 60, 131, 7322)] == [
        "1 s",
        "45 s",
        "1 min",
        "2 min 10 s",
        "2 h 02 min",
    ]


def test_suites_cover_the_issue() -> None:
    suite = cases.suite("cpu")
    assert {c.shape for c in suite} == set(cases.SHAPES)
    assert {c.variant for c in suite} == {"ash-p", "ash-b", "ash-s"}
    assert {c.percentile for c in suite} == {0.65, 0.9}
    assert {c.dtype for c in suite} == {"float32", "float16", "bfloat16"}
    assert min(c.batch for c in suite) == 1 and max(c.batch for c in suite) == 256
    assert {c.batch for c in cases.suite("cuda")} >= {1, 256}
    quick = cases.suite("cpu", quick=True)
    assert {c.dtype for c in quick} == {"float32"} and len(quick) < len(suite)
    assert set(cases.pytest_cases("cpu")) <= set(quick)
    assert cases.pytest_cases("cpu", all_cases=True) == suite
    assert len({c.id for c in suite}) == len(suite)


@pytest.mark.skipif(not ash_ext.extension_loaded(), reason="the extension is not built")
def test_cpu_isa_option_runs_that_build_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = ash_ext.cpu_isa()
    try:
        args = ["bench", "--shapes", "resnet50-pooled", *TINY, "--cpu-isa", "baseline", "--out", str(tmp_path)]
        assert main(args) == 0
        assert ash_ext.cpu_isa() == "baseline"
    finally:
        ash_ext.set_cpu_isa(before)
    assert "(CPU kernel: baseline)" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["machine"]["ash_ext_cpu_isa"] == "baseline"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "resnet18"], "unknown shape"),
        (["--batches", "0"], "positive integer"),
        (["--batches", "two"], "positive integer"),
        (["--dtypes", "float8"], "unknown dtype"),
        (["--percentiles", "65"], "did you mean 0.65"),
        (["--percentiles", "x"], "not a number"),
        (["--variants", "ash-q"], "--variants: variant must be one of ash-p, ash-b, ash-s, all"),
        (["--variants", "scale"], "--variants: variant must be one of ash-p, ash-b, ash-s, all"),  # a family method
        (["--variants", ","], "--variants: no variant given"),
        (["--impls", "numpy"], "unknown implementation"),
        (["--device", "tpu"], "--device"),
        (["--min-reps", "0"], "at least 1"),
        (["--min-time", "-1"], "positive"),
        (["--wait-quiet", "-1"], "--wait-quiet must be 0 or more"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--cpu-isa", "sse9"], "unknown CPU ISA"),
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
    case = cases.Case("vit-b16-cls", 2, "float32", 0.65, "ash-p")
    shared, own = timing.make_rotations(case, "cpu", cache_bytes=4 * case.nbytes, memory_budget_bytes=1 << 20)
    assert own is not None and len(own) == len(shared) == 8  # inputs of twice the "cache" in all
    assert len({x.data_ptr() for x in shared.inputs}) == len(shared)
    for _ in range(len(own)):
        own.take().fill_(-1.0)  # what an in-place function does to its input
    first = own.take()
    assert torch.equal(first, shared.inputs[0])
    assert not bool((shared.buffer == -1.0).any())


@pytest.mark.parametrize("spelling", ["ash-s", "ASH-S", "ash_s", "Ash_S"])
def test_variant_spellings_are_the_apis(spelling: str) -> None:
    parser = cli.build_parser()
    config = cli.parse_config(parser, parser.parse_args(["--device", "cpu", "--variants", spelling]))
    assert config.variants == ["ash-s"]
    assert check_variant(spelling) == "ash-s"  # the API takes the same spelling
    assert [c.variant for c in cases.suite("cpu", quick=True, shapes=["vit-b16-cls"], variants=[spelling])] == [
        "ash-s",
        "ash-s",
    ]


@pytest.mark.parametrize("spelling", ["s", "ash-x", "p", "ashs"])
def test_variants_the_api_rejects_are_rejected(
    spelling: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        check_variant(spelling)  # the API's rule: no bare shorthand
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--variants", spelling, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    valid = "ash-p, ash-b, ash-s, all (any case, '_' or '-')"
    assert f"--variants: variant must be one of {valid}, got {spelling!r}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="variant must be one of ash-p, ash-b, ash-s, all"):
        BenchConfig(device="cpu", variants=[spelling])


def test_variants_all_and_groups_expand() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["--device", "cpu", "--variants", "ash-b,ALL", "--methods", "Family", "ash"])
    config = cli.parse_config(parser, args)
    assert config.variants == ["ash-b", "ash-p", "ash-s"]
    assert config.methods == ["ash", *family.METHODS]
    assert BenchConfig(variants=["all"], methods=["React_Fit"]).variants == list(cases.VARIANTS)
    assert BenchConfig(methods=["React_Fit"]).methods == ["react-fit"]


def test_deviation_names_a_reference_that_gives_nan() -> None:
    # Keeping k = 0 values: the reference's ASH-S computes 0 * exp(s1 / 0); ash_ext documents zeros.
    case = cases.Case("vit-b16-cls", 2, "float32", 1.0, "ash-s")
    dev = correctness.deviation(case, "cpu")
    assert dev["reference_nonfinite"] and not dev["ash_ext_nonfinite"]
    row = {"case": case.id, "dtype": case.dtype, **dev}
    assert report._fmt_dev(row) == "ref inf/NaN" and not correctness.dev_too_large(row)


# --------------------------------------------------------------------------------------------
# --methods: the family (ash_ext.bench.family)
# --------------------------------------------------------------------------------------------

FAMILY_TINY = [
    "--device",
    "cpu",
    "--shapes",
    "resnet50-pooled",
    "--batches",
    "2",
    "--percentiles",
    "0.65",
    "--quick",
    "--no-progress",
    "--min-time",
    "0.002",
    "--wait-quiet",
    "0",
]


def test_family_tiny_run_writes_json_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--methods", "family", *FAMILY_TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for column in family.TABLE_COLUMNS:
        assert column in out
    assert "speed-up of ash_ext over the reference" in out

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["suite"] == "family" and data["meta"]["interrupted"] is False
    assert data["meta"]["machine"]["ash_ext"] == ash_ext.__version__
    rows = data["results"]
    assert [r["method"] for r in rows] == list(family.METHODS)
    for row in rows:
        assert row["ok"], row
        assert row["mismatch"] == 0
        timed = set(row["timings"])
        assert {"reference", "ash_ext", "roofline"} <= timed
        assert ("fallback" in timed) == (row["method"] != "react-fit")
        assert ("ash_ext_scalar_p" in timed) == (row["method"] == "per-sample")
        for summary in row["timings"].values():
            assert summary["reps"] >= 3 and len(summary["samples_ms"]) == summary["reps"]
        ref, ext = row["timings"]["reference"]["median_ms"], row["timings"]["ash_ext"]["median_ms"]
        assert math.isclose(row["speedup_vs_reference"], ref / ext)
        assert row["max_rel_dev"] <= correctness.deviation_tolerance("float32")
    by_method = {r["method"]: r for r in rows}
    assert by_method["lts"]["percentile"] == 0.05 and by_method["react-fit"]["percentile"] == 0.9
    assert by_method["react-ash"]["clip"] == pytest.approx(family.clip_value("abs"))
    assert by_method["per-sample"]["k_min"] < by_method["per-sample"]["k_max"]
    assert by_method["react-fit"]["ash_ext_value"] == by_method["react-fit"]["reference_value"]
    assert not (tmp_path / "speedup.png").exists()

    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == [r["case"] for r in rows]
    assert float(table[0]["ash_ext_median_ms"]) == pytest.approx(rows[0]["timings"]["ash_ext"]["median_ms"])


def test_methods_all_writes_the_ash_and_the_family_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*FAMILY_TINY, "--variants", "ash-s", "--no-plot", "--out", str(tmp_path)]
    assert main(["bench", "--methods", "all", *args]) == 0
    captured = capsys.readouterr()
    out = captured.out
    forecast = r"the timing will take about \d+ s: 1 ASH cases \(~\d+ s\), then 6 family cases \(~\d+ s\)"
    assert re.search(forecast, captured.err.splitlines()[0]), captured.err
    assert "ash-s" in out and "pytorch-ood scale" in out
    ash_rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["case"] for r in ash_rows] == ["resnet50-pooled-B2-float32-p0.65-ash-s"]
    family_data = json.loads((tmp_path / "family-results.json").read_text())
    assert {r["method"] for r in family_data["results"]} == set(family.METHODS)
    assert (tmp_path / "family-results.csv").exists()


def test_methods_select_and_expand() -> None:
    assert family.expand_methods(["ash"]) == ["ash"]
    assert family.expand_methods(["family"]) == list(family.METHODS)
    assert family.expand_methods(["all"]) == ["ash", *family.METHODS]
    assert family.expand_methods(["LTS", "react_fit", "ash"]) == ["ash", "lts", "react-fit"]
    with pytest.raises(ValueError, match="method must be one of ash, scale, .*, family, all"):
        family.expand_methods(["odin"])
    # --impls: clone stands for the roofline and pytorch-ood for the reference; ash_ext is always timed
    assert family.impl_names(["pytorch-ood", "clone"]) == ["reference", "ash_ext", "roofline"]
    assert family.impl_names(list(impls.IMPLEMENTATIONS)) == list(family.IMPLEMENTATIONS)
    # ash alone keeps today's suite; the family alone has no ASH cases
    assert BenchConfig(device="cpu", quick=True, methods=["ash"]).cases() == cases.suite("cpu", quick=True)
    assert BenchConfig(device="cpu", methods=["lts"]).cases() == []
    config = BenchConfig(device="cpu", methods=["lts"], shapes=["resnet18-pooled"])
    assert [c.id for c in family.family_cases(config)] == ["lts-resnet18-pooled-B64-float32-p0.05"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "odin"], "--methods: method must be one of ash, scale, react-ash, lts, topk-stats"),
        (["--methods", "family", "--shapes", "resnet34"], "unknown shape"),
        (["--shapes", "resnet18-pooled"], "unknown shape"),  # ASH's shapes only without family methods
    ],
)
def test_bad_family_options_exit_nonzero(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_family_suite_covers_the_issue() -> None:
    suite = family.suite("cpu")
    assert {c.method for c in suite} == set(family.METHODS)
    assert len({c.id for c in suite}) == len(suite)
    lts = {(c.batch, c.n, c.spec.data) for c in suite if c.method == "lts"}
    assert {(256, 2048, "abs"), (64, 512, "abs"), (512, 768, "normal")} <= lts  # ViT-like: signed values
    fits = sorted(c.numel for c in suite if c.method == "react-fit")
    assert fits[0] >= 10_000_000 and fits[-1] >= 50_000_000
    assert {c.percentile for c in suite if c.method == "scale"} == {0.65, 0.9}
    quick = family.suite("cpu", quick=True)
    assert {c.method for c in quick} == set(family.METHODS) and len(quick) < len(suite)
    assert {c.dtype for c in suite} == {"float32"}
    half = family.suite("cpu", methods=["react-fit", "scale"], quick=True, dtypes=["bfloat16"])
    assert {c.method for c in half} == {"scale"}  # numpy has no bfloat16: the fit stays float32/float64


def _wrong(case: family.FamilyCase) -> object:
    """A plausible but wrong ash_ext result for ``case``: a nearby percentile, or the clip left out."""
    p = case.percentile
    return {
        "scale": lambda x: ash_ext.scale(x, p - 0.05),
        "react-ash": lambda x: ash_ext.ash_s(x, p),
        "lts": lambda x: ash_ext.lts_factor(x, p * 2),
        "topk-stats": lambda x: ash_ext.topk_stats(x, p - 0.05),
        "per-sample": lambda x: ash_ext.ash_s(x, p),
        "react-fit": lambda x: ash_ext.react_threshold(x, p - 0.01),
    }[case.method]


@pytest.mark.parametrize("method", family.METHODS)
def test_family_deviation_check_catches_a_wrong_result(method: str) -> None:
    shape, batch = ("vit-b16-cls", 8) if method != "react-fit" else ("resnet50-pooled", 4)
    p = family.FIXED_PERCENTILES.get(method, 0.65)
    case = family.FamilyCase(method, shape, batch, "float32", p)
    good = family.deviation(case, "cpu")
    assert good["ok"] and good["mismatch"] == 0, good
    bad = family.deviation(case, "cpu", ash_ext_fn=_wrong(case))  # type: ignore[arg-type]
    assert not bad["ok"], bad
    row = {"case": case.id, "method": method, **bad}
    assert family_report._fmt_dev(row).endswith("FAIL")
    data = {
        "meta": {"machine": machine_info("cpu")},
        "results": [{**row, "timings": {}, "ash_ext_implementation": "x"}],
    }
    assert any("DEVIATES" in line for line in family.summary_lines(data))


def test_family_deviation_on_half_precision() -> None:
    case = family.FamilyCase("react-ash", "densenet100", 2, "bfloat16", 0.9)
    dev = family.deviation(case, "cpu")
    assert dev["ok"] and dev["mismatch"] == 0, dev
    assert "float32" in dev["deviation_baseline"]


def test_per_sample_reference_equals_pytorch_ood_row_by_row() -> None:
    pood_ash = pytest.importorskip("pytorch_ood.detector.ash")
    case = family.FamilyCase("per-sample", "wrn28-10", 3, "float64", 0.65)
    x = family.deviation_input(case, "cpu")
    ps = family.per_sample_percentiles(case, "cpu")
    assert ps.tolist() == pytest.approx([0.6, 0.65, 0.7])
    got = family.per_sample_ash_s_reference(x, ps)
    for i in range(case.batch):  # the test's own loop: pytorch-ood takes one percentile per call
        torch.testing.assert_close(got[i : i + 1], pood_ash.ash_s(x[i : i + 1], float(ps[i])), rtol=1e-12, atol=0)


def test_torch_copies_of_the_references_equal_pytorch_ood(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pytorch_ood.detector.scale")
    real = family.reference_functions()
    monkeypatch.setattr(impls, "pytorch_ood_version", lambda: None)
    copies = family.reference_functions()
    assert copies["scale"] is not real["scale"]
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64).abs()
    z = torch.randn(4, 64, dtype=torch.float64)
    torch.testing.assert_close(copies["scale"](x, 0.65), real["scale"](x, 0.65), rtol=1e-12, atol=0)
    torch.testing.assert_close(copies["ash_s"](x, 0.65), real["ash_s"](x, 0.65), rtol=1e-12, atol=0)
    torch.testing.assert_close(copies["lts"](z, 0.05), real["lts"](z, 0.05), rtol=1e-12, atol=0)
    stats = family.topk_stats_reference(x, 10)
    flat = x.reshape(4, -1)
    assert torch.equal(stats[0], flat.sort(dim=1, descending=True).values[:, 9])
