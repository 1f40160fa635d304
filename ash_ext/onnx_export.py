"""ONNX translations of the ash_ext ops, so that a model calling ash_ext exports to a graph of
standard ONNX operators that any ONNX runtime runs without ash_ext.

Two exporters are served:

* ``torch.onnx.export(..., dynamo=True)`` (the default): pass
  ``custom_translation_table=ash_ext.onnx_translation_table()``. It maps
  ``torch.ops.ash_ext.ash.default`` (every shaping variant, and ``inplace=True`` calls, which
  ash_ext records under torch.export as ``ash`` plus a ``copy_``: the mutable ``ash_`` would
  reach the exporter as ``auto_functionalized_v2``, which it cannot translate; so an in-place
  model exports through torch.onnx's first strategy, non-strict torch.export, not through the
  strict one) and ``torch.ops.ash_ext.topk_stats.default``
  (``ash_ext.topk_stats``, ``ash_ext.lts_factor``) to ONNX Script functions. torch 2.14 builds
  its translation registry afresh for every export, from its own and onnxscript's private
  tables, and offers no public registry a library could add to, so the argument is needed.
* ``torch.onnx.export(..., dynamo=False)`` (TorchScript): call
  :func:`register_onnx_symbolics` once; it registers the same graphs for opset 13 and later.
  ``inplace=True`` is traced as ``ash`` plus ``copy_`` too, which this exporter handles for
  intermediate tensors; it cannot export a ``copy_`` into a graph input (``aten::copy`` is
  unsupported, as for any in-place write to an input), so shape a model input out of place.

Both build one graph (:func:`_shape_graph`, :func:`_stats_graph`) from these operators: Reshape,
Cast, Where, comparisons, TopK, ScatterElements, GatherElements, CumSum, ReduceSum, ReduceProd,
Exp, Range. Per sample of ``n`` values (the row-major flattening of all dimensions but the first):

* The clamp bounds (ReAct's clip, LTS's clamp at 0) are applied first, as ``torch.clamp`` does
  (a NaN stays NaN; a bound is rounded to a 16-bit input's dtype as torch rounds it).
* Selection: ``TopK`` (largest, sorted) over the sample with NaN mapped to +inf, ``K = k`` for
  one k and ``K = n`` with a rank test ``rank < k[b]`` for per-sample ks, then a ``ScatterElements``
  of the ranks into a boolean mask. ONNX's TopK breaks ties by the lower index (the spec's
  rule, which onnxruntime's CPU kernel follows), and that is ash_ext's tie rule: among values
  equal to the k-th largest, the ones with the smallest logical index are kept, exactly k per
  sample. -0.0 and +0.0 compare equal, so they tie, as in ash_ext. NaN ranks above +inf in
  ash_ext; the graph restores that order where TopK cannot see it (NaN and +inf share TopK's key):
  the NaNs and +infs are ranked by running counts (CumSum) in index order, NaNs first.
* Sums are taken in float32 for float16/bfloat16/float32 inputs and in float64 for float64 ones:
  16-bit inputs are widened to float32 (exactly) for the whole graph and the result is rounded
  back once, as ash_ext rounds it. ASH-B's fill is ``s1 / max(k, 1)``; ASH-S's and SCALE's
  factor is ``exp(s1 / s2)`` with ash_ext's zero-s2 rule (0 where s1 < 0, else 1); values that
  are not kept are +0.0, a kept -0.0 stays -0.0 (the graph is written around onnxruntime's CPU
  Where, which turns a -0.0 from its first value input into +0.0); a per-sample k outside
  [0, n] (an invalid fraction in a per-sample percentile tensor, which eager CPU calls reject)
  gives a NaN sample, as on CUDA.
* ``topk_stats``'s threshold is the k-th largest value in ash_ext's order (NaN for k = 0, +0.0
  for a zero).

Limits: k is a constant of the graph (computed from n at export, as under ``torch.jit.trace``),
so the sample dimensions must stay fixed; the batch may vary. Sums may differ from ash_ext's in
the last bits (another summation order); the kept set does not. onnxruntime's CPU provider runs
the graph for float32, float64 and float16 inputs, and for bfloat16 ones too (the graph computes
in float32 between two Casts; the rest of a bfloat16 model needs bfloat16 kernels of its own).

onnxscript is imported only when a translation runs, and torch.onnx only by
:func:`register_onnx_symbolics`, so importing this module (and ash_ext) stays cheap.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from ._ops import extension_loaded

__all__ = ["onnx_translation_table", "register_onnx_symbolics", "TORCHSCRIPT_MIN_OPSET"]

#: The lowest opset :func:`register_onnx_symbolics` serves (ReduceSum and Unsqueeze take their
#: axes as inputs from opset 13).
TORCHSCRIPT_MIN_OPSET = 13

# ONNX TensorProto element types (the codes of onnx.TensorProto, written out to keep onnx unimported).
_FLOAT, _INT64, _BOOL, _FLOAT16, _DOUBLE, _BFLOAT16 = 1, 7, 9, 10, 11, 16
_TORCH_DTYPE = {
    _FLOAT: torch.float32,
    _INT64: torch.int64,
    _BOOL: torch.bool,
    _FLOAT16: torch.float16,
    _DOUBLE: torch.float64,
    _BFLOAT16: torch.bfloat16,
}
_SHAPED_CODES = (_FLOAT, _FLOAT16, _DOUBLE, _BFLOAT16)

# The variant codes of the compiled op (see _semantics.VARIANT_CODES).
_ASH_P, _ASH_B, _ASH_S, _SCALE = 0, 1, 2, 3


class _Builder:
    """What the graph code needs from an exporter: ``op`` adds an ONNX node (a tuple of values for
    ``outputs > 1``), ``const`` a constant made from a torch tensor."""

    def op(self, name: str, *inputs: Any, outputs: int = 1, **attrs: Any) -> Any:
        raise NotImplementedError

    def const(self, value: torch.Tensor) -> Any:
        raise NotImplementedError


class _ScriptBuilder(_Builder):
    """Builds through ONNX Script, as the dynamo exporter's translations do (it records the calls)."""

    def __init__(self) -> None:
        import onnx_ir
        import onnxscript

        self._opset = onnxscript.opset18
        self._ir = onnx_ir

    def op(self, name: str, *inputs: Any, outputs: int = 1, **attrs: Any) -> Any:
        return getattr(self._opset, name)(*inputs, **attrs)

    def const(self, value: torch.Tensor) -> Any:
        return self._opset.Constant(value=self._ir.tensor(value.numpy()))


