"""The family's methods, shapes, plans and cases (``ash-ext bench --methods ...``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..._semantics import canonical_name, kept_count
from .. import cases as ash_cases
from ..cases import DTYPES, ShapeSpec

#: The family's methods, in the order of the table (``ash``, the ASH variants, is :mod:`ash_ext.bench`'s).
METHODS: tuple[str, ...] = ("scale", "react-ash", "lts", "topk-stats", "per-sample", "react-fit")

#: ``--methods`` groups.
METHOD_GROUPS: dict[str, tuple[str, ...]] = {"family": METHODS, "all": ("ash", *METHODS)}

#: What each method's reference is, written into the results and the table.
REFERENCES: dict[str, str] = {
    "scale": "pytorch_ood.detector.scale.scale(x, p)",
    "react-ash": "pytorch_ood.detector.ash.ash_s(x.clip(max=t), p)",
    "lts": "pytorch_ood.detector.LTS.scaling_factor(z, p)",
    "topk-stats": "torch.topk(x, k).values: its last column, x.sum(1) and its sum(1)",
    "per-sample": (
        "ASH-S with one k per sample, loop-free in torch: torch.sort of each row (descending), ranks < k "
        "scattered back into a mask, s1 / s2 from the row and the masked sorted values, torch.where"
    ),
    "react-fit": "float(np.percentile(acts.numpy(), 100 * p)) (pytorch-ood's ReAct fit)",
}

#: Short names of the references for the table.
REFERENCE_LABELS: dict[str, str] = {
    "scale": "pytorch-ood scale",
    "react-ash": "clip + pytorch-ood ash_s",
    "lts": "pytorch-ood LTS",
    "topk-stats": "torch.topk + sums",
    "per-sample": "torch.sort + scatter",
    "react-fit": "np.percentile",
}

#: Methods whose output is a tensor like x (roofline: x.clone()); the others return statistics (x.sum(dim=1)).
SHAPING_METHODS: frozenset[str] = frozenset({"scale", "react-ash", "per-sample"})

#: The family's per-sample shapes: :data:`ash_ext.bench.cases.SHAPES` and ResNet-18's pooled features.
SHAPES: dict[str, ShapeSpec] = {
    **ash_cases.SHAPES,
    "resnet18-pooled": ShapeSpec("resnet18-pooled", (512,), "ResNet-18 pooled features (ImageNet)", "abs"),
}

#: ``(shape, batch sizes)`` of each method on a CPU, default and ``--quick``. For ``react-fit`` the
#: batch is the number of in-distribution samples whose features are pooled into one fit
#: (25000 x 2048 = 51.2M values; ImageNet-val's 50000 x 2048 is 102.4M).
DEFAULT_PLAN: dict[str, dict[str, tuple[int, ...]]] = {
    "scale": {"resnet50-pooled": (1, 64, 256), "resnet50-l4": (1, 16), "vit-b16-cls": (256,)},
    "react-ash": {"resnet50-pooled": (64, 256), "resnet50-l4": (1, 16)},
    "lts": {"resnet50-pooled": (1, 256), "resnet18-pooled": (64,), "vit-b16-cls": (512,)},
    "topk-stats": {"resnet50-pooled": (256,), "resnet50-l4": (1, 16), "vit-b16-cls": (256,)},
    "per-sample": {"resnet50-pooled": (256,), "resnet50-l4": (16,), "vit-b16-cls": (256,)},
    "react-fit": {"resnet50-pooled": (5000, 25000, 50000)},
}
QUICK_PLAN: dict[str, dict[str, tuple[int, ...]]] = {
    "scale": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "react-ash": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "lts": {"resnet50-pooled": (256,), "resnet18-pooled": (64,), "vit-b16-cls": (512,)},
    "topk-stats": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "per-sample": {"resnet50-pooled": (256,), "resnet50-l4": (8,)},
    "react-fit": {"resnet50-pooled": (5000,)},
}

#: The fixed percentile of the methods that do not take ASH's (LTS's p, the fraction of top
#: activations used; ReAct's fit percentile).
FIXED_PERCENTILES: dict[str, float] = {"lts": 0.05, "react-fit": 0.9}

#: ReAct's percentile, at which the timed ``react-ash`` cases clip (the data's quantile there).
CLIP_QUANTILE = 0.9

#: Half width of the spread of the per-sample percentiles around the case's p.
PER_SAMPLE_SPREAD = 0.05

#: dtypes ``react-fit`` runs in (numpy has no bfloat16; react_threshold reads 16-bit input as float32).
REACT_FIT_DTYPES: tuple[str, ...] = ("float32", "float64")


@dataclass(frozen=True)
class FamilyCase:
    """One case: ``method`` on ``batch`` samples of shape ``shape`` in ``dtype`` at ``percentile``."""

    method: str
    shape: str
    batch: int
    dtype: str
    percentile: float

    @property
    def spec(self) -> ShapeSpec:
        """The :class:`~ash_ext.bench.cases.ShapeSpec` of :attr:`shape`."""
        return SHAPES[self.shape]

    @property
    def n(self) -> int:
        """Values per sample."""
        return self.spec.sample_size

    @property
    def size(self) -> tuple[int, ...]:
        """The full tensor shape ``(batch, *dims)``."""
        return (self.batch, *self.spec.dims)

    @property
    def numel(self) -> int:
        """Number of values of the tensor."""
        return self.batch * self.n

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def id(self) -> str:
        """A stable name, e.g. ``lts-vit-b16-cls-B512-float32-p0.05``."""
        return f"{self.method}-{self.shape}-B{self.batch}-{self.dtype}-p{self.percentile:g}"


def expand_methods(names: Sequence[str]) -> list[str]:
    """``names`` with the groups ``family`` and ``all`` expanded, in :data:`METHODS` order (``ash`` first).

    Names follow the API's spelling rule (:func:`ash_ext._semantics.canonical_name`: case,
    surrounding spaces and ``_`` for ``-`` ignored, so ``LTS`` and ``react_fit`` are ``lts`` and
    ``react-fit``). Raises ``ValueError`` listing the valid names for an unknown one.
    """
    wanted: set[str] = set()
    for name in names:
        key = canonical_name("method", name, ("ash", *METHODS, *METHOD_GROUPS))
        wanted.update(METHOD_GROUPS.get(key, (key,)))
    return [m for m in ("ash", *METHODS) if m in wanted]


def suite(
    device: torch.device | str = "cpu",
    *,
    methods: Sequence[str] = METHODS,
    quick: bool = False,
    shapes: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
    percentiles: Sequence[float] | None = None,
) -> list[FamilyCase]:
    """The family's cases: per method, the shapes and batches of :data:`DEFAULT_PLAN` (or
    :data:`QUICK_PLAN`), float32 unless ``dtypes``, ASH percentiles 0.65 and 0.9 (0.65 when ``quick``)
    except for LTS and ReAct's fit (:data:`FIXED_PERCENTILES`). ``shapes`` keeps the listed shapes of
    each method's plan; ``batches`` replaces the plan's batch sizes. ``ash`` in ``methods`` is ignored.
    The plan is the CPU's on every device (a GPU would run them in milliseconds).
    """
    del device  # one plan for now; the argument keeps the signature of ash_ext.bench.cases.suite
    plan = QUICK_PLAN if quick else DEFAULT_PLAN
    dtype_names = list(dtypes) if dtypes is not None else ["float32"]
    ash_percentiles = (
        list(percentiles)
        if percentiles is not None
        else list(ash_cases.QUICK_PERCENTILES if quick else ash_cases.DEFAULT_PERCENTILES)
    )
    cases = []
    for method in METHODS:
        if method not in methods:
            continue
        method_dtypes = [d for d in dtype_names if method != "react-fit" or d in REACT_FIT_DTYPES]
        fixed = FIXED_PERCENTILES.get(method)
        for shape, default_batches in plan[method].items():
            if shapes is not None and shape not in shapes:
                continue
            for batch in batches if batches is not None else default_batches:
                for dtype in method_dtypes:
                    for p in [fixed] if fixed is not None else ash_percentiles:
                        cases.append(FamilyCase(method, shape, int(batch), dtype, float(p)))
    return cases


def pytest_cases(device: torch.device | str = "cpu", all_cases: bool = False) -> list[FamilyCase]:
    """The cases of the pytest-benchmark suite: the default suite when ``all_cases``, else ``--quick``'s."""
    return suite(device, quick=not all_cases)


