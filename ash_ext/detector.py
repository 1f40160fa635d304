"""ASH, SCALE, LTS and ReAct as OOD detectors, with the constructors, defaults and behaviour of
pytorch-ood 0.4.0's classes of those names, on ash_ext's functions (one selection pass per sample
instead of a sort).

Every ``predict`` runs under ``torch.no_grad`` (the backbone too), moves its input to the
detector's device when one is known, and never modifies its inputs. Feature maps may have any
rank >= 2. ``from_model`` builds ASH, SCALE and ReAct from an unsplit model and a layer name
(see :mod:`ash_ext.shaping`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Tuple, TypeVar

import torch
from torch import Tensor
from torch.nn import Module

from . import functional
from . import percentile as quantiles
from ._semantics import canonical_name, check_fraction
from .detector_base import (
    DetectorInfo,
    FeatureMapsDetector,
    FeaturesDetector,
    ModelNotSetException,
    Paper,
    RequiresFittingException,
    check_threshold,
    interop_exception,
    on_detector_device,
)
from .shaping import ModelPrefix, ModelSuffix, Shaper, check_side, resolve_layer, shaped_by

log = logging.getLogger(__name__)

D = TypeVar("D", bound="_LayerDetector")

Scorer = Callable[[Tensor], Tensor]


def energy_score(logits: Tensor) -> Tensor:
    """The energy outlier score ``-logsumexp(logits, dim=1)`` (pytorch-ood's default for these
    detectors, ``EnergyBased.score`` at temperature 1)."""
    return -torch.logsumexp(logits, dim=1)


def _known(y: Tensor) -> Tensor:
    return y >= 0


class _LayerDetector(FeatureMapsDetector):
    """ASH, SCALE and ReAct: shape one layer's activations, then head and score.

    Built from ``backbone`` and ``head``, ``predict(x)`` is ``predict_feature_maps(backbone(x))``.
    Built with ``from_model``, ``predict(x)`` runs the whole model once with the layer shaped by a
    hook (``model``, ``layer`` and ``on`` are set), which also serves layers inside residual
    blocks, where no hand-split head exists; ``backbone`` is then a :class:`ModelPrefix` and
    ``head`` the given one or a :class:`ModelSuffix`.
    """

    model: Optional[Module]
    layer: Optional[str]
    on: str

    def _set_parts(self, backbone: Optional[Callable[..., Tensor]], head: Optional[Callable[[Tensor], Any]]) -> None:
        self.backbone = backbone
        self.head = head
        self.model = None
        self.layer = None
        self.on = "output"

    def _shaper(self) -> Shaper:
        """The out-of-place shaping function for the current hyperparameters."""
        raise NotImplementedError

    @classmethod
    def _from_model(
        cls: type[D],
        model: Module,
        layer: str,
        on: str,
        head: Optional[Callable[[Tensor], Any]],
        example_input: Optional[Tensor],
        **kwargs: Any,
    ) -> D:
        side = check_side(on)
        resolve_layer(model, layer)
        tail: Callable[[Tensor], Any]
        if head is None:
            suffix = ModelSuffix(model, layer, side, example_input)
            backbone = ModelPrefix(model, layer, side, observer=suffix.observe)
            tail = suffix
        else:
            backbone = ModelPrefix(model, layer, side)
            tail = head
        detector = cls(backbone, tail, **kwargs)
        detector.model = model
        detector.layer = layer
        detector.on = side
        return detector

    def _check_ready(self) -> None:
        """Raise before scoring if something is missing (ReAct: the threshold)."""

    def _score_model(self, x: Any) -> Tensor:
        assert self.model is not None and self.layer is not None
        if isinstance(self.head, ModelSuffix):
            self.head.observe(x)
        with shaped_by(self.model, self.layer, self._shaper(), self.on):
            logits = self.model(x)
        return self.detector(logits)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for inputs ``x`` (higher = more likely OOD), computed without
        gradient tracking; ``x`` is moved to the detector's device if one is known."""
        if self.model is None and (self.backbone is None or self.head is None):
            raise interop_exception(ModelNotSetException)()
        self._check_ready()
        device = self.device
        if device is not None and isinstance(x, Tensor):
            x = x.to(device)
        if self.model is not None:
            return self._score_model(x)
        return self.predict_feature_maps(self.backbone(x))

    @on_detector_device
    @torch.no_grad()
    def predict_feature_maps(self, feature_maps: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for activations ``[B, ...]`` (any rank >= 2) from ``backbone``;
        ``feature_maps`` is not modified."""
        if self.head is None:
            raise interop_exception(ModelNotSetException)()
        self._check_ready()
        return self.detector(self.head(self._shaper()(feature_maps)))


# --------------------------------------------------------------------------------------------
# ASH
# --------------------------------------------------------------------------------------------


class ASH(_LayerDetector):
    """Activation SHaping (Djurisic et al., ICLR 2023), a drop-in for ``pytorch_ood.detector.ASH``.

    ``backbone`` maps inputs to activations, ASH shapes them per sample (prunes the smallest
    ``percentile`` of each sample's values; ASH-P keeps the rest, ASH-B sets them to the
    sample's sum / k, ASH-S scales them by ``exp(s1 / s2)``), ``head`` maps them to logits and
    ``detector`` maps logits to outlier scores (default: the energy score).

    :param backbone: first part of the model, returns activations ``[B, ...]`` (rank >= 2)
    :param head: the rest of the model, returns logits ``[B, classes]``
    :param variant: ``"ash-p"``, ``"ash-b"`` or ``"ash-s"``
    :param percentile: fraction of each sample's activations pruned, in [0, 1]
    :param detector: logits -> scores; default :func:`energy_score`
    """

    info: ClassVar[Optional[DetectorInfo]] = DetectorInfo(
        paper=Paper(
            title="Extremely Simple Activation Shaping for Out-of-Distribution Detection",
            venue="ICLR",
            year=2023,
            url="https://openreview.net/pdf?id=ndYXTEL6cZz",
            code="https://github.com/andrijazz/ash",
        )
    )

    #: The variants and the ash_ext functions that implement them.
    variants: ClassVar[Dict[str, Callable[..., Tensor]]] = {
        "ash-s": functional.ash_s,
        "ash-p": functional.ash_p,
        "ash-b": functional.ash_b,
    }

    #: Candidates for pytorch-ood's ``GridSearch`` (pytorch-ood's, OpenOOD's sweep).
    hyperparameter_space: Dict[str, List[Any]] = {"percentile": [0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95]}

    def __init__(
        self,
        backbone: Optional[Callable[..., Tensor]],
        head: Optional[Callable[[Tensor], Any]],
        variant: str = "ash-s",
        percentile: float = 0.65,
        detector: Optional[Scorer] = None,
    ) -> None:
        super().__init__()
        self._set_parts(backbone, head)
        self.variant = variant
        self.percentile = percentile
        self.detector: Scorer = detector or energy_score

    @property
    def variant(self) -> str:
        """The ASH variant; setting it also sets :attr:`ash`, the function applied."""
        return self._variant

    @variant.setter
    def variant(self, value: str) -> None:
        # ASH's own variants (SCALE is a detector of its own), under the one spelling rule.
        self._variant = canonical_name("variant", value, self.variants)
        self.ash: Callable[..., Tensor] = self.variants[self._variant]

    @property
    def percentile(self) -> float:
        """Fraction of each sample's activations pruned (checked when set)."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._percentile = check_fraction("percentile", value)

    def _shaper(self) -> Shaper:
        ash, percentile = self.ash, self._percentile

        def shape(x: Tensor) -> Tensor:
            return ash(x, percentile)

        return shape

    @classmethod
    def from_model(
        cls,
        model: Module,
        layer: str,
        variant: str = "ash-s",
        percentile: float = 0.65,
        detector: Optional[Scorer] = None,
        *,
        on: str = "output",
        head: Optional[Callable[[Tensor], Any]] = None,
        example_input: Optional[Tensor] = None,
    ) -> ASH:
        """ASH at the output (or ``on="input"``) of ``model``'s submodule ``layer``.

        ``predict(x)`` runs ``model`` once with that layer shaped by a hook. ``backbone(x)``
        returns the layer's activations (the model stops there); ``predict_feature_maps`` uses
        ``head`` if given, else replays the model with the layer's activations replaced (see
        :class:`ash_ext.shaping.ModelSuffix`: exact at cuts such as ``avgpool``, checked on first
        use, as costly as a forward). Arguments otherwise as for the constructor.
        """
        return cls._from_model(
            model, layer, on, head, example_input, variant=variant, percentile=percentile, detector=detector
        )


# --------------------------------------------------------------------------------------------
# SCALE
# --------------------------------------------------------------------------------------------


class SCALE(_LayerDetector):
    """SCALE (Xu et al., ICLR 2024), a drop-in for ``pytorch_ood.detector.SCALE``: every activation
    is kept and each sample is multiplied by ``exp(s1 / s2)`` (s1: its sum, s2: the sum of its
    ``k = n - round(n * percentile)`` largest values), then ``head`` and ``detector``.

    :param backbone: first part of the model, returns activations ``[B, ...]`` (rank >= 2)
    :param head: the rest of the model, returns logits
    :param percentile: fraction of activations treated as pruned when computing the factor
    :param detector: logits -> scores; default :func:`energy_score`
    """

    info: ClassVar[Optional[DetectorInfo]] = DetectorInfo(
        paper=Paper(
            title="Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
            venue="ICLR",
            year=2024,
            url="https://arxiv.org/abs/2310.00227",
            code="https://github.com/kai422/SCALE",
        )
    )

    #: Candidates for pytorch-ood's ``GridSearch`` (pytorch-ood's, OpenOOD's sweep).
    hyperparameter_space: Dict[str, List[Any]] = {"percentile": [0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95]}

    def __init__(
        self,
        backbone: Optional[Callable[..., Tensor]],
        head: Optional[Callable[[Tensor], Any]],
        percentile: float = 0.65,
        detector: Optional[Scorer] = None,
    ) -> None:
        super().__init__()
        self._set_parts(backbone, head)
        self.percentile = percentile
        self.detector: Scorer = detector or energy_score

    @property
    def percentile(self) -> float:
        """Fraction of activations treated as pruned for the factor (checked when set)."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._percentile = check_fraction("percentile", value)

    def _shaper(self) -> Shaper:
        percentile = self._percentile

        def shape(x: Tensor) -> Tensor:
            return functional.scale(x, percentile)

        return shape

    @classmethod
    def from_model(
        cls,
        model: Module,
        layer: str,
        percentile: float = 0.65,
        detector: Optional[Scorer] = None,
        *,
        on: str = "output",
        head: Optional[Callable[[Tensor], Any]] = None,
        example_input: Optional[Tensor] = None,
    ) -> SCALE:
        """SCALE at the output (or ``on="input"``) of ``model``'s submodule ``layer``; as
        :meth:`ASH.from_model`."""
        return cls._from_model(model, layer, on, head, example_input, percentile=percentile, detector=detector)


# --------------------------------------------------------------------------------------------
# ReAct
# --------------------------------------------------------------------------------------------


class ReAct(_LayerDetector):
    """ReAct (Sun et al., NeurIPS 2021), a drop-in for ``pytorch_ood.detector.ReAct``: activations
    are clipped at ``threshold`` (``x.clamp(max=threshold)``), then ``head`` and ``detector``.

    The threshold is the ``percentile``-quantile of all in-distribution activations, estimated by
    :meth:`fit` / :meth:`fit_feature_maps` (equal to ``np.percentile(..., 100 * percentile)``,
    computed with ash_ext's selection instead of a sort), or given. As in pytorch-ood,
    ``requires_fit`` is true, setting ``percentile`` does not change a threshold already fitted
    (fit again; pytorch-ood's ``GridSearch`` re-fits for every candidate), and scoring without a
    threshold raises :class:`RequiresFittingException`.

    :param backbone: first part of the model, returns activations ``[B, ...]``
    :param head: the rest of the model, returns logits
    :param threshold: clipping value; ``None`` (default) until fitted
    :param percentile: fraction in [0, 1]: the quantile of ID activations that ``fit`` takes
    :param detector: logits -> scores; default :func:`energy_score`
    """

    info: ClassVar[Optional[DetectorInfo]] = DetectorInfo(
        tasks=frozenset({"classification", "segmentation"}),
        paper=Paper(
            title="ReAct: Out-of-distribution Detection With Rectified Activations",
            venue="NeurIPS",
            year=2021,
            url="https://arxiv.org/abs/2111.12797",
            code="https://github.com/deeplearning-wisc/react",
        ),
    )

    requires_fit: ClassVar[bool] = True

    #: Candidates for pytorch-ood's ``GridSearch`` (pytorch-ood's, OpenOOD's sweep); it re-fits per candidate.
    hyperparameter_space: Dict[str, List[Any]] = {"percentile": [0.85, 0.90, 0.95, 0.99]}

    def __init__(
        self,
        backbone: Optional[Callable[..., Tensor]],
        head: Optional[Callable[[Tensor], Any]],
        threshold: Optional[float] = None,
        percentile: float = 0.9,
        detector: Optional[Scorer] = None,
    ) -> None:
        super().__init__()
        self._set_parts(backbone, head)
        self.percentile = percentile
        self.threshold = threshold
        self._is_fitted = self.threshold is not None
        self.detector: Scorer = detector or energy_score

    @property
    def percentile(self) -> float:
        """The quantile (a fraction) of ID activations that :meth:`fit` takes as threshold."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        self._percentile = check_fraction("percentile", value)

    @property
    def threshold(self) -> Optional[float]:
        """The clipping value (``None`` until fitted or set)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: Optional[float]) -> None:
        self._threshold = check_threshold(value)

    def _check_ready(self) -> None:
        if self._threshold is None:
            raise interop_exception(RequiresFittingException)()

    def _shaper(self) -> Shaper:
        threshold = self._threshold

        def clip(x: Tensor) -> Tensor:
            return torch.clamp(x, max=threshold)

        return clip

    def _set_threshold(self, activations: Iterable[Tensor]) -> None:
        chunks = list(activations)
        if not chunks:
            raise ValueError("No ID samples")
        flat = torch.cat([chunk.reshape(-1) for chunk in chunks]) if len(chunks) > 1 else chunks[0].reshape(-1)
        self._threshold = float(quantiles.react_threshold(flat, self._percentile))
        self._is_fitted = True

    @torch.no_grad()
    def fit(self, data_loader: Iterable[Tuple[Tensor, Tensor]], *args: Any, **kwargs: Any) -> ReAct:
        """Estimate the threshold from the activations of the in-distribution samples (label >= 0)
        of a loader of ``(x, y)`` batches. As pytorch-ood, the activations are gathered on the CPU,
        and a detector without a known device is moved to ``"cpu"`` (with a warning).

        :raises ValueError: if the loader has no ID sample
        """
        if self.backbone is None:
            raise interop_exception(ModelNotSetException)()
        device = self.device
        if device is None:
            device = torch.device("cpu")
            log.warning("No device set. Will use 'cpu'.")
            self.to(device)
        chunks = []
        for x, y in data_loader:
            known = _known(y)
            if not bool(known.any()):
                continue
            z = self.backbone(x[known.to(x.device)].to(device))
            chunks.append(z.detach().reshape(-1).cpu())
        self._set_threshold(chunks)
        return self

    @torch.no_grad()
    def fit_feature_maps(self, feature_maps: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> ReAct:
        """Estimate the threshold from ID activations ``[N, ...]`` and labels ``[N]`` (label < 0: OOD,
        ignored).

        :raises ValueError: if there is no ID sample
        """
        known = _known(y)
        if not bool(known.any()):
            raise ValueError("No ID samples")
        self._set_threshold([feature_maps[known.to(feature_maps.device)].detach().reshape(-1).cpu()])
        return self

    @classmethod
    def from_model(
        cls,
        model: Module,
        layer: str,
        threshold: Optional[float] = None,
        percentile: float = 0.9,
        detector: Optional[Scorer] = None,
        *,
        on: str = "output",
        head: Optional[Callable[[Tensor], Any]] = None,
        example_input: Optional[Tensor] = None,
    ) -> ReAct:
        """ReAct at the output (or ``on="input"``) of ``model``'s submodule ``layer``; as
        :meth:`ASH.from_model`. ``fit`` runs the model only up to the layer."""
        return cls._from_model(
            model, layer, on, head, example_input, threshold=threshold, percentile=percentile, detector=detector
        )


# --------------------------------------------------------------------------------------------
# LTS
# --------------------------------------------------------------------------------------------


class LTS(FeaturesDetector):
    """Logit scaling (Djurisic et al., arXiv 2409.01175), a drop-in for ``pytorch_ood.detector.LTS``:
    the logits ``head(z)`` of features ``z`` are multiplied by the per-sample factor
    ``(sum relu(z) / sum of the top-k of relu(z))^2``, ``k = max(1, n - round(n * (1 - p)))``, and
    scored by ``detector``.

    :param encoder: inputs -> features ``[B, D]`` (or any rank >= 2); may be ``None`` when only
        :meth:`predict_features` is used
    :param head: features -> logits, e.g. the last linear layer
    :param p: fraction of the top activations in the factor
    :param detector: scaled logits -> scores; default :func:`energy_score`
    """

    info: ClassVar[Optional[DetectorInfo]] = DetectorInfo(
        paper=Paper(
            title="Logit Scaling for Out-of-Distribution Detection",
            venue="Machine Vision and Applications",
            year=2025,
            url="https://arxiv.org/abs/2409.01175",
            code="https://github.com/andrijazz/lts",
        )
    )

    requires_fit: ClassVar[bool] = False

    def __init__(
        self,
        encoder: Optional[Callable[..., Tensor]],
        head: Callable[[Tensor], Tensor],
        p: float = 0.05,
        detector: Optional[Scorer] = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.p = p
        self.detector: Scorer = detector or energy_score

    @property
    def p(self) -> float:
        """Fraction of the top activations used in the factor (checked when set)."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = check_fraction("p", value)

    @staticmethod
    def scaling_factor(z: Tensor, p: float) -> Tensor:
        """The per-sample factor ``[B]`` of features ``z`` ``[B, ...]`` (equal to pytorch-ood's
        ``LTS.scaling_factor``, which takes 2-D ``z`` only), without materialising ``relu(z)``."""
        return functional.lts_factor(z, check_fraction("p", p))

    @on_detector_device
    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        """Outlier scores ``[B]``: ``detector(head(z) * factor(z))``; ``z`` is not modified."""
        factor = self.scaling_factor(z, self._p)
        logits = self.head(z)
        factor = factor.to(logits.dtype).reshape((factor.shape[0],) + (1,) * (logits.dim() - 1))
        return self.detector(logits * factor)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for inputs ``x``, passed through ``encoder``.

        :raises ModelNotSetException: if there is no encoder
        """
        if self.encoder is None:
            raise interop_exception(ModelNotSetException)()
        device = self.device
        if device is not None and isinstance(x, Tensor):
            x = x.to(device)
        return self.predict_features(self.encoder(x))