class _TorchScriptBuilder(_Builder):
    """Builds through a TorchScript exporter graph context (``g.op``, typed attribute names)."""

    def __init__(self, graph: Any) -> None:
        self._graph = graph

    @staticmethod
    def _attribute_name(name: str, value: Any) -> str:
        if isinstance(value, int):  # bool included
            return f"{name}_i"
        if isinstance(value, float):
            return f"{name}_f"
        if isinstance(value, str):
            return f"{name}_s"
        raise TypeError(f"unsupported attribute {name}={value!r}")

    def op(self, name: str, *inputs: Any, outputs: int = 1, **attrs: Any) -> Any:
        typed = {self._attribute_name(key, value): value for key, value in attrs.items()}
        return self._graph.op(name, *inputs, outputs=outputs, **typed)

    def const(self, value: torch.Tensor) -> Any:
        return self._graph.op("Constant", value_t=value)


# --------------------------------------------------------------------------------------------
# The graph, shared by both exporters
# --------------------------------------------------------------------------------------------


def _compute_code(code: int) -> int:
    """The element type the graph computes in: float64 for float64 inputs, else float32."""
    if code not in _SHAPED_CODES:
        raise TypeError(f"ash_ext ONNX export: the input must be float16, bfloat16, float32 or float64 (type {code})")
    return _DOUBLE if code == _DOUBLE else _FLOAT


def _scalar(b: _Builder, value: Any, code: int) -> Any:
    return b.const(torch.tensor(value, dtype=_TORCH_DTYPE[code]))


def _int64s(b: _Builder, *values: int) -> Any:
    """A 1-D int64 constant."""
    return b.const(torch.tensor(values, dtype=torch.int64))


def _bound(bound: float, code: int) -> float:
    """A clamp bound as torch.clamp uses it for inputs of type ``code``: rounded to float, then to
    the 16-bit type (exact in the float32 the graph computes in)."""
    if code == _DOUBLE:
        return float(bound)
    return float(torch.tensor(bound, dtype=torch.float32).to(_TORCH_DTYPE[code]).to(torch.float32))


