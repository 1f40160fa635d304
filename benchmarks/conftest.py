"""Options of the pytest-benchmark suite in this folder.

``--ash-all`` (or ``ASH_EXT_BENCH_ALL=1``) runs every case of ``ash-ext bench``'s default suite
(and of ``--methods family``'s) instead of the short subset; ``--ash-device`` (or
``ASH_EXT_BENCH_DEVICE``) picks the device (default: cuda if available, else cpu).
"""

from __future__ import annotations

import os

import pytest
import torch

from ash_ext.bench import cases, family, impls


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--ash-all`` and ``--ash-device``."""
    group = parser.getgroup("ash_ext benchmarks")
    group.addoption(
        "--ash-all",
        action="store_true",
        default=False,
        help="benchmark every case of the default suite (also ASH_EXT_BENCH_ALL=1)",
    )
    group.addoption("--ash-device", default=None, help="device to benchmark on (also ASH_EXT_BENCH_DEVICE)")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def bench_device(config: pytest.Config) -> torch.device:
    """The device of the suite: ``--ash-device``, else ``ASH_EXT_BENCH_DEVICE``, else the best available."""
    name = config.getoption("--ash-device", default=None) or os.environ.get("ASH_EXT_BENCH_DEVICE")
    return torch.device(name) if name else cases.best_device()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``ash_case`` x ``impl_name`` over the shared case list and the implementations, and
    ``family_case`` x ``family_impl`` over :mod:`ash_ext.bench.family`'s."""
    config = metafunc.config
    all_cases = bool(config.getoption("--ash-all", default=False)) or _flag("ASH_EXT_BENCH_ALL")
    if "family_case" in metafunc.fixturenames:
        family_cases = family.pytest_cases(bench_device(config), all_cases=all_cases)
        params = [
            pytest.param(case, impl, id=f"{case.id}-{impl}")
            for case in family_cases
            for impl in family.IMPLEMENTATIONS
            if impl != "ash_ext_scalar_p" or case.method == "per-sample"
            if impl != "fallback" or case.method != "react-fit"
        ]
        metafunc.parametrize(("family_case", "family_impl"), params)
    if "ash_case" not in metafunc.fixturenames:
        return
    device = bench_device(config)
    ash_cases = cases.pytest_cases(device, all_cases=all_cases)
    params = [pytest.param(case, impl, id=f"{case.id}-{impl}") for case in ash_cases for impl in impls.IMPLEMENTATIONS]
    metafunc.parametrize(("ash_case", "impl_name"), params)


@pytest.fixture(scope="session")
def ash_device(pytestconfig: pytest.Config) -> torch.device:
    """The device the benchmarks run on."""
    return bench_device(pytestconfig)
