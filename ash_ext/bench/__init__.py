"""``ash-ext bench``: ash_ext against the reference algorithm, pytorch-ood, the fallback and a clone.

For every case (a shape, batch size, dtype, percentile and ASH variant) it times, in one process
and interleaved round-robin so that drift hits all of them alike:

* ``reference``   -- the reference algorithm (sorted ``torch.topk`` + ``scatter_``) in place, as
  pytorch-ood 0.3.3 does it (:func:`ash_ext.reference.ash_p_inplace` and friends);
* ``pytorch-ood`` -- ``pytorch_ood.detector.ash.ash_*`` (0.4.0, out of place), when importable;
* ``fallback``    -- ash_ext's pure-PyTorch implementation;
* ``ash_ext``     -- ``ash_ext.ash_*`` out of place (the compiled kernel where there is one);
* ``clone``       -- ``x.clone()``: one read and one write of the tensor, the memory roofline.

Each call gets the next of a rotation of distinct inputs whose total size is at least twice the
last-level cache, so that repeated calls do not time the cache. The in-place reference gets its
own rotation, refilled outside the timed region whenever it wraps around. Times are medians with
quartiles (CUDA events on a GPU, which include the Python-side launch cost of the call;
``time.perf_counter`` on a CPU) after warm-up calls; outputs are freed outside the timed region.
Every case also records the largest deviation of ash_ext's output from the reference's on an
input whose kept set is unique (no ties at the threshold), so that a fast wrong result cannot
hide; for float16 and bfloat16 the reference is evaluated in float32 and rounded to the dtype
(its own half-precision sums overflow float16 on feature maps), and the comparison with the
reference run in the dtype itself is recorded as well.

Use it as a library with :func:`run` and :class:`BenchConfig`, or from the command line
(``python -m ash_ext bench --help``). The modules, one per concern:

* :mod:`.cases` -- the case list: shapes, batch sizes, dtypes, percentiles, variants, :func:`suite`
  and :func:`pytest_cases` (shared with the pytest-benchmark suite in ``benchmarks/``);
* :mod:`.impls` -- the timed functions; :mod:`.correctness` -- ash_ext's deviation from the reference;
* :mod:`.timing` -- input data, rotations, the timer, round-robin interleaving, summaries;
* :mod:`.machine` -- machine facts; :mod:`.contention` -- other processes' CPU use, measured, and the
  wait before timing; :mod:`.estimate` -- the forecast; :mod:`.progress` -- the progress display;
* :mod:`.config` -- :class:`BenchConfig`; :mod:`.runner` -- :func:`run`;
* :mod:`.report` -- the table and summary lines; :mod:`.files` -- JSON and CSV; :mod:`.plot` -- the plot;
* :mod:`.cli` -- the command line (:func:`build_parser`, :func:`main`);
* :mod:`.family` -- the rest of the shaping family (``--methods``), a package of its own.
"""

from __future__ import annotations

from .cases import (
    DATA_KINDS,
    DEFAULT_BATCHES,
    DEFAULT_PERCENTILES,
    DEVIATION_DATA,
    DTYPE_ALIASES,
    DTYPES,
    QUICK_BATCHES,
    QUICK_PERCENTILES,
    SHAPES,
    VARIANTS,
    Case,
    ShapeSpec,
    best_device,
    canonical_variants,
    device_kind,
    pytest_cases,
    suite,
    supported_dtypes,
)
from .cli import build_parser, main, parse_config
from .config import BenchConfig
from .correctness import deviation, deviation_input, deviation_tolerance
from .files import CSV_TIMING_FIELDS, csv_rows, write_csv, write_json
from .impls import IMPLEMENTATIONS, Implementation, implementations, pytorch_ood_version
from .machine import last_level_cache_bytes, machine_info
from .plot import write_plot
from .report import TABLE_COLUMNS, format_table, render_table, summary_lines, table_rows
from .runner import estimated_seconds, run
from .timing import Rotation, make_rotations, summarize, time_interleaved

__all__ = [
    "CSV_TIMING_FIELDS",
    "DATA_KINDS",
    "DEFAULT_BATCHES",
    "DEFAULT_PERCENTILES",
    "DEVIATION_DATA",
    "DTYPES",
    "DTYPE_ALIASES",
    "IMPLEMENTATIONS",
    "QUICK_BATCHES",
    "QUICK_PERCENTILES",
    "SHAPES",
    "TABLE_COLUMNS",
    "VARIANTS",
    "BenchConfig",
    "Case",
    "Implementation",
    "Rotation",
    "ShapeSpec",
    "best_device",
    "build_parser",
    "canonical_variants",
    "csv_rows",
    "deviation",
    "deviation_input",
    "deviation_tolerance",
    "device_kind",
    "estimated_seconds",
    "format_table",
    "implementations",
    "last_level_cache_bytes",
    "machine_info",
    "main",
    "make_rotations",
    "parse_config",
    "pytest_cases",
    "pytorch_ood_version",
    "render_table",
    "run",
    "suite",
    "summarize",
    "summary_lines",
    "supported_dtypes",
    "table_rows",
    "time_interleaved",
    "write_csv",
    "write_json",
    "write_plot",
]
