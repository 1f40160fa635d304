"""The detectors' base classes, written after ``pytorch_ood.api`` (0.4.0), and the interop with it.

ash_ext does not need pytorch-ood. Its detectors derive from the classes here, which give what
pytorch-ood's base classes give (``device``, ``to``, ``get_hyperparameters`` /
``set_hyperparameters``, ``__call__``, ``fit``, ``requires_fit``, ``fit_feature_maps`` /
``fit_features``, moving tensor arguments to the detector's device).

When pytorch-ood is imported (before or after ash_ext), these classes are registered as virtual
subclasses of pytorch-ood's ABCs, so ``isinstance(detector, pytorch_ood.api.Detector)`` holds, and
``isinstance(detector, pytorch_ood.api.FeatureMapsDetector)`` (ASH, SCALE, ReAct) or
``FeaturesDetector`` (LTS), which is what pytorch-ood's ``GridSearch`` looks at to pick its
cached-features path. Registration rather than subclassing keeps ``import ash_ext`` from
importing pytorch-ood (several seconds: its package imports all its datasets and models); a
finder on ``sys.meta_path`` that matches only the name ``pytorch_ood.api`` registers the classes
right after that module runs, and removes itself.
"""

from __future__ import annotations

import abc
import functools
import importlib.abc
import importlib.machinery
import logging
import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor
from torch.nn import Module, Parameter

log = logging.getLogger(__name__)

Self = TypeVar("Self", bound="Detector")

_PYTORCH_OOD_API = "pytorch_ood.api"


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class RequiresFittingException(Exception):
    """Raised when a detector that needs fitting is used before ``fit()`` (as pytorch-ood's)."""

    def __init__(self, msg: str = "You have to call fit() before predict()") -> None:
        super().__init__(msg)


class ModelNotSetException(ValueError):
    """Raised when ``predict()`` or ``fit()`` needs a model that was not given (as pytorch-ood's)."""

    def __init__(self, msg: str = "When using predict(), model must not be None") -> None:
        super().__init__(msg)


_INTEROP_EXCEPTIONS: Dict[type, type] = {}


def interop_exception(ours: type) -> type:
    """The exception class to raise for ``ours``: ``ours`` itself, or, once pytorch-ood is
    imported, a subclass of both ``ours`` and pytorch-ood's class of the same name, so that
    ``except pytorch_ood.api.RequiresFittingException`` catches ash_ext's too."""
    api = sys.modules.get(_PYTORCH_OOD_API)
    theirs = getattr(api, ours.__name__, None) if api is not None else None
    if not isinstance(theirs, type) or not issubclass(theirs, BaseException):
        return ours
    combined = _INTEROP_EXCEPTIONS.get(ours)
    if combined is None or theirs not in combined.__mro__:
        combined = type(ours.__name__, (ours, theirs), {"__module__": ours.__module__, "__doc__": ours.__doc__})
        _INTEROP_EXCEPTIONS[ours] = combined
    return combined


# --------------------------------------------------------------------------------------------
# Metadata (the fields of pytorch-ood's DetectorInfo / Paper)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paper:
    """The publication that introduced a detector."""

    title: str
    venue: str
    year: int
    url: str
    code: Optional[str] = None


@dataclass(frozen=True)
class DetectorInfo:
    """Metadata of a detector: the tasks it supports (``"classification"``, ...) and its paper."""

    tasks: FrozenSet[str] = field(default_factory=lambda: frozenset({"classification"}))
    paper: Optional[Paper] = None
    ai_coded: bool = True


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def check_threshold(value: object) -> Optional[float]:
    """Return ReAct's ``threshold`` as a float (``None`` stays ``None``); it must be a number, not NaN."""
    if value is None:
        return None
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"threshold must be a real number or None, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"threshold must not be NaN, got {value!r}")
    return number


# --------------------------------------------------------------------------------------------
# Device handling (what pytorch_ood.api.Detector does)
# --------------------------------------------------------------------------------------------


