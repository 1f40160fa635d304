"""The files a run writes: ``results.json`` (everything, every sample) and ``results.csv`` (a row per case)."""

from __future__ import annotations

import csv
import json
import math
from typing import Any

from .impls import IMPLEMENTATIONS

#: The timing summary fields of each implementation in the CSV (``<impl>_<field>``).
CSV_TIMING_FIELDS: tuple[str, ...] = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "mean_ms", "stdev_ms", "reps")

#: The machine columns at the end of every CSV row.
CSV_MACHINE_FIELDS: tuple[str, ...] = ("device", "device_name", "torch", "ash_ext", "pytorch_ood")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and inf floats replaced by ``None``, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(data: dict[str, Any], path: str) -> None:
    """Write the results of a run as JSON (NaN and inf become null)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(data), f, indent=1)
        f.write("\n")


def machine_columns(data: dict[str, Any]) -> dict[str, Any]:
    """The :data:`CSV_MACHINE_FIELDS` of a run's machine."""
    m = data["meta"]["machine"]
    return {key: m[key] for key in CSV_MACHINE_FIELDS}


def csv_rows(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The CSV's header and rows: one row per case, timing summaries flattened as ``<impl>_<field>``."""
    base = [
        "case",
        "shape",
        "batch",
        "dtype",
        "percentile",
        "variant",
        "n",
        "k",
        "bytes",
        "rotation_inputs",
        "ash_ext_implementation",
    ]
    tail = [
        "speedup_vs_reference",
        "speedup_vs_pytorch_ood",
        "speedup_vs_fallback",
        "ash_ext_gbps",
        "clone_gbps",
        "pct_of_clone",
        "max_abs_dev",
        "max_rel_dev",
        "mask_mismatch",
        "deviation_baseline",
        "same_dtype_ref_max_rel_dev",
        "same_dtype_ref_mask_mismatch",
        "same_dtype_ref_nonfinite",
        "reference_nonfinite",
        "ash_ext_nonfinite",
    ]
    impls = [name for name in IMPLEMENTATIONS if any(name in r["timings"] for r in data["results"])]
    header = base + [f"{i}_{f}" for i in impls for f in CSV_TIMING_FIELDS] + tail + list(CSV_MACHINE_FIELDS)
    machine = machine_columns(data)
    rows = []
    for r in data["results"]:
        row = {key: r.get(key) for key in base + tail}
        same = r.get("same_dtype_reference", {})
        row["same_dtype_ref_max_rel_dev"] = same.get("max_rel_dev")
        row["same_dtype_ref_mask_mismatch"] = same.get("mask_mismatch")
        row["same_dtype_ref_nonfinite"] = same.get("reference_nonfinite")
        for i in impls:
            for f in CSV_TIMING_FIELDS:
                row[f"{i}_{f}"] = r["timings"].get(i, {}).get(f)
        row.update(machine)
        rows.append(row)
    return header, rows


def write_rows(header: list[str], rows: list[dict[str, Any]], path: str) -> None:
    """Write ``rows`` under ``header`` as CSV (``None`` as an empty cell)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def write_csv(data: dict[str, Any], path: str) -> None:
    """Write the results of an ASH run as CSV, one row per case (the raw samples are in the JSON)."""
    write_rows(*csv_rows(data), path)
