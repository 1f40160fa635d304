"""Which ISA build of the CPU kernel runs: the best this CPU supports, or ``ASH_EXT_CPU_ISA``.

The CPU kernel is one source compiled for several instruction sets -- ``baseline`` (x86-64 SSE2,
or the build's default target elsewhere), ``avx2`` (AVX2 + FMA + F16C) and ``avx512`` (AVX-512
F/BW/VL/DQ) -- and every build gives bit-identical results; only speed differs.
``ASH_EXT_CPU_ISA=auto|avx512|avx2|baseline`` is read at import; asking for an ISA the CPU lacks
makes the import fail with a ``ValueError`` naming the ones it has. ``ASH_EXT_CPU_SIMD`` (the old
switch: ``0`` ran the portable loops) still works for one release as an alias: ``0`` means
``baseline``, anything else ``auto``.
"""

from __future__ import annotations

import os
import warnings

from ._ops import _C

#: Environment variable choosing the CPU kernel's ISA build at import.
CPU_ISA_ENV = "ASH_EXT_CPU_ISA"
#: The deprecated switch ``ASH_EXT_CPU_SIMD`` (``0``: baseline), an alias of ``ASH_EXT_CPU_ISA``.
CPU_SIMD_ENV = "ASH_EXT_CPU_SIMD"
CPU_ISA_NAMES = ("baseline", "avx2", "avx512")


def cpu_isa() -> str:
    """The ISA build of the CPU kernel that runs (``"baseline"``, ``"avx2"`` or ``"avx512"``).

    ``"none"`` when the extension is not built (the pure-PyTorch fallback serves every call).
    """
    return "none" if _C is None else str(_C.cpu_isa())


def cpu_isas() -> tuple[str, ...]:
    """The ISA builds this CPU (and this build) can run, best last; empty without the extension."""
    return () if _C is None else tuple(_C.cpu_isas())


def set_cpu_isa(name: str) -> str:
    """Choose the CPU kernel's ISA build for the whole process; returns the previous one's name.

    ``name`` is one of :data:`CPU_ISA_NAMES` or ``"auto"`` (the best supported). Raises
    ``ValueError`` naming the supported ones for an ISA this CPU or build cannot run, and
    ``RuntimeError`` without the extension. A call running on another thread at the same time
    may finish on either build (their results are identical).
    """
    if not isinstance(name, str):
        raise TypeError(f"the CPU ISA must be a string, got {type(name).__name__}")
    if _C is None:
        raise RuntimeError("ash_ext's extension is not built: there is no CPU kernel to configure")
    wanted = name.strip().lower()
    if wanted == "auto":
        wanted = cpu_isas()[-1]
    if wanted not in CPU_ISA_NAMES:
        raise ValueError(f"unknown CPU ISA {name!r}: expected auto, {', '.join(reversed(CPU_ISA_NAMES))}")
    return str(_C.set_cpu_isa(wanted))


def cpu_simd_enabled() -> bool:
    """Deprecated (use :func:`cpu_isa`): whether a vector ISA build above the baseline runs."""
    return cpu_isa() not in ("none", "baseline")


def cpu_simd_available() -> bool:
    """Deprecated (use :func:`cpu_isas`): whether this CPU can run an ISA build above the baseline."""
    return len(cpu_isas()) > 1


def set_cpu_simd(enabled: bool) -> bool:
    """Deprecated (use :func:`set_cpu_isa`): the best build when on, the baseline when off.

    Returns whether a build above the baseline ran before. Without the extension it does nothing.
    """
    if _C is None:
        return False
    previous = set_cpu_isa("auto" if enabled else "baseline")
    return previous != "baseline"


def _apply_environment() -> None:
    """Applies ``ASH_EXT_CPU_ISA`` (or the deprecated ``ASH_EXT_CPU_SIMD``) at import."""
    requested = os.environ.get(CPU_ISA_ENV, "").strip()
    legacy = os.environ.get(CPU_SIMD_ENV)
    if not requested and legacy is not None:
        warnings.warn(
            f"{CPU_SIMD_ENV} is deprecated; use {CPU_ISA_ENV}=baseline (for {CPU_SIMD_ENV}=0) or {CPU_ISA_ENV}=auto",
            DeprecationWarning,
            stacklevel=3,
        )
        requested = "baseline" if legacy.strip() == "0" else "auto"
    if not requested or _C is None:
        return
    try:
        set_cpu_isa(requested)
    except ValueError as error:
        raise ValueError(f"{CPU_ISA_ENV}={requested}: {error}") from None


_apply_environment()
