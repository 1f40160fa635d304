"""A pytest plugin for tools/sanitized_cpu.py's test run (``-p sanitized_cpu_pytest``).

* Before any test runs, checks that the tests really get the sanitized build: ``ash_ext._C`` is
  the library named by ``ASH_EXT_SANITIZED_MODULE``, it is loaded (no fallback), and the
  AddressSanitizer runtime is in the process.
* Deselects the cases that only exercise the pure-PyTorch fallback (the ``backend`` fixture's
  ``fallback`` parameter): no compiled code runs in them, and they would double the run.
"""

from __future__ import annotations

import ctypes
import os

import pytest

MODULE_ENV = "ASH_EXT_SANITIZED_MODULE"


def pytest_configure(config: pytest.Config) -> None:
    import ash_ext

    expected = os.environ.get(MODULE_ENV)
    if not expected:
        raise pytest.UsageError(f"{MODULE_ENV} is not set: run this through tools/sanitized_cpu.py")
    loaded = ash_ext._ops._C
    if loaded is None or ash_ext.fallback_forced():
        raise pytest.UsageError(f"ash_ext's compiled module is not in use: {ash_ext._ops.EXTENSION_ERROR}")
    if os.path.realpath(loaded.__file__) != os.path.realpath(expected):
        raise pytest.UsageError(f"ash_ext._C is {loaded.__file__}, not the sanitized build {expected}")
    try:
        ctypes.CDLL(None).__asan_init  # noqa: B018  (raises AttributeError without the runtime)
    except AttributeError:
        raise pytest.UsageError("the AddressSanitizer runtime is not loaded (LD_PRELOAD)") from None
    print(f"sanitized ash_ext._C: {loaded.__file__} (CPU ISA builds {', '.join(ash_ext.cpu_isas())})")


def _fallback_only(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(type(value).__name__ == "Backend" and getattr(value, "name", "") == "fallback"
               for value in params.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    deselected = [item for item in items if _fallback_only(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not _fallback_only(item)]