class _Sample:
    """The flattened, clamped samples and the per-sample counts the graphs share."""

    def __init__(
        self,
        b: _Builder,
        x: Any,
        code: int,
        k: int,
        k_per_sample: Optional[Any],
        clamp_min: Optional[float],
        clamp_max: Optional[float],
    ) -> None:
        self.b = b
        self.code = code
        self.compute = _compute_code(code)
        # [B, n] by Reshape, not Flatten: onnxscript 0.7's optimizer rewrites each Flatten into a
        # Reshape whose shape initializer is named after the input, and two Flattens of one tensor
        # (two ash calls on it) then leave a dangling name.
        shape = b.op("Shape", x)
        batch = b.op("Slice", shape, _int64s(b, 0), _int64s(b, 1))
        sample = b.op("ReduceProd", b.op("Slice", shape, _int64s(b, 1), _int64s(b, 2**62)), keepdims=1)
        self.x_shape = shape
        self.batch = batch
        self.flat_shape = b.op("Concat", batch, sample, axis=0)
        flat = b.op("Reshape", x, self.flat_shape)
        if self.compute != code:
            flat = b.op("Cast", flat, to=self.compute)
        if clamp_min is not None:
            low = _bound(clamp_min, code)
            flat = self._replace(b.op("Less", flat, _scalar(b, low, self.compute)), low, flat)
        if clamp_max is not None:
            high = _bound(clamp_max, code)
            flat = self._replace(b.op("Less", _scalar(b, high, self.compute), flat), high, flat)
        self.flat = flat
        self.n = b.op("Gather", self.flat_shape, _scalar(b, 1, _INT64), axis=0)  # 0-d int64
        self.zero = _scalar(b, 0.0, self.compute)
        self.nan = _scalar(b, math.nan, self.compute)
        self.axis = _scalar(b, 1, _INT64)
        self.axes = _int64s(b, 1)
        if k_per_sample is None:
            if k < 0:
                raise ValueError(f"ash_ext ONNX export: k must be >= 0, got {k}")
            self.k: Optional[int] = k
            self.ks = None  # every sample keeps the constant k
            self.k_value = _scalar(b, k, _INT64)
            self.k_column = self.k_value
            self.invalid = None
        else:
            self.k = None
            self.ks = b.op("Cast", k_per_sample, to=_INT64)  # [B]
            self.k_value = self.ks
            self.k_column = b.op("Unsqueeze", self.ks, self.axes)  # [B, 1]
            # ks outside [0, n]: a NaN sample (the CUDA kernels' rule; CPU calls reject them eagerly).
            self.invalid = b.op("Or", b.op("Less", self.ks, _scalar(b, 0, _INT64)), b.op("Greater", self.ks, self.n))
        self._selection: Optional[tuple[Any, Any, Any]] = None

    def _replace(self, condition: Any, bound: float, values: Any) -> Any:
        """``values`` with ``bound`` where ``condition`` holds (a clamp)."""
        b = self.b
        if bound == 0 and math.copysign(1.0, bound) < 0:
            # A bound of -0.0 through Where's X input would come out +0.0 (see keep): zero there,
            # then give those zeros their sign by a product (x * 1 is x, NaN and -0.0 included).
            zeroed = b.op("Where", condition, _scalar(b, 0.0, self.compute), values)
            sign = b.op("Where", condition, _scalar(b, -1.0, self.compute), _scalar(b, 1.0, self.compute))
            return b.op("Mul", zeroed, sign)
        return b.op("Where", condition, _scalar(self.b, bound, self.compute), values)

    def keep(self, values: Any) -> Any:
        """``values`` where the selection keeps them, +0.0 elsewhere.

        The values go through Where's Y input, with a condition that no Not computes: onnxruntime's
        CPU Where merges its two selections with ``x != 0 ? x : y``, which turns a -0.0 from the X
        input into +0.0 (ash_ext keeps a kept -0.0 as it is), while a Y value passes unchanged;
        and its graph optimiser rewrites ``Where(Not(c), a, b)`` into ``Where(c, b, a)``.
        """
        return self.b.op("Where", self.selection()[0], self.zero, values)

    def sum(self, values: Any) -> Any:
        return self.b.op("ReduceSum", values, self.axes, keepdims=0)

    def selection(self) -> tuple[Any, Any, Any]:
        """(mask of the values not kept [B, n], TopK's sorted keys [B, K] or None, NaN count [B, 1])."""
        if self._selection is None:
            self._selection = self._select()
        return self._selection

    def _select(self) -> tuple[Any, Any, Any]:
        # The mask built is that of the dropped values, for keep's Where; see there.
        b, flat = self.b, self.flat
        is_nan = b.op("IsNaN", flat)
        nan_count = b.op("ReduceSum", b.op("Cast", is_nan, to=_INT64), self.axes, keepdims=1)
        everything = b.op("Expand", b.const(torch.tensor(True)), self.flat_shape)
        if self.k == 0:
            return everything, None, nan_count
        # TopK's key: NaN as +inf (TopK has no order for NaN); the order among NaNs and +infs is
        # restored below.
        key = b.op("Where", is_nan, _scalar(b, math.inf, self.compute), flat)
        if self.ks is None:
            count = _int64s(b, self.k)
        else:
            count = b.op("Reshape", self.n, self.axes)  # every value, sorted
        values, indices = b.op("TopK", key, count, axis=1, largest=1, sorted=1, outputs=2)
        if self.ks is None:
            dropped_ranks = b.op("Expand", b.const(torch.tensor(False)), b.op("Shape", indices))
        else:
            ranks = b.op("Range", _scalar(b, 0, _INT64), self.n, _scalar(b, 1, _INT64))
            dropped_ranks = b.op("LessOrEqual", self.k_column, b.op("Unsqueeze", ranks, _int64s(b, 0)))
        dropped = b.op("ScatterElements", everything, indices, dropped_ranks, axis=1)
        # ash_ext ranks NaN above +inf, each group in index order: the first k NaNs are kept, then
        # the first k - (NaN count) +infs. TopK's order is already right for every other value.
        is_inf = b.op("IsInf", flat, detect_negative=0, detect_positive=1)
        nans_before = b.op("CumSum", b.op("Cast", is_nan, to=_INT64), self.axis, exclusive=1)
        infs_before = b.op("CumSum", b.op("Cast", is_inf, to=_INT64), self.axis, exclusive=1)
        keep_nan = b.op("And", is_nan, b.op("Less", nans_before, self.k_column))
        keep_inf = b.op("And", is_inf, b.op("Less", infs_before, b.op("Sub", self.k_column, nan_count)))
        # In the group the kept ones are a subset, so Xor gives the dropped ones (onnxruntime has
        # no boolean Where).
        group = b.op("Or", is_nan, is_inf)
        dropped_in_group = b.op("Xor", group, b.op("Or", keep_nan, keep_inf))
        dropped = b.op("Or", b.op("And", b.op("Not", group), dropped), dropped_in_group)
        return dropped, values, nan_count

    def kept_sum(self) -> Any:
        return self.sum(self.keep(self.flat))

    def finish(self, values: Any) -> Any:
        """``values`` [B, n] back in the input's type and shape."""
        b = self.b
        if self.compute != self.code:
            values = b.op("Cast", values, to=self.code)
        return b.op("Reshape", values, self.x_shape)


