"""ash_ext: fused ASH (Activation SHaping, ICLR 2023) for PyTorch, with C++ and CUDA kernels.

Public API: :func:`ash_p`, :func:`ash_b`, :func:`ash_s`, :func:`scale` (SCALE), :func:`shape`,
:func:`topk_stats`, :func:`lts_factor` (LTS), :func:`react_threshold` (ReAct's fit), the detectors,
:func:`implementation_for` / :func:`compiled_with_cuda` / :func:`cpu_isa` to see which
implementation runs, and :func:`onnx_translation_table` / :func:`register_onnx_symbolics` for
ONNX export.
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

# The ONNX export functions live in ash_ext.onnx_export, imported when first asked for.
_LAZY = {"onnx_translation_table": "onnx_export", "register_onnx_symbolics": "onnx_export"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "onnx_translation_table",
    "react_threshold",
    "register_onnx_symbolics",
    "scale",
    "set_cpu_isa",
    "set_cpu_simd",
    "shape",
    "topk_stats",
    "TopkStats",
]
