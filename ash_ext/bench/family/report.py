"""The family's printed report (table, summary lines) and its CSV."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from ..files import CSV_MACHINE_FIELDS, CSV_TIMING_FIELDS, machine_columns, write_rows
from ..report import contention_lines, fmt_ms, forecast_note, geomean, noise_cause, render_table, some
from .cases import REFERENCE_LABELS
from .references import IMPLEMENTATIONS

TABLE_COLUMNS: tuple[str, ...] = (
    "method",
    "shape",
    "B",
    "values",
    "dtype",
    "p",
    "reference",
    "ref ms",
    "fallback ms",
    "ash_ext ms",
    "±IQR",
    "roofline ms",
    "speed-up vs ref",
    "% of roofline",
    "max dev (rel)",
)


def _fmt_count(n: int) -> str:
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    if n >= 10**4:
        return f"{n / 1e3:.0f}k"
    return str(n)


def _fmt_dev(row: dict[str, Any]) -> str:
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return "ref inf/NaN"
    rel = row.get("max_rel_dev")
    text = "nan" if rel is None or math.isnan(rel) else ("0" if rel == 0 else f"{rel:.1e}")
    if row.get("mismatch") and row.get("method") != "react-fit":
        text += f" ({row['mismatch']} {'samples' if row.get('method') == 'topk-stats' else 'pos'}!)"
    if not row.get("ok", True):
        text += " FAIL"
    return text


def _fmt_x(value: float) -> str:
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, one list of strings per case (columns: :data:`TABLE_COLUMNS`)."""
    rows = []
    for r in results:
        t = r["timings"]
        med = {name: summary["median_ms"] for name, summary in t.items()}.get
        ext = t.get("ash_ext")
        iqr = f"{100 * ext['iqr_ms'] / ext['median_ms']:.0f}%" if ext and ext["median_ms"] > 0 else "-"
        speed = r.get("speedup_vs_reference")
        pct = r.get("pct_of_roofline")
        rows.append(
            [
                r["method"],
                r["shape"],
                str(r["batch"]),
                _fmt_count(r["values"]),
                r["dtype"],
                f"{r['percentile']:g}",
                REFERENCE_LABELS[r["method"]],
                fmt_ms(med("reference")),
                fmt_ms(med("fallback")),
                fmt_ms(med("ash_ext")),
                iqr,
                fmt_ms(med("roofline")) + (" (sum)" if r.get("roofline") == "sum" else ""),
                _fmt_x(speed) if speed is not None else "-",
                f"{pct:.0f}%" if pct is not None else "-",
                _fmt_dev(r),
            ]
        )
    return rows