def _scale_factor(b: _Builder, s: _Sample, s1: Any, s2: Any) -> Any:
    """exp(s1 / s2), and where s2 == 0 ash_ext's rule: 0 for s1 < 0, else 1 (fallback.scale_factor)."""
    one = _scalar(b, 1.0, s.compute)
    degenerate = b.op("Equal", s2, s.zero)
    ratio = b.op("Div", s1, b.op("Where", degenerate, one, s2))
    rule = b.op("Where", b.op("Less", s1, s.zero), s.zero, one)
    return b.op("Where", degenerate, rule, b.op("Exp", ratio))


def _shape_graph(
    b: _Builder,
    x: Any,
    code: int,
    k: int,
    variant: int,
    k_per_sample: Optional[Any] = None,
    clamp_min: Optional[float] = None,
    clamp_max: Optional[float] = None,
) -> Any:
    """The graph of ``ash_ext::ash(x, k, variant, k_per_sample, clamp_min, clamp_max)``."""
    if variant not in (_ASH_P, _ASH_B, _ASH_S, _SCALE):
        raise ValueError(
            f"ash_ext ONNX export: variant must be 0 (ASH-P), 1 (ASH-B), 2 (ASH-S) or 3 (SCALE): {variant}"
        )
    s = _Sample(b, x, code, k, k_per_sample, clamp_min, clamp_max)
    flat = s.flat
    if variant == _ASH_P:
        result = s.keep(flat)
    elif variant == _ASH_B:
        # k == 0 keeps nothing, so the fill s1 / max(k, 1) is never seen there.
        if s.ks is None:
            divisor = _scalar(b, float(max(k, 1)), s.compute)
        else:
            divisor = b.op("Cast", b.op("Max", s.ks, _scalar(b, 1, _INT64)), to=s.compute)
        fill = b.op("Unsqueeze", b.op("Div", s.sum(flat), divisor), s.axes)
        result = s.keep(fill)
    else:
        factor = _scale_factor(b, s, s.sum(flat), s.kept_sum())
        result = b.op("Mul", flat, b.op("Unsqueeze", factor, s.axes))
        if variant == _ASH_S:
            result = s.keep(result)
    if s.invalid is not None:
        result = b.op("Where", b.op("Unsqueeze", s.invalid, s.axes), s.nan, result)
    return s.finish(result)