def _move_value(value: Any, device: torch.device) -> Any:
    if isinstance(value, Module):
        value.to(device)
        return value
    if isinstance(value, Parameter):
        return Parameter(value.detach().to(device), requires_grad=value.requires_grad)
    if isinstance(value, Tensor):
        return value.to(device)
    owner = getattr(value, "__self__", None)
    if isinstance(owner, Module):  # a bound method of a module, e.g. model.features
        owner.to(device)
        return value
    if isinstance(value, list):
        return [_move_value(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_move_value(v, device) for v in value)
    if isinstance(value, dict):
        for key, inner in value.items():
            value[key] = _move_value(inner, device)
        return value
    return value


def _value_device(value: Any) -> Optional[torch.device]:
    if isinstance(value, Module):
        for tensor in value.parameters():
            return tensor.device
        for tensor in value.buffers():
            return tensor.device
        return None
    if isinstance(value, Tensor):
        return value.device
    owner = getattr(value, "__self__", None)
    if isinstance(owner, Module):
        return _value_device(owner)
    if isinstance(value, (list, tuple)):
        inner_values: Any = value
    elif isinstance(value, dict):
        inner_values = value.values()
    else:
        return None
    for inner in inner_values:
        device = _value_device(inner)
        if device is not None:
            return device
    return None


def on_detector_device(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorator: move a representation method's tensor arguments to the detector's device first,
    as pytorch-ood's ``predict_feature_maps`` / ``predict_features`` / ``fit_*`` wrappers do."""

    @functools.wraps(method)
    def wrapped(self: Detector, *args: Any, **kwargs: Any) -> Tensor:
        device = self.device
        if device is not None:
            args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return method(self, *args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------


class Detector(abc.ABC):
    """Root of ash_ext's detectors, with the behaviour of ``pytorch_ood.api.Detector``.

    ``predict(x)`` scores inputs (higher = more likely OOD), ``__call__`` forwards to it, ``fit``
    does nothing unless ``requires_fit``; ``hyperparameter_space`` lists the candidates pytorch-ood's
    ``GridSearch`` tries, ``get_hyperparameters`` / ``set_hyperparameters`` read and write them.
    """

    #: Whether ``fit(...)`` must be called before scoring.
    requires_fit: ClassVar[bool] = False
    #: Search space for hyperparameter optimisation: name -> candidate values.
    hyperparameter_space: Dict[str, List[Any]] = {}
    #: The detector's paper and tasks.
    info: ClassVar[Optional[DetectorInfo]] = None

    def __init__(self) -> None:
        register_with_pytorch_ood()

    @property
    def device(self) -> Optional[torch.device]:
        """The device of the detector's modules and tensors, if one can be inferred (else the last
        device given to :meth:`to`, else ``None``)."""
        for name, value in vars(self).items():
            if name == "_device":
                continue
            device = _value_device(value)
            if device is not None:
                return device
        return getattr(self, "_device", None)

    def to(self: Self, device: Union[str, torch.device]) -> Self:
        """Move the detector's modules, tensors and containers of them to ``device``; returns ``self``."""
        target = torch.device(device)
        self._device = target
        for name, value in list(vars(self).items()):
            if name != "_device":
                setattr(self, name, _move_value(value, target))
        return self

    def get_hyperparameters(self) -> Dict[str, Any]:
        """The current value of each hyperparameter named in :attr:`hyperparameter_space`."""
        return {name: getattr(self, name) for name in self.hyperparameter_space}

    def set_hyperparameters(self: Self, **kwargs: Any) -> Self:
        """Set hyperparameters by name (each must be in :attr:`hyperparameter_space`); returns ``self``.

        :raises ValueError: for a name that is not a known hyperparameter, or a bad value
        """
        for name in kwargs:
            if name not in self.hyperparameter_space:
                raise ValueError(
                    f"Unknown hyperparameter '{name}' for {type(self).__name__}. "
                    f"Known hyperparameters: {list(self.hyperparameter_space)}"
                )
        for name, value in kwargs.items():
            setattr(self, name, value)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """Same as :meth:`predict`."""
        return self.predict(*args, **kwargs)

    def fit(self: Self, data_loader: Any = None, *args: Any, **kwargs: Any) -> Self:
        """Fit the detector on a loader of ``(x, y)`` batches; detectors that need no fitting return ``self``.

        :raises NotImplementedError: if the detector requires fitting but does not implement it
        """
        if self.requires_fit:
            raise NotImplementedError(f"{type(self).__name__} requires fitting and must implement fit().")
        return self

    @abc.abstractmethod
    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for inputs ``x`` (higher = more likely out of distribution)."""


class FeatureMapsDetector(Detector):
    """Detectors with a ``predict_feature_maps`` entry (as ``pytorch_ood.api.FeatureMapsDetector``):
    ``backbone`` gives the activations, ``predict_feature_maps`` scores them."""

    def fit_feature_maps(self: Self, feature_maps: Any = None, y: Any = None, *args: Any, **kwargs: Any) -> Self:
        """Fit on activations and labels; detectors that need no fitting return ``self``."""
        if self.requires_fit:
            raise NotImplementedError(
                f"{type(self).__name__} requires fitting but fit_feature_maps() is not implemented"
            )
        return self

    def fit_features(self: Self, *args: Any, **kwargs: Any) -> Self:
        """Nothing to fit (kept from ash_ext's first ASH detector, which accepted it); returns ``self``."""
        if self.requires_fit:
            raise NotImplementedError(f"{type(self).__name__} is fitted with fit() or fit_feature_maps()")
        return self

    def predict_feature_maps(self, feature_maps: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for activations ``[B, ...]``."""
        raise NotImplementedError


class FeaturesDetector(Detector):
    """Detectors with a ``predict_features`` entry (as ``pytorch_ood.api.FeaturesDetector``):
    ``encoder`` gives pooled features, ``predict_features`` scores them."""

    def fit_features(self: Self, x: Any = None, y: Any = None, *args: Any, **kwargs: Any) -> Self:
        """Fit on features and labels; detectors that need no fitting return ``self``."""
        if self.requires_fit:
            raise NotImplementedError(f"{type(self).__name__} requires fitting but fit_features() is not implemented")
        return self

    def predict_features(self, x: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for features ``[B, D]``."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# pytorch-ood interop
# --------------------------------------------------------------------------------------------

#: (ours, name of pytorch-ood's ABC) pairs registered once pytorch_ood.api is imported.
_REGISTRATIONS: Tuple[Tuple[type, str], ...] = (
    (Detector, "Detector"),
    (FeatureMapsDetector, "FeatureMapsDetector"),
    (FeaturesDetector, "FeaturesDetector"),
)

_registered_with: Optional[object] = None


def register_with_pytorch_ood() -> bool:
    """Register ash_ext's base classes as virtual subclasses of pytorch-ood's, if ``pytorch_ood.api``
    is imported (this never imports it). Idempotent; returns whether they are registered."""
    global _registered_with
    api = sys.modules.get(_PYTORCH_OOD_API)
    if api is None:
        return False
    if _registered_with is api:
        return True
    for ours, name in _REGISTRATIONS:
        theirs = getattr(api, name, None)
        if theirs is None or not hasattr(theirs, "register"):
            return False  # the module is still being imported (or is not pytorch-ood's)
        theirs.register(ours)
    _registered_with = api
    return True


class _RegisteringLoader(importlib.abc.Loader):
    """Runs ``pytorch_ood.api`` with its own loader, then registers ash_ext's classes."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader  # leave no trace in the module
            module.__loader__ = self._loader
        sys.modules.setdefault(_PYTORCH_OOD_API, module)
        try:
            if register_with_pytorch_ood():
                _remove_import_hook()
        except Exception:  # never break pytorch-ood's import
            log.debug("registering ash_ext's detectors with pytorch_ood.api failed", exc_info=True)

    def __getattr__(self, name: str) -> Any:  # get_source, get_data, is_package, ...
        return getattr(self._loader, name)


class _PytorchOodApiFinder(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that matches only ``pytorch_ood.api`` and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != _PYTORCH_OOD_API:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
            return spec
        return None


_IMPORT_HOOK = _PytorchOodApiFinder()


def _install_import_hook() -> None:
    if not register_with_pytorch_ood() and _IMPORT_HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _IMPORT_HOOK)


def _remove_import_hook() -> None:
    while _IMPORT_HOOK in sys.meta_path:
        sys.meta_path.remove(_IMPORT_HOOK)


_install_import_hook()
