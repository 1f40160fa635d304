"""ash_ext._C's C++ CPU kernel and op front end under AddressSanitizer + UndefinedBehaviorSanitizer:
a build of its own, the parity, layout, in-place, edge-case and ISA tests over it, and a leak check.

1. Build. setup.py itself compiles the CPU sources (csrc/ops.cpp, csrc/python_module.cpp,
   csrc/cpu/*.cpp) with its own flags (-ffp-contract=off, -fopenmp, ...; ASH_EXT_NO_CUDA=1) plus
   tools/sanitizers.py's (-fsanitize=address,undefined -fno-sanitize-recover=all
   -fno-omit-frame-pointer), -O0, -g1 and -fno-wrapv, into build/sanitized/ (ninja: later runs
   recompile only what changed). -O0: an ISA build of the kernel compiles in 76 core-seconds at
   -O0, 130 at -O1 (both sanitizers, -g1, GCC 12), while the tests' time is Python's either way;
   and no optimisation can delete or fold an access or an overflow before the sanitizers see it.
   -g1 (line tables and function names: what a sanitizer's stack needs) instead of -g: full debug
   information of ATen's headers was 40 of the 65 core-seconds of ops.cpp. -fno-wrapv undoes
   Python's -fwrapv (from its build flags, not the project's semantics), under which UBSan does
   not check signed overflow. The AVX-512 build of the kernel is left out (-DASH_EXT_NO_AVX512)
   on a CPU that cannot run it.
2. Tests. A shadow package build/sanitized/pkg/ash_ext (links to the real ash_ext/*.py plus the
   sanitized _C) comes first on the path; pytest runs there with the sanitizer runtime preloaded
   (LD_PRELOAD, with libstdc++: see run_env), halting at the first report, LeakSanitizer off
   (Python does not free everything at exit). tools/sanitized_cpu_pytest.py checks that the tests
   get the sanitized _C and deselects the fallback-only cases (DESELECTED lists the other cuts).
   Both ISA builds this CPU runs are exercised: tests/test_cpu_isa.py runs every case on each;
   the other files run on the best one. Python's own allocator stays on here (PYTHONMALLOC=malloc
   costs a third more time); the leak check runs without it.
3. Leaks. tools/sanitized_cpu_leaks.py calls every op (forward, in place, backward, autograd,
   statistics, the fast path, the error paths; every variant, dtype and layout), the ISA builds in
   turn, under PYTHONMALLOC=malloc (Python's objects in ASan's heap too), with LeakSanitizer checked
   after the first rounds and after 4 and 12 (about 1,100, 2,300 and 6,900 calls): no leak may have
   an ash_ext frame, and neither the leaked bytes nor the heap in use may grow from the first
   checkpoint to the last (by more than LEAK_SLACK).

    python tools/sanitized_cpu.py                   # all three (what make sanitize runs)
    python tools/sanitized_cpu.py --skip-leaks      # build and tests
    python tools/sanitized_cpu.py --skip-tests      # build and the leak check
    python tools/sanitized_cpu.py -- -k ash_s -x    # pytest arguments after --

Any sanitizer report fails the run; the reports are printed (and kept in build/sanitized/logs).
Exit status 0 when the build, the tests and the leak check pass. Needs GCC (its sanitizer runtimes).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import sanitizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
BUILD_DIR_ENV = "ASH_EXT_SANITIZED_BUILD_DIR"
OPTIMISATION = "-O0"
TEST_FILES = (
    "tests/test_parity.py",
    "tests/test_layout_and_inplace.py",
    "tests/test_semantics.py",
    "tests/test_detector_and_errors.py",
    "tests/test_cpu_family.py",
    "tests/test_cpu_isa.py",
    "tests/test_hostile_args.py",
)
DESELECTED = (
    # Imports ash_ext in subprocesses with an empty environment: no preloaded runtime.
    "tests/test_cpu_isa.py::test_environment_variable_and_its_alias",
    # Read the release build's machine code with objdump (AVX only in the ISA namespaces, no vector
    # across a call); the sanitized code says nothing about it, and objdump takes half a minute.
    "tests/test_cpu_isa.py::test_no_avx_code_outside_the_isa_builds",
    "tests/test_cpu_isa.py::test_no_vector_crosses_a_call",
    # The fallback alone (no compiled code runs).
    "tests/test_semantics.py::test_property_fallback_matches_oracle",
    "tests/test_detector_and_errors.py::test_force_fallback_env",
    # Time: 50000-value samples are 17 of the run's ~120 s; their selection is the same for every
    # variant, so ASH-S (which takes every pass: s1, s2, the scaled output) stays, as do the
    # 2048-value cases of every variant.
    "tests/test_cpu_isa.py::test_candidate_sets_that_defeat_interpolation[50000-ash-p]",
    "tests/test_cpu_isa.py::test_candidate_sets_that_defeat_interpolation[50000-ash-b]",
    "tests/test_cpu_isa.py::test_candidate_sets_that_defeat_interpolation[50000-scale]",
)
LEAK_ROUNDS = (4, 12)
ASAN_TEST_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


def cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return all(f"avx512{part}" in flags for part in ("f", "bw", "vl", "dq"))


def compile_flags() -> list:
    flags = list(sanitizers.FLAGS["address"][0]) + [OPTIMISATION, "-g1", "-fno-wrapv"]
    if not cpu_has_avx512():
        flags.append("-DASH_EXT_NO_AVX512")
    return flags


def build(source_root: str, build_dir: str, jobs: int) -> str:
    """Builds (or brings up to date) the sanitized _C with setup.py; returns the library's path."""
    log_path = os.path.join(build_dir, "build.log")
    os.makedirs(build_dir, exist_ok=True)
    flags = compile_flags()
    env = dict(
        os.environ,
        ASH_EXT_NO_CUDA="1",
        ASH_EXT_EXTRA_CXXFLAGS=" ".join(flags),
        # distutils appends LDFLAGS to the shared-library link
        LDFLAGS=" ".join(sanitizers.FLAGS["address"][1]),
        MAX_JOBS=str(jobs),
    )
    env.pop("LD_PRELOAD", None)
    command = [sys.executable, "setup.py", "build_ext", "--build-temp", os.path.join(build_dir, "temp"),
               "--build-lib", os.path.join(build_dir, "lib")]
    print(f"sanitized build: {' '.join(flags)}, {jobs} compile(s) at a time, in {build_dir}", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=source_root, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            step = re.match(r"^\[(\d+)/(\d+)\] .* -c (\S+) ", line)
            if step:
                print(f"  [{step.group(1)}/{step.group(2)}] {os.path.relpath(step.group(3), source_root)}", flush=True)
        code = process.wait()
    if code != 0:
        with open(log_path) as log:
            sys.stdout.write("".join(log.readlines()[-40:]))
        raise SystemExit(f"sanitized build FAILED (exit {code}); the full output is in {log_path}")
    found = glob.glob(os.path.join(build_dir, "lib", "ash_ext", "_C*.so"))
    if len(found) != 1:
        raise SystemExit(f"sanitized build: expected one ash_ext/_C*.so under {build_dir}/lib, found {found}")
    return found[0]


def make_package(source_root: str, build_dir: str, library: str) -> str:
    """build_dir/pkg/ash_ext: links to the package's files, and _C the sanitized build. Returns pkg."""
    pkg = os.path.join(build_dir, "pkg")
    shutil.rmtree(pkg, ignore_errors=True)
    shadow = os.path.join(pkg, "ash_ext")
    os.makedirs(shadow)
    real = os.path.join(source_root, "ash_ext")
    for name in sorted(os.listdir(real)):
        if name == "__pycache__" or (name.startswith("_C") and name.endswith(".so")):
            continue
        os.symlink(os.path.join(real, name), os.path.join(shadow, name))
    os.symlink(library, os.path.join(shadow, os.path.basename(library)))
    # The plugin, importable from the run's working directory (pkg).
    os.symlink(os.path.join(TOOLS, "sanitized_cpu_pytest.py"), os.path.join(pkg, "sanitized_cpu_pytest.py"))
    return pkg


def run_env(runtime: str, pkg: str, library: str, log_dir: str, asan_options: str) -> dict:
    """The environment of a run under the sanitized build: the runtime (and libstdc++, so that
    ASan's __cxa_throw interceptor finds the real one when a library throws) preloaded, its
    reports written to log_dir, the shadow package first on the path."""
    libstdcxx = subprocess.run([os.environ.get("CXX", "g++"), "-print-file-name=libstdc++.so.6"],
                               capture_output=True, text=True, check=True).stdout.strip()
    os.makedirs(log_dir, exist_ok=True)
    env = sanitizers.preloaded_env(
        "address", runtime,
        ASAN_OPTIONS=f"{asan_options}:log_path={os.path.join(log_dir, 'asan')}",
        # (UBSan beside ASan ignores its log_path: its reports go to stderr.)
        UBSAN_OPTIONS=UBSAN_OPTIONS,
        PYTHONPATH=pkg,
        ASH_EXT_SANITIZED_MODULE=library,
    )
    if os.path.isabs(libstdcxx):
        env["LD_PRELOAD"] = f"{runtime} {os.path.realpath(libstdcxx)}"
    for name in ("ASH_EXT_FORCE_FALLBACK", "ASH_EXT_CPU_ISA", "ASH_EXT_CPU_SIMD"):
        env.pop(name, None)
    return env


def first_report(stderr: str, limit: int = 12000) -> str:
    """The sanitizer report in a run's stderr (UBSan's go there), from its first line; else ''."""
    found = re.search(r"^.*(runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer)", stderr, re.MULTILINE)
    return stderr[found.start():found.start() + limit] if found else ""


def reports(log_dir: str) -> list:
    """The sanitizer reports written to log_dir (one file per process that reported)."""
    return sorted(glob.glob(os.path.join(log_dir, "*san.*")))


def show_reports(found: list, limit: int = 12000) -> None:
    for path in found:
        with open(path, errors="replace") as report:
            text = report.read()
        print(f"---- {path} ----\n{text[:limit]}{' ...' if len(text) > limit else ''}")


def run_tests(source_root: str, pkg: str, env: dict, log_dir: str, extra: list, show: bool) -> bool:
    # --capture=sys: pytest captures Python's output only, so that a sanitizer's report written to
    # file descriptor 2 reaches this script even when the process dies in the middle of a test.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "sanitized_cpu_pytest",
               "--capture=sys", "--rootdir", source_root]
    command += [os.path.join(source_root, path) for path in TEST_FILES]
    command += [f"--deselect={test}" for test in DESELECTED]  # node ids: relative to the rootdir
    command += extra
    started = time.monotonic()
    result = subprocess.run(command, cwd=pkg, env=env, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "no summary")
    found = reports(log_dir)
    in_stderr = first_report(result.stderr)
    print(f"sanitized tests: {summary.strip('= ')} ({time.monotonic() - started:.0f}s)", flush=True)
    for line in lines:
        if line.startswith("sanitized ash_ext._C:"):
            print(f"  {line}")
    if show:
        print(result.stdout)
    if result.returncode != 0 or found or in_stderr:
        print("\n".join(lines[-80:]))
        print(in_stderr or result.stderr[-4000:])
        show_reports(found)
        count = len(found) + (1 if in_stderr else 0)
        print(f"sanitized tests FAILED (pytest exit {result.returncode}, {count} sanitizer report(s))")
        return False
    return True


