"""The CPU kernel's ISA builds against each other: identical results, bit for bit.

The kernel is one source (csrc/cpu/cpu_kernel.h over vec16.h) compiled for baseline x86-64, AVX2
and AVX-512; this CPU runs some of them (``ash_ext.cpu_isas()``), and each is compared with the
baseline build on inputs that reach the edge cases: NaN and infinite thresholds or window bounds,
-0.0, subnormals, ties cut at any lane, partial last vectors, window guesses that miss, samples
split over threads, every dtype. Outputs are compared bit for bit, signed zeros included; only a
NaN's payload may differ (x86 keeps the first operand's payload when adding two NaNs), so NaN
compares equal to NaN.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_matches_oracle, bits_equal, same_values
from hypothesis import given, settings
from hypothesis import strategies as st

import ash_ext

pytestmark = pytest.mark.skipif(not ash_ext.extension_loaded(), reason="the extension is not built")

FUNCTIONS = {"ash-p": ash_ext.ash_p, "ash-b": ash_ext.ash_b, "ash-s": ash_ext.ash_s, "scale": ash_ext.scale}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
VECTOR_ISAS = [isa for isa in ash_ext.cpu_isas() if isa != "baseline"]
needs_vector_isa = pytest.mark.skipif(not VECTOR_ISAS, reason="this CPU runs only the baseline build")


def run_isas(variant: str, x: torch.Tensor, percentile: float, inplace: bool = False) -> tuple[torch.Tensor, ...]:
    """The variant's output from each ISA build this CPU runs, the baseline build's first."""
    if not VECTOR_ISAS:
        pytest.skip("this CPU runs only the baseline build: there is nothing to compare it with")
    fn = FUNCTIONS[variant]
    outputs = []
    for isa in ["baseline", *VECTOR_ISAS]:
        previous = ash_ext.set_cpu_isa(isa)
        try:
            assert ash_ext.cpu_isa() == isa
            source = x.clone() if inplace else x
            outputs.append(fn(source, percentile, inplace=inplace))
        finally:
            ash_ext.set_cpu_isa(previous)
    return tuple(outputs)


def run_both(variant: str, x: torch.Tensor, percentile: float, inplace: bool = False) -> tuple[torch.Tensor, ...]:
    """The best vector build's output and the baseline's (every build is checked by assert_same_bits)."""
    outputs = run_isas(variant, x, percentile, inplace)
    return outputs[-1], outputs[0]


def assert_same_bits(x: torch.Tensor, percentile: float, variant: str) -> None:
    baseline, *others = run_isas(variant, x, percentile)
    for isa, other in zip(VECTOR_ISAS, others):
        assert other.stride() == baseline.stride()
        assert same_values(other, baseline), (isa, variant, percentile, x.shape, x.dtype)


def special_mix(n_rows: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows mixing normal values, zeros of both signs, infinities, NaN, subnormals and repeats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n, generator=g, dtype=torch.float64)
    pick = torch.rand(n_rows, n, generator=g)
    tiny = torch.finfo(dtype).smallest_normal / 4  # subnormal in the dtype
    x[pick < 0.05] = 0.0
    x[(pick >= 0.05) & (pick < 0.1)] = -0.0
    x[(pick >= 0.1) & (pick < 0.12)] = float("inf")
    x[(pick >= 0.12) & (pick < 0.14)] = float("-inf")
    x[(pick >= 0.14) & (pick < 0.16)] = float("nan")
    x[(pick >= 0.16) & (pick < 0.18)] = tiny
    x[(pick >= 0.18) & (pick < 0.2)] = -tiny
    x[(pick >= 0.2) & (pick < 0.25)] = 0.5
    return x.to(dtype)


def test_isa_report_and_switch() -> None:
    isas = ash_ext.cpu_isas()
    assert isas[0] == "baseline" and ash_ext.cpu_isa() in isas
    previous = ash_ext.set_cpu_isa("baseline")
    try:
        assert ash_ext.cpu_isa() == "baseline" and not ash_ext.cpu_simd_enabled()
        assert ash_ext.set_cpu_isa("auto") == "baseline"
        assert ash_ext.cpu_isa() == isas[-1]
    finally:
        ash_ext.set_cpu_isa(previous)
    with pytest.raises(ValueError, match="unknown CPU ISA 'sse9'"):
        ash_ext.set_cpu_isa("sse9")
    with pytest.raises(TypeError):
        ash_ext.set_cpu_isa(2)  # type: ignore[arg-type]
    missing = [isa for isa in ash_ext.cpu_dispatch.CPU_ISA_NAMES if isa not in isas]
    for isa in missing:  # this CPU lacks it: the error names what it has
        with pytest.raises(ValueError, match=f"'{isa}'.*supports: {', '.join(isas)}"):
            ash_ext.set_cpu_isa(isa)
    assert ash_ext.cpu_isa() == previous


@pytest.mark.parametrize("isa", ash_ext.cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversions_of_every_16_bit_value(isa: str, dtype: torch.dtype) -> None:
    """The vector conversions (16-bit to float32 and back, round to nearest even) against torch's,
    on every bit pattern: one value per sample and percentile 0, so SCALE's factor is exp(1) for
    every finite non-zero value and its output is dtype(float32(x) * e)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    previous = ash_ext.set_cpu_isa(isa)
    try:
        out = ash_ext.scale(x, 0.0)
    finally:
        ash_ext.set_cpu_isa(previous)
    e = torch.tensor(1.0).exp()  # float32, as the kernel's factor
    wide = x.float()
    regular = torch.isfinite(wide) & (wide != 0)
    expected = (wide * e).to(dtype)
    assert torch.equal(out[regular].view(torch.int16), expected[regular].view(torch.int16))
    assert bool(out[wide.isnan()].isnan().all())  # s1 / s2 is NaN there


