"""``speedup.png``: ash_ext's speed-up over the reference against batch size, one panel per shape."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from .cases import SHAPES
from .report import geomean


def matplotlib_available() -> bool:
    """Whether matplotlib can be found (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(data: dict[str, Any], path: str) -> bool:
    """Plot ash_ext's speed-up over the reference against batch size, one panel per shape.

    One line per dtype and variant (geometric mean over the percentiles). Returns ``False``
    without writing anything when matplotlib is not installed or no case has a speed-up.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    results = [r for r in data["results"] if r.get("speedup_vs_reference")]
    if not results:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    cols = min(3, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    styles = {"float32": "-", "float16": "--", "bfloat16": ":", "float64": "-."}
    colors = {"ash-p": "tab:blue", "ash-b": "tab:orange", "ash-s": "tab:green"}
    for ax, shape in zip(axes.flat, shapes):
        lines: dict[tuple[str, str], dict[int, list[float]]] = {}
        for r in results:
            if r["shape"] == shape:
                lines.setdefault((r["dtype"], r["variant"]), {}).setdefault(r["batch"], []).append(
                    r["speedup_vs_reference"]
                )
        for (dtype, variant), points in lines.items():
            xs = sorted(points)
            ax.plot(
                xs,
                [geomean(points[b]) for b in xs],
                linestyle=styles.get(dtype, "-"),
                color=colors.get(variant),
                marker="o",
                markersize=3,
                label=f"{variant} {dtype}",
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch"] for r in results if r["shape"] == shape})
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{shape} {list(SHAPES[shape].dims)}", fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over the reference")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    m = data["meta"]["machine"]
    fig.suptitle(
        f"ash_ext {m['ash_ext']} vs the topk+scatter reference on {m['device_name']} ({m['device']}), "
        f"torch {m['torch']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
