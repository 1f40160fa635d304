"""The CUDA kernels' logic on the CPU, through the emulator in tests/emulation (no GPU needed).

Slow (a C++ build of about a minute, then a few minutes of emulation), so it runs only with
``ASH_EXT_EMULATION=1`` (``ASH_EXT_EMULATION=quick`` for a shorter set). It runs in a subprocess:
the emulated backend defines the ash_ext op namespace itself and cannot share a process with
ash_ext._C.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MODE = os.environ.get("ASH_EXT_EMULATION", "").strip().lower()
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulation", "run_emulation.py")


@pytest.mark.skipif(MODE not in ("1", "true", "yes", "on", "quick"), reason="set ASH_EXT_EMULATION=1 to run")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses ucontext (Linux)")
def test_cuda_kernels_under_emulation():
    args = [sys.executable, SCRIPT] + (["--quick"] if MODE == "quick" else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
