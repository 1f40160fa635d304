"""The C++ CPU kernel and the op front end under AddressSanitizer + UndefinedBehaviorSanitizer, and
LeakSanitizer over repeated calls, through tools/sanitized_cpu.py (a separate build, the parity,
layout, in-place, edge-case and ISA tests over it, then the leak check).

Slow (a build of a few minutes on two cores, cached in build/sanitized/, then about two minutes of
tests), so it runs only with ``ASH_EXT_SANITIZERS=1`` (what ``make test`` and CI set; ``make test
SANITIZERS=off`` skips it). In a subprocess: the sanitized module needs the sanitizer's runtime
loaded before Python's first library, and cannot share a process with the ordinary ash_ext._C.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ENABLED = os.environ.get("ASH_EXT_SANITIZERS", "").strip().lower() in ("1", "true", "yes", "on")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "sanitized_cpu.py")

pytestmark = [
    pytest.mark.skipif(not ENABLED, reason="set ASH_EXT_SANITIZERS=1 (make test does)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sanitizer runs are for Linux"),
]


def test_cpu_kernel_and_front_end_under_sanitizers_and_leak_check():
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=3600, env=env)
    summary = [line for line in result.stdout.splitlines()
               if line.startswith(("sanitized tests:", "leak check:", "sanitized CPU build:"))]
    print("\n".join(summary))
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    assert summary and summary[-1].startswith("sanitized CPU build: passed"), result.stdout[-3000:]