def _stats_graph(
    b: _Builder,
    x: Any,
    code: int,
    k: int,
    k_per_sample: Optional[Any] = None,
    clamp_min: Optional[float] = None,
    clamp_max: Optional[float] = None,
) -> tuple[Any, Any, Any]:
    """The graph of ``ash_ext::topk_stats``: (threshold in x's type, total, kept in the sum type)."""
    s = _Sample(b, x, code, k, k_per_sample, clamp_min, clamp_max)
    _, values, nan_count = s.selection()
    total = s.sum(s.flat)
    kept = s.kept_sum()
    if values is None:  # k == 0: no k-th value
        threshold = b.op("Expand", s.nan, s.batch)
    else:
        if s.ks is None:
            kth = b.op("Gather", values, _scalar(b, k - 1, _INT64), axis=1)  # [B]
        else:
            index = b.op("Max", b.op("Sub", s.k_column, _scalar(b, 1, _INT64)), _scalar(b, 0, _INT64))
            index = b.op("Min", index, b.op("Sub", s.n, _scalar(b, 1, _INT64)))
            kth = b.op("Squeeze", b.op("GatherElements", values, index, axis=1), s.axes)
        # TopK saw NaN as +inf: the k-th value is NaN while k <= the NaN count.
        nans = b.op("Squeeze", nan_count, s.axes)
        kth = b.op("Where", b.op("LessOrEqual", s.k_value, nans), s.nan, kth)
        # A zero is reported as +0.0 (its key's canonical value).
        threshold = b.op("Where", b.op("Equal", kth, s.zero), s.zero, kth)
        if s.ks is not None:
            in_range = b.op("And", b.op("GreaterOrEqual", s.ks, _scalar(b, 1, _INT64)), b.op("LessOrEqual", s.ks, s.n))
            threshold = b.op("Where", in_range, threshold, s.nan)
    if s.compute != code:
        threshold = b.op("Cast", threshold, to=code)
    if s.invalid is not None:
        total = b.op("Where", s.invalid, s.nan, total)
        kept = b.op("Where", s.invalid, s.nan, kept)
    return threshold, total, kept


# --------------------------------------------------------------------------------------------
# The dynamo exporter (torch.onnx.export(..., dynamo=True))
# --------------------------------------------------------------------------------------------


def _require_ops() -> None:
    if not extension_loaded():
        raise RuntimeError(
            "ash_ext ONNX export: the compiled extension ash_ext._C is not loaded, so models call the "
            "pure-PyTorch fallback, which torch.onnx exports without these translations"
        )


def _ir_code(x: Any) -> int:
    if x.dtype is None:
        raise TypeError("ash_ext ONNX export: the input's element type is unknown")
    return int(x.dtype)


def _translate_ash(
    x: Any,
    k: int,
    variant: int,
    k_per_sample: Any = None,
    clamp_min: Any = None,
    clamp_max: Any = None,
) -> Any:
    """Translation of ``torch.ops.ash_ext.ash.default`` (traced by the exporter)."""
    return _shape_graph(_ScriptBuilder(), x, _ir_code(x), k, variant, k_per_sample, clamp_min, clamp_max)


def _translate_topk_stats(
    x: Any,
    k: int,
    k_per_sample: Any = None,
    clamp_min: Any = None,
    clamp_max: Any = None,
) -> tuple[Any, Any, Any]:
    """Translation of ``torch.ops.ash_ext.topk_stats.default`` (traced by the exporter)."""
    return _stats_graph(_ScriptBuilder(), x, _ir_code(x), k, k_per_sample, clamp_min, clamp_max)


