"""The printed report of an ASH run: the table and the summary lines under it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .contention import Contention, describe
from .correctness import dev_too_large

TABLE_COLUMNS: tuple[str, ...] = (
    "shape",
    "B",
    "dtype",
    "p",
    "variant",
    "ref ms",
    "pytorch-ood ms",
    "fallback ms",
    "ash_ext ms",
    "±IQR",
    "clone ms",
    "speed-up vs ref",
    "GB/s",
    "% of clone",
    "max dev (rel)",
)


def fmt_ms(value: float | None) -> str:
    """Milliseconds with three significant digits or so; ``-`` for ``None``."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _fmt_dev(row: dict[str, Any]) -> str:
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return "ref inf/NaN"
    rel = row.get("max_rel_dev")
    text = "nan" if rel is None or math.isnan(rel) else ("0" if rel == 0 else f"{rel:.1e}")
    if row.get("mask_mismatch"):
        text += f" ({row['mask_mismatch']} pos!)"
    return text


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, one list of strings per case (columns: :data:`TABLE_COLUMNS`)."""
    rows = []
    for r in results:
        t = r["timings"]
        med = {name: summary["median_ms"] for name, summary in t.items()}.get
        ext = t.get("ash_ext")
        iqr = f"{100 * ext['iqr_ms'] / ext['median_ms']:.0f}%" if ext and ext["median_ms"] > 0 else "-"
        speed = r.get("speedup_vs_reference")
        gbps = r.get("ash_ext_gbps")
        pct = r.get("pct_of_clone")
        rows.append(
            [
                r["shape"],
                str(r["batch"]),
                r["dtype"],
                f"{r['percentile']:g}",
                r["variant"],
                fmt_ms(med("reference")),
                fmt_ms(med("pytorch-ood")),
                fmt_ms(med("fallback")),
                fmt_ms(med("ash_ext")),
                iqr,
                fmt_ms(med("clone")),
                f"{speed:.1f}x" if speed is not None else "-",
                f"{gbps:.1f}" if gbps is not None else "-",
                f"{pct:.0f}%" if pct is not None else "-",
                _fmt_dev(r),
            ]
        )
    return rows


def format_table(results: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table)."""
    return render_table(list(TABLE_COLUMNS), table_rows(results), {0, 2, 4}, markdown)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int], markdown: bool) -> str:
    """``rows`` under ``header`` as aligned text (or Markdown); columns in ``left`` align left."""
    widths = [
        max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(header)]
    if markdown:
        out.append(
            "|"
            + "|".join(("-" * (w + 1) + ":") if i not in left else (":" + "-" * (w + 1)) for i, w in enumerate(widths))
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(row) for row in rows]
    return "\n".join(out)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A few lines under the table: machine, geometric-mean speed-ups, and any case to look at."""
    meta, results = data["meta"], data["results"]
    m = meta["machine"]
    lines = [
        (
            f"device {m['device']} ({m['device_name']}), torch {m['torch']} ({m['torch_threads']} threads), "
            f"ash_ext {m['ash_ext']} (CPU kernel: {m.get('ash_ext_cpu_isa', 'unknown')}), "
            f"pytorch-ood {m['pytorch_ood'] or 'not installed'}; "
            f"{len(results)} cases in {meta.get('wall_s', 0):.0f} s" + forecast_note(meta)
        )
    ]
    paths = sorted({r["ash_ext_implementation"] for r in results})
    if paths and paths != ["cpu-kernel"] and paths != ["cuda-kernel"]:
        lines.append(f"note: ash_ext ran as {', '.join(paths)} (the compiled kernel is not in use for every case)")
    speeds = [r["speedup_vs_reference"] for r in results if r.get("speedup_vs_reference")]
    if speeds:
        by_dtype: dict[str, list[float]] = {}
        for r in results:
            if r.get("speedup_vs_reference"):
                by_dtype.setdefault(r["dtype"], []).append(r["speedup_vs_reference"])
        parts = [f"{d} {geomean(v):.1f}x" for d, v in by_dtype.items()]
        lines.append(
            f"speed-up of ash_ext over the reference: geometric mean {geomean(speeds):.1f}x ({', '.join(parts)}); "
            f"range {min(speeds):.2f}x .. {max(speeds):.1f}x"
        )
    slower = [r for r in results if r.get("speedup_vs_reference") is not None and r["speedup_vs_reference"] < 1]
    if slower:
        lines.append(
            f"ash_ext is SLOWER than the reference in {len(slower)} case(s): " + some([r["case"] for r in slower], 8)
        )
    ref_nan = [r["case"] for r in results if r.get("reference_nonfinite") and not r.get("ash_ext_nonfinite")]
    devs = [r for r in results if dev_too_large(r)]
    if devs:
        lines.append(f"ash_ext DEVIATES from the reference in {len(devs)} case(s): " + some([r["case"] for r in devs]))
    elif results:
        worst = max(results, key=lambda r: r.get("max_rel_dev") or 0.0)
        lines.append(
            f"largest deviation from the reference: {worst.get('max_rel_dev', 0.0):.1e} of max |reference| "
            f"({worst['case']}); kept sets identical "
            + ("wherever the reference is finite" if ref_nan else "in every case")
        )
    if any("same_dtype_reference" in r for r in results):
        lines.append(
            "half-precision cases compare with the reference run in float32 and rounded to the dtype; "
            "results.json also holds the comparison with the reference run in the dtype itself"
        )
    if ref_nan:
        lines.append(
            f"the reference gives inf/NaN where ash_ext is finite in {len(ref_nan)} case(s) (e.g. ASH-S with "
            "k = 0 divides by a zero kept sum; ash_ext documents zeros there): " + some(ref_nan)
        )
    broken = [
        r["case"]
        for r in results
        if r.get("same_dtype_reference", {}).get("reference_nonfinite") and r["case"] not in ref_nan
    ]
    if broken:
        lines.append(
            f"the reference run in the dtype itself (not in float32) gives inf/NaN in {len(broken)} case(s), "
            "e.g. when its float16 sums overflow: " + some(broken)
        )
    noisy = [r for r in results if _noisy(r, ("ash_ext", "clone"))]
    if noisy:
        lines.append(
            f"{len(noisy)} case(s) have a spread (IQR) over half the median for ash_ext or the clone"
            + noise_cause(meta)
        )
    lines += contention_lines(meta)
    if meta.get("interrupted"):
        lines.append("interrupted: the results are partial")
    return lines


def forecast_note(meta: dict[str, Any]) -> str:
    """`` (forecast 95 s)``: the estimate printed before the run, to set beside its wall time."""
    estimated = meta.get("estimated_s")
    return f" (forecast {estimated:.0f} s)" if estimated is not None else ""


def noise_cause(meta: dict[str, Any]) -> str:
    """The end of the line about noisy cases: what the measured CPU contention says about it."""
    c = meta.get("cpu_contention")
    if not c:
        return ": perhaps other processes were using the device"
    if Contention.from_dict(c).busy:
        return ": other processes were using the CPUs (next line)"
    device = meta.get("machine", {}).get("device", "cpu")
    gpu = "" if device.startswith("cpu") else " (the GPU's other users are not measured)"
    return (
        f", though other processes kept only {c['other_cpus']:.2f} CPUs busy on average meanwhile{gpu}: "
        "short calls vary with caches, clocks and the scheduler"
    )


def contention_lines(meta: dict[str, Any]) -> list[str]:
    """What competed for the CPUs: other processes' measured CPU use while the cases were timed
    (:mod:`ash_ext.bench.contention`) when busy, and any wait before timing. Where it could not be
    measured (no ``/proc``), a high load average at the start, said to be only that."""
    lines = []
    c = meta.get("cpu_contention")
    m = meta.get("machine", {})
    if c:
        measured = Contention.from_dict(c)
        if measured.busy:
            lines.append(
                f"while the cases were timed, {describe(measured)} on average (/proc/stat less this process's own "
                "CPU time): they competed with the timed calls (multi-threaded ops then stall), so the times are noisy"
            )
    else:
        load = meta.get("load_average_start")
        cpus = m.get("cpus_usable") or m.get("cpu_count") or 1
        if str(m.get("device", "")).startswith("cpu") and load and load[0] > max(1.0, 0.5 * cpus):
            lines.append(
                f"the 1-minute load average was {load[0]:.1f} on {cpus} CPUs as the run started; it also counts "
                "processes that have ended (a build just before, say), and what ran during the timing could not "
                "be measured here (no /proc/stat), so the times may be noisy"
            )
    wait = meta.get("quiet_wait")
    if wait and wait["waited_s"] >= 1:
        outcome = "they had" if wait["quiet"] else "they had not, by the bound"
        lines.append(
            f"the run waited {wait['waited_s']:.0f} s before timing for other processes to leave the CPUs ({outcome})"
        )
    return lines


def some(names: Sequence[str], n: int = 6) -> str:
    """The first ``n`` of ``names``, comma-separated, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _noisy(row: dict[str, Any], names: Sequence[str]) -> bool:
    for name in names:
        t = row["timings"].get(name)
        if t and t["median_ms"] > 0 and t["iqr_ms"] > 0.5 * t["median_ms"]:
            return True
    return False


def geomean(values: Sequence[float]) -> float:
    """The geometric mean of positive ``values`` (NaN for none)."""
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else math.nan
