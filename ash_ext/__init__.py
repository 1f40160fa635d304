"""ash_ext: fused ASH (Activation SHaping, ICLR 2023) for PyTorch, with C++ and CUDA kernels.

Public API: :func:`ash_p`, :func:`ash_b`, :func:`ash_s`, :func:`scale` (SCALE), :func:`shape`,
:func:`topk_stats`, :func:`lts_factor` (LTS), :func:`react_threshold` (ReAct's fit), the detectors,
and :func:`implementation_for` / :func:`compiled_with_cuda` / :func:`cpu_isa` to see which
implementation runs.
"""

from ._ops import FORCE_FALLBACK_ENV, compiled_with_cuda, extension_loaded, fallback_forced, implementation_for
from ._semantics import kept_count
from .cpu_dispatch import (
    CPU_ISA_ENV,
    CPU_SIMD_ENV,
    cpu_isa,
    cpu_isas,
    cpu_simd_available,
    cpu_simd_enabled,
    set_cpu_isa,
    set_cpu_simd,
)
from .detector import ASH, LTS, SCALE, ReAct, energy_score
from .detector_base import ModelNotSetException, RequiresFittingException
from .functional import TopkStats, ash_b, ash_p, ash_s, lts_factor, scale, shape, topk_stats
from .percentile import react_threshold
from .shaping import shaping

__version__ = "0.1.0"

__all__ = [
    "ASH",
    "LTS",
    "ModelNotSetException",
    "ReAct",
    "RequiresFittingException",
    "SCALE",
    "shaping",
    "CPU_ISA_ENV",
    "CPU_SIMD_ENV",
    "FORCE_FALLBACK_ENV",
    "ash_b",
    "ash_p",
    "ash_s",
    "compiled_with_cuda",
    "cpu_isa",
    "cpu_isas",
    "cpu_simd_available",
    "cpu_simd_enabled",
    "energy_score",
    "extension_loaded",
    "fallback_forced",
    "implementation_for",
    "kept_count",
    "lts_factor",
    "react_threshold",
    "scale",
    "set_cpu_isa",
    "set_cpu_simd",
    "shape",
    "topk_stats",
    "TopkStats",
]