def onnx_translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The ONNX translations of ash_ext's inference ops, for the dynamo ONNX exporter::

        torch.onnx.export(model, (x,), "model.onnx", dynamo=True,
                          custom_translation_table=ash_ext.onnx_translation_table())

    Keys are the op overloads an exported inference model contains: ``torch.ops.ash_ext.ash.default``
    (``ash_p``, ``ash_b``, ``ash_s``, ``scale``, ``shape``, the detectors and shaping hooks, with
    ``clip``, per-sample percentile tensors and ``inplace=True``) and
    ``torch.ops.ash_ext.topk_stats.default`` (``topk_stats``, ``lts_factor``). Values are functions
    that build the op from standard ONNX operators with ONNX Script; the module docstring of
    :mod:`ash_ext.onnx_export` states what the graph reproduces (the tie rule included). The
    exported model runs in onnxruntime without ash_ext. Needs onnxscript (``pip install
    ash_ext[onnx]``) when the export runs; to merge with other translations, update a copy.
    """
    _require_ops()
    return {
        torch.ops.ash_ext.ash.default: _translate_ash,
        torch.ops.ash_ext.topk_stats.default: _translate_topk_stats,
    }


# --------------------------------------------------------------------------------------------
# The TorchScript exporter (torch.onnx.export(..., dynamo=False))
# --------------------------------------------------------------------------------------------

_TORCHSCRIPT_CODES = {"Float": _FLOAT, "Double": _DOUBLE, "Half": _FLOAT16, "BFloat16": _BFLOAT16}


def _ts_code(x: Any) -> int:
    scalar_type = x.type().scalarType() if hasattr(x.type(), "scalarType") else None
    if scalar_type not in _TORCHSCRIPT_CODES:
        raise TypeError(f"ash_ext ONNX export: unsupported or unknown input element type {scalar_type!r}")
    return _TORCHSCRIPT_CODES[scalar_type]


def _ts_constant(value: Any, kind: str, name: str) -> Any:
    """The Python value of a constant argument of a traced call (None for a None constant)."""
    from torch.onnx import symbolic_helper

    if symbolic_helper._is_none(value):
        return None
    constant = symbolic_helper._maybe_get_const(value, kind)
    if isinstance(constant, torch._C.Value):
        raise ValueError(f"ash_ext ONNX export: {name} must be a constant of the trace")
    return constant


def _ts_optional_tensor(value: Any) -> Optional[Any]:
    from torch.onnx import symbolic_helper

    return None if symbolic_helper._is_none(value) else value


def _symbolic_ash(g: Any, x: Any, k: Any, variant: Any, k_per_sample: Any, clamp_min: Any, clamp_max: Any) -> Any:
    return _shape_graph(
        _TorchScriptBuilder(g),
        x,
        _ts_code(x),
        int(_ts_constant(k, "i", "k")),
        int(_ts_constant(variant, "i", "variant")),
        _ts_optional_tensor(k_per_sample),
        _ts_constant(clamp_min, "f", "clamp_min"),
        _ts_constant(clamp_max, "f", "clamp_max"),
    )


def _symbolic_topk_stats(g: Any, x: Any, k: Any, k_per_sample: Any, clamp_min: Any, clamp_max: Any) -> Sequence[Any]:
    return _stats_graph(
        _TorchScriptBuilder(g),
        x,
        _ts_code(x),
        int(_ts_constant(k, "i", "k")),
        _ts_optional_tensor(k_per_sample),
        _ts_constant(clamp_min, "f", "clamp_min"),
        _ts_constant(clamp_max, "f", "clamp_max"),
    )


def register_onnx_symbolics() -> None:
    """Register the ash_ext ops with the TorchScript ONNX exporter (``torch.onnx.export(...,
    dynamo=False)``), for opset :data:`TORCHSCRIPT_MIN_OPSET` (13) and later.

    The graphs are those of :func:`onnx_translation_table`. Registering again replaces the
    earlier registration. Imports ``torch.onnx`` (not onnxscript), which is why ash_ext does not
    do this on import.
    """
    _require_ops()
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("ash_ext::ash", _symbolic_ash, TORCHSCRIPT_MIN_OPSET)
    register_custom_op_symbolic("ash_ext::topk_stats", _symbolic_topk_stats, TORCHSCRIPT_MIN_OPSET)
