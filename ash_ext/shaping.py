"""Activation shaping at any layer of any model, with forward hooks that never outlive their use.

:func:`shaping` shapes the output (or the first positional input) of a named submodule for the
duration of a ``with`` block. On each (module, side) at most one ash_ext hook is registered at a
time: nested or repeated ``shaping`` blocks on the same layer stack, the innermost one applies
(results never compound) and the outer one is restored on exit; the hook is removed when the
last block exits, also on an exception.

:class:`ModelPrefix` and :class:`ModelSuffix` are the ``backbone`` and default ``head`` that
``ASH.from_model`` / ``SCALE.from_model`` / ``ReAct.from_model`` build from an unsplit model, with
hooks rather than by splitting the architecture.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils.hooks import RemovableHandle

from . import functional
from ._semantics import canonical_name, check_percentile

#: The shaping methods :func:`shaping` knows.
METHODS: Tuple[str, ...] = ("ash-p", "ash-b", "ash-s", "scale", "react")
#: Where a layer is shaped: its first positional input or its output.
SIDES: Tuple[str, ...] = ("input", "output")
#: The ash_ext function behind each method but "react".
_FUNCTIONS: Dict[str, str] = {"ash-p": "ash_p", "ash-b": "ash_b", "ash-s": "ash_s", "scale": "scale"}

Percentile = Union[float, Tensor]
Shaper = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def check_side(on: object) -> str:
    """Return ``on`` if it is ``"input"`` or ``"output"``, else raise ``ValueError`` naming it."""
    if not isinstance(on, str) or on not in SIDES:
        raise ValueError(f"on must be 'input' or 'output', got {on!r}")
    return on


def _check_clip_value(name: str, value: object) -> float:
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return number


def resolve_layer(model: Module, layer: str) -> Module:
    """The submodule of ``model`` named ``layer`` (dotted names such as ``"layer4.1"``; ``""`` is
    ``model`` itself).

    :raises TypeError: if ``model`` is not a module or ``layer`` not a string
    :raises ValueError: if there is no such submodule; the message lists the closest valid names
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a submodule name (str), got {layer!r} of type {type(layer).__name__}")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        pass
    import difflib  # only for the error message

    names = [name for name, _ in model.named_modules() if name]
    closest = difflib.get_close_matches(layer, names, n=5, cutoff=0.0)
    listed = ", ".join(repr(name) for name in closest) if closest else "(it has no submodules)"
    raise ValueError(
        f"{type(model).__name__} has no submodule {layer!r}; closest of its {len(names)} submodule names: {listed}"
    )


def make_shaper(
    method: str = "ash-s",
    percentile: Percentile = 0.65,
    *,
    threshold: Optional[float] = None,
    clip: Optional[float] = None,
) -> Shaper:
    """The out-of-place function ``x -> shaped x`` for a shaping ``method``.

    ``"ash-p"``, ``"ash-b"``, ``"ash-s"`` and ``"scale"`` call ash_ext's function of that name
    with ``percentile`` (and ``clip``: clip at ``clip`` first, ReAct + ASH/SCALE in one pass);
    ``"react"`` clips at ``threshold`` (``x.clamp(max=threshold)``, ReAct) and takes no percentile.

    :raises ValueError: for an unknown method, ``"react"`` without ``threshold`` (or with ``clip``),
        ``threshold`` with another method, a bad percentile or a NaN threshold / clip
    :raises TypeError: for a percentile, threshold or clip that is not a number
    """
    method = canonical_name("method", method, METHODS)
    if method == "react":
        if threshold is None:
            raise ValueError("method='react' needs threshold= (the clipping value, e.g. a fitted ReAct.threshold)")
        if clip is not None:
            raise ValueError("method='react' clips at threshold=; clip= is for the ASH variants and 'scale'")
        limit = _check_clip_value("threshold", threshold)

        def react(x: Tensor) -> Tensor:
            return torch.clamp(x, max=limit)

        return react
    if threshold is not None:
        raise ValueError(f"threshold= is for method='react'; to clip before {method!r} pass clip=")
    fraction: Percentile = percentile if isinstance(percentile, Tensor) else check_percentile(percentile)
    function: Callable[..., Tensor] = getattr(functional, _FUNCTIONS[method])
    if clip is None:

        def shape(x: Tensor) -> Tensor:
            return function(x, fraction)

        return shape
    bound = _check_clip_value("clip", clip)

    def shape_clipped(x: Tensor) -> Tensor:
        return function(x, fraction, clip=bound)

    return shape_clipped


