"""Summarises benchmarks/results/cpu-isa/ (written by cpu_isa_suite.sh) against issue 12's targets.

Per ISA build: float32 against the reference and the clone (rotating inputs and in cache), the
cases short of the targets (at least 15x the reference and within 3x of the clone for AVX2, 20x
and 2x for AVX-512), and each dtype's time over float32's on the same case::

    python benchmarks/cpu_isa_summary.py [benchmarks/results/cpu-isa]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"avx2": (15.0, 3.0), "avx512": (20.0, 2.0)}  # (speed-up over the reference, times the clone)


def summarise(root: Path) -> None:
    """Prints the summary of every ISA directory under ``root``."""
    for isa_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        isa = isa_dir.name
        for kind in ("rotating", "in-cache"):
            rows = []
            for run in sorted(isa_dir.glob(f"*-{kind}")):
                rows += json.loads((run / "results.json").read_text())["results"]
            if not rows:
                continue
            speed = [r["speedup_vs_reference"] for r in rows]
            times_clone = [100.0 / r["pct_of_clone"] for r in rows]
            line = (
                f"{isa:8s} {kind:8s} float32, {len(rows)} cases: {min(speed):.1f}x .. {max(speed):.1f}x the reference, "
                f"{min(times_clone):.2f} .. {max(times_clone):.2f} times the clone"
            )
            if isa in TARGETS:
                want_speed, want_clone = TARGETS[isa]
                short = [r for r, s, c in zip(rows, speed, times_clone) if s < want_speed or c > want_clone]
                line += f"; {len(rows) - len(short)} of {len(rows)} meet >= {want_speed:.0f}x and <= {want_clone:.0f}x"
            print(line)
        by_case: dict[tuple, dict[str, float]] = {}
        for run in sorted(isa_dir.glob("*-dtypes")):
            for r in json.loads((run / "results.json").read_text())["results"]:
                key = (r["shape"], r["batch"], r["percentile"], r["variant"])
                by_case.setdefault(key, {})[r["dtype"]] = r["timings"]["ash_ext"]["median_ms"]
        for dtype in ("float16", "bfloat16", "float64"):
            ratios = sorted(t[dtype] / t["float32"] for t in by_case.values() if dtype in t and "float32" in t)
            if ratios:
                print(
                    f"{isa:8s} {dtype:8s} time / float32's over {len(ratios)} cases: "
                    f"{ratios[0]:.2f} .. {ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f})"
                )


if __name__ == "__main__":
    summarise(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu-isa"))
