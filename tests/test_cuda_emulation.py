"""The CUDA kernels' logic on the CPU, through the emulator in tests/emulation (no GPU needed).

Three runs, each a build of the emulated backend and a set of cases against the fallback:
the logic with the launch rules (every regime, dtype, tie case and the 48 KiB window), the same
kernels under AddressSanitizer + UndefinedBehaviorSanitizer (float32 and float16, whose packs
differ in length), and under ThreadSanitizer (float32). Slow
(a C++ build of one to three minutes each, then the cases), so they run only with
``ASH_EXT_EMULATION=quick`` (what ``make test`` and CI set: the quick sets) or
``ASH_EXT_EMULATION=1`` (the full logic set). Each runs in a subprocess: the emulated backend
defines the ash_ext op namespace itself and cannot share a process with ash_ext._C.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MODE = os.environ.get("ASH_EXT_EMULATION", "").strip().lower()
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulation", "run_emulation.py")

pytestmark = [
    pytest.mark.skipif(MODE not in ("1", "true", "yes", "on", "full", "quick"), reason="set ASH_EXT_EMULATION=quick"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator is for Linux"),
]


def run(*args: str) -> None:
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=3600)
    summary = [line for line in result.stdout.splitlines() if "comparisons" in line]
    print("\n".join(summary))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert summary and " 0 failures" in summary[-1], result.stdout[-3000:]


def test_cuda_kernels_under_emulation():
    run(*([] if MODE in ("1", "true", "yes", "on", "full") else ["--quick"]))


def test_cuda_kernels_under_address_and_undefined_behaviour_sanitizers():
    run("--sanitize", "address")


def test_cuda_kernels_under_thread_sanitizer():
    # float32 only: races do not depend on the dtype, and ThreadSanitizer is the slowest run.
    run("--sanitize", "thread", "--dtypes", "float32")