LEAK = re.compile(r"^(Direct|Indirect) leak of (\d+) byte\(s\) in (\d+) object\(s\) allocated from:\n((?:    #.*\n?)*)",
                  re.MULTILINE)
LEAK_SUMMARY = re.compile(r"SUMMARY: AddressSanitizer: (\d+) byte\(s\) leaked in (\d+) allocation\(s\)")
#: A frame of ash_ext's own code: its namespace, its sources, or its library.
OWN_FRAME = re.compile(r"ash_ext::|/csrc/|ash_ext/_C")
#: How far the leaked bytes, and the heap in use, may differ between few and many rounds. A leak
#: of one byte a call makes ~100 KiB of difference.
LEAK_SLACK = 16 * 1024


def run_leak_check(pkg: str, runtime: str, library: str, log_dir: str, rounds: tuple) -> bool:
    """The workload with LeakSanitizer on, checked after its first rounds and after each count of
    ``rounds``: no leak with an ash_ext frame, and neither the leaked bytes nor the heap in use
    growing from the first checkpoint to the last."""
    env = run_env(runtime, pkg, library, log_dir,
                  "detect_leaks=1:leak_check_at_exit=0:halt_on_error=1:abort_on_error=1")
    env["ASAN_OPTIONS"] = re.sub(r":log_path=[^:]*", "", env["ASAN_OPTIONS"])  # reports to stderr, parsed here
    env["PYTHONMALLOC"] = "malloc"  # see tools/sanitized_cpu_leaks.py
    command = [sys.executable, os.path.join(TOOLS, "sanitized_cpu_leaks.py"), "--rounds", ",".join(map(str, rounds))]
    started = time.monotonic()
    result = subprocess.run(command, cwd=pkg, env=env, capture_output=True, text=True)
    with open(os.path.join(log_dir, "leak_check.stderr"), "w") as saved:
        saved.write(result.stderr)
    line = next((line for line in result.stdout.splitlines() if line.startswith("leak-workload ")), None)
    found = reports(log_dir)
    error = first_report(result.stderr.replace("ERROR: LeakSanitizer", "LeakSanitizer"))  # leaks: judged below
    if result.returncode != 0 or line is None or found or error:
        print(f"leak check FAILED: the workload exited {result.returncode}")
        print(result.stdout[-4000:])
        print(error or result.stderr[-12000:])
        show_reports(found)
        return False
    workload = json.loads(line[len("leak-workload "):])
    ok = True
    figures = []
    for point in workload["checkpoints"]:
        marker = f"leak-checkpoint {point['rounds']}\n"
        text = result.stderr.split(marker, 1)[1].split(f"leak-checkpoint-end {point['rounds']}\n", 1)[0]
        leaks = LEAK.findall(text)
        summary = LEAK_SUMMARY.search(text)
        leaked = int(summary.group(1)) if summary else 0
        own = [leak for leak in leaks if OWN_FRAME.search(leak[3])]
        figures.append((point, leaked, int(summary.group(2)) if summary else 0, own))
        print(f"leak check: after {point['rounds']:>4} rounds ({point['calls']:>6} calls): LeakSanitizer "
              f"{leaked} bytes leaked in {int(summary.group(2)) if summary else 0} allocations "
              f"({len(own)} with an ash_ext frame); heap in use {point['heap']} bytes", flush=True)
        for kind, size, count, frames in own:
            print(f"  {kind} leak of {size} bytes in {count} objects:\n{frames}")
        ok = ok and not own
    first, last = figures[0], figures[-1]
    calls = last[0]["calls"] - first[0]["calls"]
    if last[1] - first[1] > LEAK_SLACK:
        print(f"leak check: the leaked bytes grow with the calls: {first[1]} then {last[1]} ({calls} calls later)")
        ok = False
    if abs(last[0]["heap"] - first[0]["heap"]) > LEAK_SLACK:
        print(f"leak check: the heap in use grew from {first[0]['heap']} to {last[0]['heap']} bytes in {calls} calls")
        ok = False
    print(f"leak check: {'passed' if ok else 'FAILED'} ({calls} calls on {', '.join(workload['isas'])} in turn "
          f"after the first rounds; leaked {last[1] - first[1]:+d} bytes, heap in use "
          f"{last[0]['heap'] - first[0]['heap']:+d} bytes; {time.monotonic() - started:.0f}s)", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-root", default=ROOT, help="the ash_ext tree to build and test (default: this one)")
    parser.add_argument("--build-dir", default="", help=f"default: ${BUILD_DIR_ENV}, else build/sanitized")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 2), help="parallel compiles")
    parser.add_argument("--skip-tests", action="store_true", help="no pytest run")
    parser.add_argument("--skip-leaks", action="store_true", help="no leak check")
    parser.add_argument("--leak-rounds", default=",".join(map(str, LEAK_ROUNDS)),
                        help="the leak check's few and many rounds of calls (default %(default)s)")
    parser.add_argument("--show-output", action="store_true", help="print pytest's whole output")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    source_root = os.path.abspath(args.source_root)
    build_dir = os.path.abspath(args.build_dir or os.environ.get(BUILD_DIR_ENV) or
                                os.path.join(source_root, "build", "sanitized"))
    runtime = sanitizers.runtime_path("address")
    if runtime is None:
        print(f"no {sanitizers.RUNTIME['address']} found (GCC's sanitizer runtimes are needed)")
        return 2
    started = time.monotonic()
    library = build(source_root, build_dir, args.jobs)
    built = time.monotonic() - started
    print(f"sanitized build: {os.path.relpath(library, source_root)} ({built:.0f}s)", flush=True)
    pkg = make_package(source_root, build_dir, library)
    log_root = os.path.join(build_dir, "logs")
    shutil.rmtree(log_root, ignore_errors=True)
    ok = True
    timings = [f"build {built:.0f}s"]
    if not args.skip_tests:
        t0 = time.monotonic()
        log_dir = os.path.join(log_root, "tests")
        env = run_env(runtime, pkg, library, log_dir, ASAN_TEST_OPTIONS)
        ok = run_tests(source_root, pkg, env, log_dir, args.pytest_args, args.show_output) and ok
        timings.append(f"tests {time.monotonic() - t0:.0f}s")
    if not args.skip_leaks:
        t0 = time.monotonic()
        rounds = tuple(int(r) for r in args.leak_rounds.split(","))
        ok = run_leak_check(pkg, runtime, library, os.path.join(log_root, "leaks"), rounds) and ok
        timings.append(f"leak check {time.monotonic() - t0:.0f}s")
    print(f"sanitized CPU build: {'passed' if ok else 'FAILED'}; {', '.join(timings)}, "
          f"{time.monotonic() - started:.0f}s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
