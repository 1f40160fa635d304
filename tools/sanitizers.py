"""What the project's sanitizer runs share: GCC's flags for each sanitizer, the runtime to preload
into Python, and the environment a preloaded run gets.

Used by tests/emulation/run_emulation.py (the CUDA kernels' emulator under AddressSanitizer +
UndefinedBehaviorSanitizer, and under ThreadSanitizer) and tools/sanitized_cpu.py (ash_ext._C's
CPU build under AddressSanitizer + UndefinedBehaviorSanitizer, its tests and its leak check).

Python itself is not instrumented, so the runtime must be the first library the process loads:
``LD_PRELOAD`` (a sanitized module imported without it aborts with "ASan runtime does not come
first"). The runtimes are GCC's (``g++ -print-file-name=libasan.so``).
"""

from __future__ import annotations

import os
import subprocess
from typing import Optional

#: (compile flags, link flags) for each sanitizer. ``-fno-sanitize-recover=all``: the first
#: undefined behaviour ends the run (UBSan otherwise prints and carries on).
FLAGS = {
    "none": ([], []),
    "address": (
        ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
        ["-fsanitize=address,undefined"],
    ),
    "thread": (["-fsanitize=thread"], ["-fsanitize=thread"]),
}
RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}
#: The options a run gets unless the caller's environment sets them: stop at the first report,
#: with a stack. LeakSanitizer is off by default: Python does not free everything at exit, so an
#: ordinary run would end in a leak report that says nothing about the code under test.
DEFAULT_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0:history_size=4",
}


def runtime_path(sanitize: str) -> Optional[str]:
    """The absolute path of the sanitizer's runtime (GCC's), or None when the compiler has none."""
    found = subprocess.run(
        [os.environ.get("CXX", "g++"), f"-print-file-name={RUNTIME[sanitize]}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # Without the library, GCC prints the bare name back.
    return found if os.path.isabs(found) and os.path.exists(found) else None


def preloaded_env(sanitize: str, runtime: str, base: Optional[dict] = None, **overrides: str) -> dict:
    """``base`` (default: this process's environment) with the runtime preloaded, the default
    options where ``base`` sets none, and ``overrides`` on top."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = runtime
    for name, value in DEFAULT_OPTIONS.items():
        env.setdefault(name, value)
    env.update(overrides)
    return env