# --------------------------------------------------------------------------------------------
# One hook per (module, side), applying the innermost active shaping
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    stack: List[Tuple[object, Shaper]] = field(default_factory=list)
    handle: Optional[RemovableHandle] = None


_SLOTS: weakref.WeakKeyDictionary[Module, Dict[str, _Slot]] = weakref.WeakKeyDictionary()


def _output_hook(shaper: Shaper) -> Callable[[Module, Any, Any], Tensor]:
    def hook(module: Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"shaping on='output' needs a layer that returns a tensor; {type(module).__name__} "
                f"returned {type(output).__name__}"
            )
        return shaper(output)

    return hook


def _input_hook(shaper: Shaper) -> Callable[[Module, Tuple[Any, ...]], Tuple[Any, ...]]:
    def pre_hook(module: Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(
                f"shaping on='input' shapes the first positional argument of {type(module).__name__}, "
                f"which must be a tensor; got {type(args[0]).__name__ if args else 'no positional argument'}"
            )
        return (shaper(args[0]),) + tuple(args[1:])

    return pre_hook


def _register(module: Module, side: str, shaper: Shaper) -> RemovableHandle:
    if side == "output":
        return module.register_forward_hook(_output_hook(shaper))
    return module.register_forward_pre_hook(_input_hook(shaper))


def _refresh(module: Module, side: str, slot: _Slot) -> None:
    """Make the registered hook the one of the top of the stack (or none)."""
    if slot.handle is not None:
        slot.handle.remove()
        slot.handle = None
    if slot.stack:
        slot.handle = _register(module, side, slot.stack[-1][1])


def _push(module: Module, side: str, shaper: Shaper) -> object:
    slots = _SLOTS.get(module)
    if slots is None:
        slots = {}
        _SLOTS[module] = slots
    slot = slots.setdefault(side, _Slot())
    token = object()
    slot.stack.append((token, shaper))
    _refresh(module, side, slot)
    return token


def _pop(module: Module, side: str, token: object) -> None:
    slots = _SLOTS.get(module, {})
    slot = slots.get(side)
    if slot is None:
        return
    was_top = bool(slot.stack) and slot.stack[-1][0] is token
    slot.stack = [entry for entry in slot.stack if entry[0] is not token]
    if was_top or not slot.stack:
        _refresh(module, side, slot)
    if not slot.stack:
        del slots[side]
        if not slots:
            _SLOTS.pop(module, None)


def active_shapings(model: Module) -> int:
    """How many ash_ext shaping hooks are registered on ``model`` and its submodules (0 outside
    every :func:`shaping` block)."""
    return sum(slot.handle is not None for m in model.modules() for slot in _SLOTS.get(m, {}).values())


@contextlib.contextmanager
def shaped_by(model: Module, layer: str, shaper: Shaper, on: str = "output") -> Iterator[Module]:
    """Like :func:`shaping`, with any out-of-place function ``shaper: Tensor -> Tensor`` (the
    detectors use it with their current hyperparameters)."""
    module = resolve_layer(model, layer)
    side = check_side(on)
    token = _push(module, side, shaper)
    try:
        yield model
    finally:
        _pop(module, side, token)


class Shaping:
    """The context manager :func:`shaping` returns; re-entrant (each ``with`` pushes, each exit pops)."""

    def __init__(
        self,
        model: Module,
        layer: str,
        method: str = "ash-s",
        percentile: Percentile = 0.65,
        *,
        on: str = "output",
        threshold: Optional[float] = None,
        clip: Optional[float] = None,
    ) -> None:
        self.module = resolve_layer(model, layer)
        self.model = model
        self.layer = layer
        self.on = check_side(on)
        self.shaper = make_shaper(method, percentile, threshold=threshold, clip=clip)
        self.method = canonical_name("method", method, METHODS)
        self._tokens: List[object] = []

    def __enter__(self) -> Module:
        self._tokens.append(_push(self.module, self.on, self.shaper))
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        if self._tokens:
            _pop(self.module, self.on, self._tokens.pop())

    def __repr__(self) -> str:
        return f"shaping({type(self.model).__name__}, {self.layer!r}, method={self.method!r}, on={self.on!r})"


def shaping(
    model: Module,
    layer: str,
    method: str = "ash-s",
    percentile: Percentile = 0.65,
    *,
    on: str = "output",
    threshold: Optional[float] = None,
    clip: Optional[float] = None,
) -> Shaping:
    """Shape the output (``on="output"``) or first positional input (``on="input"``) of
    ``model``'s submodule ``layer`` while a ``with`` block runs; the block gets ``model``.

    .. code-block:: python

        with ash_ext.shaping(model, "avgpool", method="ash-s", percentile=0.9):
            logits = model(images)

    :param model: any ``torch.nn.Module``
    :param layer: dotted submodule name, as ``model.named_modules()`` gives it (``"layer4"``,
        ``"layer4.1"``, ``"heads"``)
    :param method: ``"ash-p"``, ``"ash-b"``, ``"ash-s"``, ``"scale"`` or ``"react"``
    :param percentile: fraction of each sample's values pruned (a float, a 0-d or ``[B]`` tensor);
        not used by ``"react"``
    :param on: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook)
    :param threshold: ReAct's clipping value; required by ``"react"`` and only accepted by it
    :param clip: clip at this value before an ASH variant or ``"scale"`` (ReAct + ASH, fused)

    Everything is checked when ``shaping(...)`` is called. The shaping is out of place (the
    layer's output or input tensor is not modified) and differentiable as ash_ext's functions
    are. A submodule called several times in one forward is shaped at every call. Nested blocks
    on the same layer and side do not compound: the innermost applies.

    :raises ValueError: unknown layer (the message lists the closest names), ``on`` not
        ``"input"`` / ``"output"``, unknown method, bad method arguments
    """
    return Shaping(model, layer, method, percentile, on=on, threshold=threshold, clip=clip)


# --------------------------------------------------------------------------------------------
# An unsplit model as backbone + head
# --------------------------------------------------------------------------------------------


class _Stop(BaseException):
    """Raised by the capturing hook to end the forward at the layer (BaseException, so that a
    model's ``except Exception`` does not swallow it)."""


class ModelPrefix(Module):
    """The ``backbone`` of a detector built with ``from_model``: runs ``model`` up to ``layer`` and
    returns the layer's output (or first positional input), stopping the forward there.

    The activation is taken before any :func:`shaping` of that layer. If the layer runs several
    times in one forward, its first call is taken.
    """

    def __init__(
        self, model: Module, layer: str, on: str = "output", observer: Optional[Callable[[Any], None]] = None
    ) -> None:
        super().__init__()
        resolve_layer(model, layer)
        self.model = model
        self.layer = layer
        self.on = check_side(on)
        self._observer = observer  # ModelSuffix.observe: the head replays inputs shaped like these

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, on={self.on!r}"

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The activations ``[B, ...]`` of ``layer`` for inputs ``x`` (extra arguments go to ``model``)."""
        module = resolve_layer(self.model, self.layer)
        if self._observer is not None:
            self._observer(x)
        captured: List[Tensor] = []

        def take_output(mod: Module, inputs: Any, output: Any) -> None:
            captured.append(output)
            raise _Stop

        def take_input(mod: Module, inputs: Tuple[Any, ...]) -> None:
            captured.append(inputs[0] if inputs else None)
            raise _Stop

        if self.on == "output":
            handle = module.register_forward_hook(take_output, prepend=True)
        else:
            handle = module.register_forward_pre_hook(take_input, prepend=True)
        try:
            self.model(x, *args, **kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self.model).__name__}.forward did not call its submodule {self.layer!r}")
        if not isinstance(captured[0], Tensor):
            raise TypeError(f"the {self.on} of {self.layer!r} is {type(captured[0]).__name__}, not a tensor")
        return captured[0]


class ModelSuffix(Module):
    """The default ``head`` of a detector built with ``from_model``: the rest of ``model`` after
    ``layer``'s output (or from its input), computed by hooks, not by splitting the model.

    ``forward(activations)`` runs ``model`` on a zero input shaped like the inputs it last saw
    (``observe``: the detector's ``predict`` and ``backbone`` record them; or ``example_input``),
    with the layer's output (or first positional input) replaced by ``activations``. That is the
    hand-split head exactly when the rest of the model depends on the input only through this
    layer (a "cut": ``avgpool``, ``layer4`` or ``fc`` of a ResNet, ``heads`` of a ViT); the first
    call checks it, by comparing the results for two different placeholder inputs, and raises
    ``ValueError`` if they differ (then pass ``head=`` to ``from_model``). The prefix is computed
    too, on the placeholder, so this head costs a full forward: pass ``head=`` when
    ``predict_feature_maps`` should be cheap. The model must be in ``eval()`` mode, since a
    training-mode forward on placeholders would update batch-norm statistics.
    """

    def __init__(self, model: Module, layer: str, on: str = "output", example_input: Optional[Tensor] = None) -> None:
        super().__init__()
        resolve_layer(model, layer)
        self.model = model
        self.layer = layer
        self.on = check_side(on)
        self._input_spec: Optional[Tuple[Tuple[int, ...], torch.dtype]] = None
        self._checked = False
        if example_input is not None:
            self.observe(example_input)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, on={self.on!r}"

    def observe(self, x: object) -> None:
        """Record the per-sample shape and dtype of a model input ``x`` (for the placeholder)."""
        if isinstance(x, Tensor) and x.dim() >= 1:
            self._input_spec = (tuple(x.shape[1:]), x.dtype)

    def _replay(self, activations: Tensor, placeholder: Tensor) -> Any:
        module = resolve_layer(self.model, self.layer)
        if self.on == "output":
            handle = module.register_forward_hook(lambda mod, inputs, output: activations)
        else:
            handle = module.register_forward_pre_hook(lambda mod, inputs: (activations,) + tuple(inputs[1:]))
        try:
            return self.model(placeholder)
        finally:
            handle.remove()

    def forward(self, activations: Tensor) -> Any:
        """The model's output when ``layer``'s output (or input) is ``activations``."""
        if self._input_spec is None:
            raise RuntimeError(
                f"the head after {self.layer!r} replays the model and needs the shape of its inputs: call "
                "predict() or backbone() once, or pass example_input= (or head=) to from_model"
            )
        if any(module.training for module in self.model.modules()):
            raise RuntimeError("put the model in eval() mode: the replayed head would update batch-norm statistics")
        shape, dtype = self._input_spec
        size = (activations.shape[0],) + shape
        placeholder = torch.zeros(size, dtype=dtype, device=activations.device)
        result = self._replay(activations, placeholder)
        if not self._checked:
            other = self._replay(activations, torch.ones(size, dtype=dtype, device=activations.device))
            if not (isinstance(result, Tensor) and isinstance(other, Tensor) and torch.equal(result, other)):
                raise ValueError(
                    f"the rest of {type(self.model).__name__} after {self.layer!r} ({self.on}) depends on more than "
                    "that layer's activations; pass head= to from_model"
                )
            self._checked = True
        return result
