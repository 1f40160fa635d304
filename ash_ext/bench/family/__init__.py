"""``ash-ext bench --methods family``: the rest of the shaping family against its references.

Each method is timed against the function its users call today, in one process and interleaved
round-robin on rotating inputs, with :mod:`ash_ext.bench.timing`'s timer, rotations and warm-up rules:

=============  ==============================================  ==============================================
method         ash_ext                                         reference
=============  ==============================================  ==============================================
``scale``      ``ash_ext.scale(x, p)``                         ``pytorch_ood.detector.scale.scale(x, p)``
``react-ash``  ``ash_ext.ash_s(x, p, clip=t)``                 ``pytorch_ood.detector.ash.ash_s(x.clip(max=t), p)``
``lts``        ``ash_ext.lts_factor(z, p)``                    ``pytorch_ood.detector.LTS.scaling_factor(z, p)``
``topk-stats`` ``ash_ext.topk_stats(x, p)``                    ``torch.topk`` of each sample, its last value and
                                                               the sums of the sample and of the top k
``per-sample`` ``ash_ext.ash_s(x, ps)``, ``ps`` a ``[B]``      ASH-S with one k per sample from one
               tensor of fractions                             ``torch.sort`` of the batch, a rank mask
                                                               ``scatter``-ed back and ``torch.where`` (no
                                                               loop; pytorch-ood takes one percentile only)
``react-fit``  ``ash_ext.react_threshold(acts, p)``            ``float(np.percentile(acts.numpy(), 100 p))``,
                                                               ReAct's fit in pytorch-ood
=============  ==============================================  ==============================================

2-D inputs go to pytorch-ood's 4-D-only functions as the free view ``[B, C, 1, 1]``. Without
pytorch-ood the same algorithms in torch (copied from pytorch-ood 0.4.0) stand in, and the results
say so. Beside the reference and ash_ext each case times ash_ext's pure-PyTorch fallback (not for
``react-fit``, whose fallback sorts all N values) and a roofline: ``x.clone()`` (one read and one
write) for the methods that return a tensor like ``x``, ``x.sum(dim=1)`` (one read) for those that
return statistics. ``per-sample`` also times ``ash_ext.ash_s`` with one float percentile on the
same data, to show what the ``[B]`` tensor costs.

Every case records ash_ext's deviation from the reference on an input where the result is unique
(the k largest values of each sample raised by 1.0, as in :mod:`ash_ext.bench.correctness`; for ``react-ash`` a
clip value above every sample's k-th largest value, so the clipped values are all kept), and flags
it when it exceeds :func:`ash_ext.bench.correctness.deviation_tolerance`, so that a fast wrong result cannot hide.

ReAct's clip value in the timed ``react-ash`` cases is the 0.9-quantile of the data's distribution
(the ReAct paper's percentile). LTS runs at its default ``p = 0.05`` and ReAct's fit at 0.9;
``--percentiles`` sets the others' ASH percentile (per-sample: ``[B]`` fractions spread evenly over
``p - 0.05 .. p + 0.05``).

The modules: :mod:`.cases` (methods, shapes, plans, :class:`FamilyCase`, :func:`expand_methods`,
:func:`suite`), :mod:`.references` (the references and the timed functions), :mod:`.correctness`
(the deviation check), :mod:`.runner` (:func:`run`) and :mod:`.report` (table, summary lines, CSV).
"""

from __future__ import annotations

from .cases import (
    CLIP_QUANTILE,
    DEFAULT_PLAN,
    FIXED_PERCENTILES,
    METHOD_GROUPS,
    METHODS,
    PER_SAMPLE_SPREAD,
    QUICK_PLAN,
    REACT_FIT_DTYPES,
    REFERENCE_LABELS,
    REFERENCES,
    SHAPES,
    SHAPING_METHODS,
    FamilyCase,
    clip_value,
    expand_methods,
    kept_counts,
    per_sample_percentiles,
    pytest_cases,
    suite,
)
from .correctness import deviation, deviation_clip, deviation_input
from .references import (
    IMPLEMENTATIONS,
    implementations,
    per_sample_ash_s_reference,
    react_fit_reference,
    reference_functions,
    topk_stats_reference,
)
from .report import TABLE_COLUMNS, csv_rows, format_table, summary_lines, table_rows, write_csv
from .runner import estimated_seconds, family_cases, impl_names, run

__all__ = [
    "CLIP_QUANTILE",
    "DEFAULT_PLAN",
    "FIXED_PERCENTILES",
    "IMPLEMENTATIONS",
    "METHODS",
    "METHOD_GROUPS",
    "PER_SAMPLE_SPREAD",
    "QUICK_PLAN",
    "REACT_FIT_DTYPES",
    "REFERENCES",
    "REFERENCE_LABELS",
    "SHAPES",
    "SHAPING_METHODS",
    "TABLE_COLUMNS",
    "FamilyCase",
    "clip_value",
    "csv_rows",
    "deviation",
    "deviation_clip",
    "deviation_input",
    "estimated_seconds",
    "expand_methods",
    "family_cases",
    "format_table",
    "impl_names",
    "implementations",
    "kept_counts",
    "per_sample_ash_s_reference",
    "per_sample_percentiles",
    "pytest_cases",
    "react_fit_reference",
    "reference_functions",
    "run",
    "suite",
    "summary_lines",
    "table_rows",
    "topk_stats_reference",
    "write_csv",
]