def _import_report(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import warnings; warnings.simplefilter('always'); import ash_ext; print(ash_ext.cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_and_its_alias() -> None:
    best = ash_ext.cpu_isas()[-1]
    assert _import_report({}).stdout.strip() == best
    assert _import_report({"ASH_EXT_CPU_ISA": "auto"}).stdout.strip() == best
    assert _import_report({"ASH_EXT_CPU_ISA": "baseline"}).stdout.strip() == "baseline"
    legacy = _import_report({"ASH_EXT_CPU_SIMD": "0"})
    assert legacy.stdout.strip() == "baseline" and "DeprecationWarning" in legacy.stderr
    assert _import_report({"ASH_EXT_CPU_SIMD": "1"}).stdout.strip() == best
    for isa in [isa for isa in ash_ext.cpu_dispatch.CPU_ISA_NAMES if isa not in ash_ext.cpu_isas()]:
        failed = _import_report({"ASH_EXT_CPU_ISA": isa})
        assert failed.returncode != 0 and f"ASH_EXT_CPU_ISA={isa}" in failed.stderr and "supports:" in failed.stderr


def _functions_with_wide_registers(library: str) -> dict[str, int]:
    """Functions of the library using ymm/zmm registers (AVX), by demangled name, with counts."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, int] = {}
    name = ""
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif "%ymm" in line or "%zmm" in line:
            found[name] = found.get(name, 0) + 1
    return found


@pytest.mark.skipif(shutil.which("objdump") is None or sys.platform != "linux", reason="needs objdump")
def test_no_avx_code_outside_the_isa_builds() -> None:
    """The ISA builds share headers with the rest of the library; the linker keeps one copy of each
    inline function, so one compiled with AVX would run on CPUs without it. Every function with
    AVX registers must belong to an ISA build's namespace (or be a libc/compiler routine)."""
    library = ash_ext._ops._C.__file__
    wide = _functions_with_wide_registers(library)
    isa_namespace = re.compile(r"ash_ext::(avx2|avx512)::")
    leaked = {name: count for name, count in wide.items() if not isa_namespace.search(name)}
    assert any(isa_namespace.search(name) for name in wide), "no ISA build's code found: the check sees nothing"
    assert not leaked, f"AVX code outside the ISA namespaces: {sorted(leaked)[:20]}"


@pytest.mark.skipif(shutil.which("objdump") is None or sys.platform != "linux", reason="needs objdump")
def test_no_vector_crosses_a_call() -> None:
    """GCC 12 can miscompile the return of a vector struct from a function under a target pragma
    (vzeroupper after loading the result into ymm0), so vec16's vectors must never be a real call's
    parameter: every function and lambda taking one is forced inline (ASH_EXT_VEC_LAMBDA)."""
    command = ["objdump", "-d", "-C", "--no-show-raw-insn", ash_ext._ops._C.__file__]
    listing = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    names = re.findall(r"^[0-9a-f]+ <(.*)>:$", listing, flags=re.MULTILINE)
    assert any("ash_ext::avx2::" in name or "ash_ext::baseline::" in name for name in names)
    taking_vectors = [name for name in names if "vec16::V<" in _parameters(name)]
    assert not taking_vectors, taking_vectors[:10]


def _parameters(name: str) -> str:
    """The parameter list of a demangled function name, with lambda types' own signatures removed
    (a lambda object as a parameter passes no vector)."""
    while True:
        stripped = re.sub(r"\{lambda\([^(){}]*\)#\d+\}", "{lambda}", name)
        if stripped == name:
            break
        name = stripped
    name = re.sub(r"( const)?( \[clone [^\]]*\])*$", "", name)
    if not name.endswith(")"):
        return ""
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[i:]
    return ""


# Every length for float32; the other dtypes (the same vector code at other lane widths) on the
# lengths that reach a partial last vector, a whole one, several sum blocks and the long radix.
LENGTHS = [1, 5, 16, 17, 31, 255, 2048, 4095, 4097, 16385, 20000]
DTYPE_LENGTHS = [(torch.float32, n) for n in LENGTHS] + [
    (dtype, n) for dtype in DTYPES[1:] for n in (5, 16, 31, 4097, 20000)
]


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("percentile", [0.0, 0.3, 0.65, 0.9, 0.999])
@pytest.mark.parametrize(("dtype", "n"), DTYPE_LENGTHS)
def test_relu_maps_any_length(variant: str, percentile: float, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g).relu_().to(dtype)
    assert_same_bits(x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("percentile", [0.1, 0.5, 0.65, 0.9])
@pytest.mark.parametrize("n", [7, 100, 3000, 40000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(variant: str, percentile: float, n: int, dtype: torch.dtype) -> None:
    assert_same_bits(special_mix(5, n, seed=n, dtype=dtype), percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize(
    "fill",
    [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38],
)
def test_thresholds_at_special_values(variant: str, fill: float) -> None:
    """Most of each sample is one special value, so the threshold (and the next sample's window) is it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3001, generator=g)
    x[:, ::3] = fill
    x[:, 1::7] = fill
    for percentile in (0.2, 0.5, 0.8):
        assert_same_bits(x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("levels", [1, 2, 3, 17])
def test_partial_ties_cut_at_every_lane(variant: str, levels: int) -> None:
    """Few distinct values: the threshold's ties are cut part-way, at offsets in every lane position."""
    g = torch.Generator().manual_seed(levels)
    n = 1000
    x = torch.randint(0, levels, (40, n), generator=g).float()
    for k in range(1, 40):
        percentile = 1.0 - (k * 23 + 0.25) / n
        assert_same_bits(x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_batches_that_make_the_window_miss(variant: str) -> None:
    """Samples of wildly different scales and signs, so each sample's window guess misses; and
    every sample equals its result computed alone (which takes a different path)."""
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-30, 1.0, 1e30, -1.0, 1e-3, 1e3, 1.0, -1e20, 1e-40 / 1e-45, 5.0])
    x = torch.randn(len(scales), 2500, generator=g) * scales[:, None]
    x[8] = torch.randn(2500, generator=g).abs() * 1e-45  # subnormals
    x[3, :100] = float("nan")
    simd, portable = run_both(variant, x, 0.7)
    assert same_values(simd, portable)
    assert_same_bits(x, 0.7, variant)
    for b in range(x.shape[0]):  # results depend on the sample only
        alone, _ = run_both(variant, x[b : b + 1], 0.7)
        assert bits_equal(alone, simd[b : b + 1])


def candidate_sets_that_defeat_interpolation(n: int, seed: int) -> torch.Tensor:
    """Rows whose values near the threshold are anything but evenly spread: two clusters of
    repeats, geometric spacing, one long run of ties with a few neighbours, a steep tail.
    Pass C estimates the threshold's key by interpolation; these make its windows miss above
    and below, collapse onto ties and run out of rounds (then radix digits finish)."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 1.0 + 2.0**-20),  # two adjacent keys
        torch.where(torch.rand(n, generator=g) < 0.3, 0.75, 1.5) + torch.randn(n, generator=g) * 1e-7,
        torch.exp2(torch.randint(-60, 60, (n,), generator=g).float()),  # one value per octave
        torch.exp2(-torch.rand(n, generator=g) * 40.0),  # log-uniform: keys crowd together
        torch.full((n,), 3.0),
        torch.randn(n, generator=g).relu_() ** 6,  # a steep tail: density far from even
    ]
    rows[4][torch.randperm(n, generator=g)[:7]] = torch.tensor([2.0, 4.0, 2.5, 3.5, 1.0, 5.0, 3.0 + 2.0**-22])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("n", [40, 2048, 50_000])
def test_candidate_sets_that_defeat_interpolation(variant: str, n: int) -> None:
    x = candidate_sets_that_defeat_interpolation(n, seed=n)
    for percentile in (0.1, 0.5, 0.65, 0.9, 0.999):
        for order in (x, x.flip(0), x.repeat(3, 1)):  # each row after each other: warm windows
            assert_same_bits(order, percentile, variant)
        if variant != "scale":
            assert_matches_oracle(FUNCTIONS[variant](x, percentile), x, percentile, variant)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_stale_guess_from_an_earlier_call(variant: str) -> None:
    """A call's first samples start from the thread's guess of the last call: whatever it was,
    the output is the same as from a fresh guess."""
    g = torch.Generator().manual_seed(4)
    first = torch.randn(16, 4000, generator=g) * 1e6
    second = torch.randn(16, 4000, generator=g).relu_() * 1e-6
    FUNCTIONS[variant](first, 0.5)  # leaves a guess far from the second call's thresholds
    after_stale = FUNCTIONS[variant](second, 0.9)
    simd, portable = run_both(variant, second, 0.9)
    assert bits_equal(after_stale, simd)
    assert same_values(simd, portable)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
@pytest.mark.parametrize("percentile", [0.65, 0.9])
def test_feature_maps_layouts_and_inplace(variant: str, percentile: float) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 256, 7, 7, generator=g).relu_()
    x[:, :, 0, 0] = 1.0  # ties, cut part-way in the channels_last layout's memory order too
    assert_same_bits(x, percentile, variant)
    assert_same_bits(x.to(memory_format=torch.channels_last), percentile, variant)
    simd, portable = run_both(variant, x, percentile, inplace=True)
    assert same_values(simd, portable)


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_split_samples_and_threads(variant: str) -> None:
    """A batch smaller than the thread count splits each sample over threads (chunks of whole
    sum blocks); the result equals the one-thread result and the portable loops'."""
    g = torch.Generator().manual_seed(6)
    x = special_mix(1, 150_001, seed=6)
    x[0, :5000] = torch.randn(5000, generator=g)
    assert_same_bits(x.half(), 0.6, variant)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        several = run_both(variant, x, 0.6)
        torch.set_num_threads(1)
        one = run_both(variant, x, 0.6)
    finally:
        torch.set_num_threads(threads)
    assert bits_equal(several[0], one[0])
    assert same_values(several[1], one[0]) and same_values(one[1], one[0])


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_gradients_match(variant: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3000, generator=g)
    grad = torch.randn(5, 3000, generator=g)
    results = []
    for isa in ["baseline", *VECTOR_ISAS]:
        previous = ash_ext.set_cpu_isa(isa)
        try:
            leaf = x.clone().requires_grad_()
            FUNCTIONS[variant](leaf, 0.8).backward(grad)
            results.append(leaf.grad)
        finally:
            ash_ext.set_cpu_isa(previous)
    assert all(same_values(other, results[0]) for other in results[1:])


@pytest.mark.parametrize("variant", list(FUNCTIONS))
def test_matches_the_oracle(variant: str) -> None:
    """Not only equal to the portable loops: right, against the float64 oracle."""
    x = special_mix(6, 2048, seed=8)
    x[:3] = torch.randn(3, 2048, generator=torch.Generator().manual_seed(8)).relu_()
    for isa in ash_ext.cpu_isas():
        previous = ash_ext.set_cpu_isa(isa)
        try:
            for percentile in (0.3, 0.65, 0.9):
                if variant != "scale":
                    assert_matches_oracle(FUNCTIONS[variant](x, percentile), x, percentile, variant)
        finally:
            ash_ext.set_cpu_isa(previous)


finite_or_special = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(finite_or_special, min_size=40, max_size=40), min_size=1, max_size=4),
    percentile=st.floats(0.0, 1.0),
    variant=st.sampled_from(list(FUNCTIONS)),
)
def test_property_same_bits(rows: list[list[float]], percentile: float, variant: str) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    assert_same_bits(x, percentile, variant)
