"""Builds ash_ext._C in place (``setup.py build_ext --inplace``) and says what it is doing: what is
built (the CPU kernel only, or the CUDA kernels too, for which architectures), roughly how long that
takes here, one short line per compiled file, and the real time at the end. The compiler's full
output goes to build/build.log; on a failure its last lines are printed.

Run by ``make build`` (and so by ``make test`` / ``make bench``); ``MAX_JOBS`` sets the parallel
compiles (default: the core count).
"""

from __future__ import annotations

import glob
import os
import queue
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = os.path.join(ROOT, "build", "build.log")

# Compile cost in core-seconds on this project's 2-core machine, from the ninja log of a fresh
# clone's build (two compiles at a time; 11:53 in all for sm_90): the six C++ files (the CPU
# kernel once per ISA) took 437 s, the five CUDA files for one architecture 906 s; rounded up a
# little for the idle core at the end. Rough by nature: another compiler or CPU shifts them.
CPU_CORE_SECONDS = 460.0
CUDA_CORE_SECONDS_PER_ARCH = 950.0

PLAN = re.compile(r"ash_ext: building the (CPU kernel only|CPU and CUDA kernels for (.*))$")
STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
SOURCE = re.compile(r"(csrc/\S+\.(?:cpp|cu))\b")


def minutes(seconds: float) -> str:
    """``seconds`` as m:ss."""
    whole = int(round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def announce(plan: re.Match, jobs: int) -> None:
    """Say what will be built and about how long it takes."""
    if plan.group(2) is None:
        what, core_seconds = "the C++ CPU kernel only (no CUDA toolkit, or ASH_EXT_NO_CUDA=1)", CPU_CORE_SECONDS
    else:
        archs = [a for a in re.split(r"[;\s]+", plan.group(2).strip()) if a]
        names = ", ".join("sm_" + a.replace(".", "").replace("+PTX", "") for a in archs)
        what = f"the C++ CPU kernel and the CUDA kernels for {len(archs)} architecture(s) ({names})"
        core_seconds = CPU_CORE_SECONDS + CUDA_CORE_SECONDS_PER_ARCH * len(archs)
    estimate = core_seconds / max(1, min(jobs, os.cpu_count() or 1))
    if glob.glob(os.path.join(ROOT, "build", "temp*", ".ninja_log")):
        when = "recompiling only the files changed since the last build"
    else:
        when = f"a first build: about {minutes(estimate)} (m:ss) on a 2-core machine; later ones redo only what changed"
    print(f"ash_ext: building {what}, {jobs} compile(s) at a time; {when}. Compiler output: build/build.log",
          flush=True)


def describe(command: str) -> str:
    """The file a ninja step compiles (else the step's first 80 characters)."""
    found = SOURCE.search(command)
    if found:
        return found.group(1)
    return command[:80]


def main() -> int:
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    env = dict(os.environ, MAX_JOBS=str(jobs), PYTHONUNBUFFERED="1")
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    compiled = 0
    announced = False
    warnings = 0
    with open(LOG, "w") as log:
        while True:
            try:
                line = lines.get(timeout=45)
            except queue.Empty:
                print(f"  {minutes(time.monotonic() - start)}  still compiling ({compiled} done)", flush=True)
                continue
            if line is None:
                break
            log.write(line)
            text = line.rstrip("\n")
            plan = PLAN.search(text)
            if plan and not announced:
                announce(plan, jobs)
                announced = True
            step = STEP.match(text)
            if step:
                compiled = int(step.group(1))
                total = step.group(2)
                print(f"  [{compiled:>2}/{total}] {minutes(time.monotonic() - start)}  {describe(step.group(3))}",
                      flush=True)
            elif "warning:" in text:
                warnings += 1
    code = process.wait()
    elapsed = minutes(time.monotonic() - start)
    if code != 0:
        with open(LOG) as log:
            tail = log.readlines()[-60:]
        sys.stdout.write("".join(tail))
        print(f"ash_ext: the build FAILED after {elapsed} (exit {code}); the full output is in build/build.log")
        return code
    note = f", {warnings} compiler warning line(s) in build/build.log" if warnings else ""
    print(f"ash_ext: built in {elapsed}{note}" if compiled else f"ash_ext: up to date ({elapsed}){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
