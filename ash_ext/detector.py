"""The ASH detector: the same constructor and behaviour as ``pytorch_ood.detector.ASH``."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
from torch import Tensor

from . import functional
from ._semantics import check_percentile, check_variant

Self = TypeVar("Self", bound="ASH")


def energy_score(logits: Tensor) -> Tensor:
    """The energy outlier score ``-logsumexp(logits, dim=1)`` (pytorch-ood's default for ASH)."""
    return -torch.logsumexp(logits, dim=1)


class ASH:
    """Activation SHaping (ICLR 2023) as an OOD detector, a drop-in for ``pytorch_ood.detector.ASH``.

    The ``backbone`` maps inputs to activations, ASH shapes them per sample, the ``head`` maps
    the shaped activations to logits, and ``detector`` maps logits to outlier scores (higher is
    more likely out of distribution; the default is the energy score).

    :param backbone: first part of the model, returns the activations to shape (``[B, ...]``)
    :param head: the rest of the model, returns logits ``[B, classes]``
    :param variant: ``"ash-p"``, ``"ash-b"`` or ``"ash-s"``
    :param percentile: fraction of each sample's activations pruned, in [0, 1]
    :param detector: logits -> scores; default :func:`energy_score`
    """

    variants = {"ash-s": functional.ash_s, "ash-p": functional.ash_p, "ash-b": functional.ash_b}

    def __init__(
        self,
        backbone: Callable[[Tensor], Tensor],
        head: Callable[[Tensor], Tensor],
        variant: str = "ash-s",
        percentile: float = 0.65,
        detector: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        self.variant = check_variant(variant)
        self.backbone = backbone
        self.head = head
        self.percentile = check_percentile(percentile)
        self.ash: Callable[..., Tensor] = self.variants[variant]
        self.detector = detector or energy_score

    def fit(self: Self, *args: object, **kwargs: object) -> Self:
        """ASH needs no fitting; returns ``self``."""
        return self

    def fit_features(self: Self, *args: object, **kwargs: object) -> Self:
        """ASH needs no fitting; returns ``self``."""
        return self

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for inputs ``x``, passed through ``backbone``, ASH and ``head``."""
        return self.predict_feature_maps(self.backbone(x))

    @torch.no_grad()
    def predict_feature_maps(self, feature_maps: Tensor) -> Tensor:
        """Outlier scores ``[B]`` for activations from ``backbone``; ``feature_maps`` is not modified."""
        shaped = self.ash(feature_maps, self.percentile)
        return self.detector(self.head(shaped))

    def __call__(self, x: Tensor) -> Tensor:
        """Same as :meth:`predict`."""
        return self.predict(x)