def clip_value(data: str) -> float:
    """ReAct's clip for the timed ``react-ash`` cases: the :data:`CLIP_QUANTILE` quantile of the data kind."""
    normal = statistics.NormalDist()
    if data == "relu":  # P(relu(Z) <= t) = P(Z <= t) for t >= 0
        return normal.inv_cdf(CLIP_QUANTILE)
    if data == "abs":  # P(|Z| <= t) = 2 P(Z <= t) - 1
        return normal.inv_cdf((1 + CLIP_QUANTILE) / 2)
    return normal.inv_cdf(CLIP_QUANTILE)


def per_sample_percentiles(case: FamilyCase, device: torch.device | str) -> Tensor:
    """The ``[B]`` float64 fractions of a ``per-sample`` case: evenly over ``p +- PER_SAMPLE_SPREAD``, in [0, 1]."""
    spread = torch.linspace(-1.0, 1.0, case.batch, dtype=torch.float64) if case.batch > 1 else torch.zeros(1)
    return (case.percentile + PER_SAMPLE_SPREAD * spread.double()).clamp(0.0, 1.0).to(device)


def kept_counts(case: FamilyCase, device: torch.device | str = "cpu") -> Tensor:
    """k of each sample (int64 ``[B]``), as ash_ext and the reference count it for ``case``."""
    if case.method == "per-sample":
        ps = per_sample_percentiles(case, device)
        return case.n - torch.round(ps * case.n).to(torch.int64)
    if case.method == "lts":
        k = max(1, case.n - round(case.n * (1 - case.percentile)))
    elif case.method == "react-fit":
        k = 1  # one order statistic of all values; not per sample
    else:
        k = kept_count(case.n, case.percentile)
    return torch.full((case.batch,), k, dtype=torch.int64, device=device)