def format_table(results: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table)."""
    return render_table(list(TABLE_COLUMNS), table_rows(results), {0, 1, 4, 6}, markdown)


def _noisy(row: dict[str, Any]) -> bool:
    for name in ("ash_ext", "roofline"):
        t = row["timings"].get(name)
        if t and t["median_ms"] > 0 and t["iqr_ms"] > 0.5 * t["median_ms"]:
            return True
    return False


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A few lines under the table: machine, geometric-mean speed-up per method, and any case to look at."""
    meta, results = data["meta"], data["results"]
    m = meta["machine"]
    lines = [
        (
            f"device {m['device']} ({m['device_name']}), torch {m['torch']} ({m['torch_threads']} threads), "
            f"ash_ext {m['ash_ext']} (CPU kernel: {m.get('ash_ext_cpu_isa', 'unknown')}), "
            f"references from {meta.get('reference_source')}; "
            f"{len(results)} family cases in {meta.get('wall_s', 0):.0f} s" + forecast_note(meta)
        )
    ]
    paths = sorted({r["ash_ext_implementation"] for r in results})
    if paths and paths != ["cpu-kernel"] and paths != ["cuda-kernel"]:
        lines.append(f"note: ash_ext ran as {', '.join(paths)} (the compiled kernel is not in use for every case)")
    by_method: dict[str, list[float]] = {}
    for r in results:
        if r.get("speedup_vs_reference"):
            by_method.setdefault(r["method"], []).append(r["speedup_vs_reference"])
    if by_method:
        parts = [
            f"{method} {_fmt_x(geomean(v))} ({_fmt_x(min(v))} .. {_fmt_x(max(v))})" for method, v in by_method.items()
        ]
        lines.append("speed-up of ash_ext over the reference, geometric mean (range) per method: " + "; ".join(parts))
    overhead = [r["per_sample_overhead"] for r in results if r.get("per_sample_overhead")]
    if overhead:
        lines.append(
            f"per-sample percentiles ([B] tensor) take {geomean(overhead):.2f}x the time of one float "
            f"percentile on the same data (geometric mean over {len(overhead)} case(s))"
        )
    slower = [r["case"] for r in results if r.get("speedup_vs_reference") is not None and r["speedup_vs_reference"] < 1]
    if slower:
        lines.append(f"ash_ext is SLOWER than the reference in {len(slower)} case(s): " + some(slower, 8))
    bad = [r["case"] for r in results if not r.get("ok", True)]
    if bad:
        lines.append(f"ash_ext DEVIATES from the reference in {len(bad)} case(s): " + some(bad))
    elif results:
        worst = max(results, key=lambda r: r.get("max_rel_dev") or 0.0)
        lines.append(
            f"largest deviation from the reference: {worst.get('max_rel_dev') or 0.0:.1e} of max |reference| "
            f"({worst['case']}); kept sets and thresholds identical in every case"
        )
    fits = [r for r in results if r["method"] == "react-fit"]
    if fits:
        exact = sum(1 for r in fits if not r.get("mismatch"))
        lines.append(f"react_threshold equals np.percentile exactly in {exact} of {len(fits)} fit case(s)")
    ref_nan = [r["case"] for r in results if r.get("reference_nonfinite") and not r.get("ash_ext_nonfinite")]
    if ref_nan:
        lines.append(f"the reference gives inf/NaN where ash_ext is finite in {len(ref_nan)} case(s): " + some(ref_nan))
    noisy = [r for r in results if _noisy(r)]
    if noisy:
        lines.append(
            f"{len(noisy)} case(s) have a spread (IQR) over half the median for ash_ext or the roofline"
            + noise_cause(meta)
        )
    lines += contention_lines(meta)
    if meta.get("interrupted"):
        lines.append("interrupted: the results are partial")
    return lines


CSV_BASE: tuple[str, ...] = (
    "case",
    "method",
    "shape",
    "batch",
    "dtype",
    "percentile",
    "n",
    "values",
    "k_min",
    "k_max",
    "clip",
    "bytes",
    "rotation_inputs",
    "ash_ext_implementation",
)
CSV_TAIL: tuple[str, ...] = (
    "speedup_vs_reference",
    "speedup_vs_fallback",
    "per_sample_overhead",
    "roofline",
    "pct_of_roofline",
    "max_abs_dev",
    "max_rel_dev",
    "mismatch",
    "ok",
    "reference_nonfinite",
    "ash_ext_nonfinite",
    "deviation_clip",
    "ash_ext_value",
    "reference_value",
    "reference",
)


def csv_rows(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The CSV's header and rows: one row per case, timing summaries flattened as ``<impl>_<field>``."""
    impls = [name for name in IMPLEMENTATIONS if any(name in r["timings"] for r in data["results"])]
    header = list(CSV_BASE) + [f"{i}_{f}" for i in impls for f in CSV_TIMING_FIELDS] + list(CSV_TAIL)
    header += list(CSV_MACHINE_FIELDS)
    machine = machine_columns(data)
    rows = []
    for r in data["results"]:
        row: dict[str, Optional[Any]] = {key: r.get(key) for key in (*CSV_BASE, *CSV_TAIL)}
        for i in impls:
            for f in CSV_TIMING_FIELDS:
                row[f"{i}_{f}"] = r["timings"].get(i, {}).get(f)
        row.update(machine)
        rows.append(row)
    return header, rows


def write_csv(data: dict[str, Any], path: str) -> None:
    """Write the family results as CSV, one row per case (the raw samples are in the JSON)."""
    write_rows(*csv_rows(data), path)
