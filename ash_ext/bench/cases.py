"""The bench's case list: shapes, batch sizes, dtypes, percentiles, variants and suite selection.

Shared by ``python -m ash_ext bench`` and the pytest-benchmark suite in ``benchmarks/``
(:func:`pytest_cases`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._semantics import canonical_name, kept_count


@dataclass(frozen=True)
class ShapeSpec:
    """A per-sample activation shape that ASH is applied to, and how its benchmark data is drawn.

    ``data`` is ``"relu"`` (``relu(N(0, 1))``: post-ReLU feature maps, about half exactly 0),
    ``"abs"`` (``|N(0, 1)|``: pooled post-ReLU features, dense and positive) or ``"normal"``
    (``N(0, 1)``: signed, like a transformer's LayerNorm output).
    """

    name: str
    dims: tuple[int, ...]
    model: str
    data: str

    @property
    def sample_size(self) -> int:
        """Values per sample."""
        return math.prod(self.dims)


#: The shapes of the default suite, by command-line name.
SHAPES: dict[str, ShapeSpec] = {
    spec.name: spec
    for spec in (
        ShapeSpec("resnet50-l4", (2048, 7, 7), "ResNet-50 layer-4 feature maps (ImageNet)", "relu"),
        ShapeSpec("resnet50-pooled", (2048,), "ResNet-50 pooled features (ImageNet)", "abs"),
        ShapeSpec("resnet50-l3", (1024, 14, 14), "ResNet-50 layer-3 feature maps (ImageNet)", "relu"),
        ShapeSpec("wrn28-10", (640, 8, 8), "WideResNet-28-10 feature maps (CIFAR)", "relu"),
        ShapeSpec("densenet100", (342, 8, 8), "DenseNet-BC-100 feature maps (CIFAR)", "relu"),
        ShapeSpec("vit-b16-cls", (768,), "ViT-B/16 CLS features (ImageNet)", "normal"),
    )
}

#: Descriptions of the data kinds, written into the results.
DATA_KINDS: dict[str, str] = {
    "relu": "relu(N(0,1)) in float32, then cast: about half the values exactly 0, like post-ReLU maps",
    "abs": "|N(0,1)| in float32, then cast: dense positive values, like pooled post-ReLU features",
    "normal": "N(0,1) in float32, then cast: signed values, like LayerNorm outputs",
}

DEVIATION_DATA = (
    "the shape's data kind, then 1.0 added to each sample's k largest values (in float32, before the cast), "
    "so that the kept set is unique and topk's choice among ties cannot matter"
)

#: Default batch sizes per shape. A GPU runs 1..256 for every shape. On a CPU each shape runs batch 1
#: and one or two larger batches, among them the README's CPU targets -- [64, 2048, 7, 7] and
#: [256, 2048], and the CPU ISA suite's [8, 2048, 7, 7] and [128, 640, 8, 8] -- so that the default
#: suite (with the slow reference, pytorch-ood and fallback, and ``--methods all``'s family) takes
#: about 2 minutes on an idle 2-core machine (``python -m ash_ext bench`` prints its forecast).
DEFAULT_BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "cuda": {name: (1, 4, 16, 64, 256) for name in SHAPES},
    "cpu": {
        "resnet50-l4": (1, 8, 64),
        "resnet50-pooled": (1, 64, 256),
        "resnet50-l3": (1, 4),
        "wrn28-10": (1, 32, 128),
        "densenet100": (1, 32),
        "vit-b16-cls": (1, 256),
    },
}

#: Batches of :data:`DEFAULT_BATCHES` that the default suite runs in float32 only: the largest
#: feature maps, where the reference and the fallback take a tenth of a second or more per call
#: (``--dtypes`` or ``--batches`` run every dtype chosen on every batch).
FLOAT32_ONLY_BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "cuda": {},
    "cpu": {"resnet50-l4": (64,), "wrn28-10": (128,)},
}

#: Batch sizes of ``--quick``.
QUICK_BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "cuda": {name: (1, 64, 256) for name in SHAPES},
    "cpu": {
        "resnet50-l4": (1, 8),
        "resnet50-pooled": (1, 256),
        "resnet50-l3": (1, 4),
        "wrn28-10": (1, 16),
        "densenet100": (1, 32),
        "vit-b16-cls": (1, 256),
    },
}

#: The ASH variants, in pytorch-ood's spelling (the canonical one: see :func:`ash_ext._semantics.name_key`).
VARIANTS: tuple[str, ...] = ("ash-p", "ash-b", "ash-s")
#: The name that stands for all of :data:`VARIANTS`.
ALL = "all"
DEFAULT_PERCENTILES: tuple[float, ...] = (0.65, 0.9)
QUICK_PERCENTILES: tuple[float, ...] = (0.65,)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
    "f64": "float64",
}


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``batch`` samples of shape ``shape`` in ``dtype``, one ASH variant and percentile."""

    shape: str
    batch: int
    dtype: str
    percentile: float
    variant: str

    @property
    def spec(self) -> ShapeSpec:
        """The :class:`ShapeSpec` of :attr:`shape`."""
        return SHAPES[self.shape]

    @property
    def size(self) -> tuple[int, ...]:
        """The full tensor shape ``(batch, *dims)``."""
        return (self.batch, *self.spec.dims)

    @property
    def numel(self) -> int:
        """Number of values of the tensor."""
        return self.batch * self.spec.sample_size

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def k(self) -> int:
        """Values kept per sample."""
        return kept_count(self.spec.sample_size, self.percentile)

    @property
    def id(self) -> str:
        """A stable name, e.g. ``resnet50-l4-B16-float32-p0.65-ash-s`` (pytest ids, ``--benchmark-compare``)."""
        return f"{self.shape}-B{self.batch}-{self.dtype}-p{self.percentile:g}-{self.variant}"


def canonical_variants(names: Sequence[str]) -> list[str]:
    """``names`` in their canonical spelling, ``all`` expanded to :data:`VARIANTS`, each once, in order.

    The spelling rule is the API's (:func:`ash_ext._semantics.canonical_name`): pytorch-ood's names
    ``ash-p``, ``ash-b`` and ``ash-s``, with case, surrounding spaces and ``_`` for ``-`` ignored.
    Raises ``ValueError`` listing the valid names for anything else (``s`` or ``scale`` included).
    """
    chosen: list[str] = []
    for name in names:
        key = canonical_name("variant", name, (*VARIANTS, ALL))
        for variant in VARIANTS if key == ALL else (key,):
            if variant not in chosen:
                chosen.append(variant)
    return chosen


def device_kind(device: torch.device | str) -> str:
    """``"cuda"`` for CUDA devices, ``"cpu"`` for everything else (the key of the batch tables)."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def best_device() -> torch.device:
    """The device ``bench`` uses without ``--device``: the first CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def supported_dtypes(device: torch.device | str) -> list[str]:
    """float32 and the half types ``device`` supports (bfloat16 on CUDA only where the GPU has it)."""
    device = torch.device(device)
    names = ["float32"]
    if device.type == "cuda":
        names.append("float16")
        if torch.cuda.is_bf16_supported():
            names.append("bfloat16")
    elif device.type == "cpu":
        names += ["float16", "bfloat16"]
    else:
        for name in ("float16", "bfloat16"):
            if _topk_works(name, device):
                names.append(name)
    return names


def _topk_works(dtype: str, device: torch.device) -> bool:
    try:
        torch.topk(torch.ones(2, 4, dtype=DTYPES[dtype], device=device), 2, dim=1)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def suite(
    device: torch.device | str = "cpu",
    *,
    quick: bool = False,
    shapes: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
    percentiles: Sequence[float] | None = None,
    variants: Sequence[str] | None = None,
) -> list[Case]:
    """The list of cases ``bench`` runs on ``device``: the default suite, ``quick``'s, or a selection.

    Each argument left ``None`` takes the suite's default: all shapes; the per-shape batch sizes of
    :data:`DEFAULT_BATCHES` (or :data:`QUICK_BATCHES`) for the device's kind; float32 and the
    device's half types (float32 only when ``quick``, and on :data:`FLOAT32_ONLY_BATCHES` when
    neither ``batches`` nor ``dtypes`` is given); percentiles 0.65 and 0.9 (0.65 when ``quick``);
    all three variants. Ordered by shape, batch, dtype, percentile, variant.
    ``variants`` go through :func:`canonical_variants` (a ``ValueError`` for an unknown one).
    """
    kind = device_kind(device)
    shape_names = list(shapes) if shapes is not None else list(SHAPES)
    table = (QUICK_BATCHES if quick else DEFAULT_BATCHES)[kind]
    float32_only = FLOAT32_ONLY_BATCHES[kind] if not quick and batches is None and dtypes is None else {}
    if dtypes is None:
        dtypes = ["float32"] if quick else supported_dtypes(device)
    if percentiles is None:
        percentiles = QUICK_PERCENTILES if quick else DEFAULT_PERCENTILES
    variant_names = canonical_variants(variants) if variants is not None else list(VARIANTS)
    cases = []
    for shape in shape_names:
        for batch in batches if batches is not None else table[shape]:
            for dtype in ["float32"] if batch in float32_only.get(shape, ()) else dtypes:
                for percentile in percentiles:
                    for variant in variant_names:
                        cases.append(Case(shape, int(batch), dtype, float(percentile), variant))
    return cases


def pytest_cases(device: torch.device | str = "cpu", all_cases: bool = False) -> list[Case]:
    """The cases of the pytest-benchmark suite: the default suite when ``all_cases``, else a small subset.

    The subset is one batch size per shape (``--quick``'s largest), float32, p = 0.65 and ASH-S.
    """
    if all_cases:
        return suite(device)
    table = QUICK_BATCHES[device_kind(device)]
    return [Case(shape, max(table[shape]), "float32", 0.65, "ash-s") for shape in SHAPES]
