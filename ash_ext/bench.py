"""``ash-ext bench``: ash_ext against the reference algorithm, pytorch-ood, the fallback and a clone.

For every case (a shape, batch size, dtype, percentile and ASH variant) it times, in one process
and interleaved round-robin so that drift hits all of them alike:

* ``reference``   -- the reference algorithm (sorted ``torch.topk`` + ``scatter_``) in place, as
  pytorch-ood 0.3.3 does it (:func:`ash_ext.reference.ash_p_inplace` and friends);
* ``pytorch-ood`` -- ``pytorch_ood.detector.ash.ash_*`` (0.4.0, out of place), when importable;
* ``fallback``    -- ash_ext's pure-PyTorch implementation;
* ``ash_ext``     -- ``ash_ext.ash_*`` out of place (the compiled kernel where there is one);
* ``clone``       -- ``x.clone()``: one read and one write of the tensor, the memory roofline.

Each call gets the next of a rotation of distinct inputs whose total size is at least twice the
last-level cache, so that repeated calls do not time the cache. The in-place reference gets its
own rotation, refilled outside the timed region whenever it wraps around. Times are medians with
quartiles (CUDA events on a GPU, which include the Python-side launch cost of the call;
``time.perf_counter`` on a CPU) after warm-up calls; outputs are freed outside the timed region.
Every case also records the largest deviation of ash_ext's output from the reference's on an
input whose kept set is unique (no ties at the threshold), so that a fast wrong result cannot
hide; for float16 and bfloat16 the reference is evaluated in float32 and rounded to the dtype
(its own half-precision sums overflow float16 on feature maps), and the comparison with the
reference run in the dtype itself is recorded as well.

Use it as a library with :func:`run` and :class:`BenchConfig`, or from the command line
(``python -m ash_ext bench --help``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor

from . import fallback, reference
from ._ops import compiled_with_cuda, extension_loaded, fallback_forced, implementation_for
from ._semantics import VARIANT_CODES, kept_count
from .cpu_dispatch import cpu_isa, set_cpu_isa
from .functional import ash_b, ash_p, ash_s

# --------------------------------------------------------------------------------------------
# The cases (shared with the pytest-benchmark suite in benchmarks/)
# --------------------------------------------------------------------------------------------


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

#: Default batch sizes per shape. A GPU runs 1..256 for every shape; on a CPU the feature maps stop
#: earlier so that the default suite (with the slow reference and fallback) fits in 5 minutes on 2 cores.
DEFAULT_BATCHES: dict[str, dict[str, tuple[int, ...]]] = {
    "cuda": {name: (1, 4, 16, 64, 256) for name in SHAPES},
    "cpu": {
        "resnet50-l4": (1, 4, 16),
        "resnet50-pooled": (1, 16, 64, 256),
        "resnet50-l3": (1, 4, 8),
        "wrn28-10": (1, 8, 32),
        "densenet100": (1, 16, 64),
        "vit-b16-cls": (1, 16, 64, 256),
    },
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

VARIANTS: tuple[str, ...] = ("ash-p", "ash-b", "ash-s")
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

#: The implementations, in the order of the table.
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "pytorch-ood", "fallback", "ash_ext", "clone")


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
    device's half types (float32 only when ``quick``); percentiles 0.65 and 0.9 (0.65 when
    ``quick``); all three variants. Ordered by shape, batch, dtype, percentile, variant.
    """
    kind = device_kind(device)
    shape_names = list(shapes) if shapes is not None else list(SHAPES)
    table = (QUICK_BATCHES if quick else DEFAULT_BATCHES)[kind]
    if dtypes is None:
        dtypes = ["float32"] if quick else supported_dtypes(device)
    if percentiles is None:
        percentiles = QUICK_PERCENTILES if quick else DEFAULT_PERCENTILES
    variant_names = list(variants) if variants is not None else list(VARIANTS)
    cases = []
    for shape in shape_names:
        for batch in batches if batches is not None else table[shape]:
            for dtype in dtypes:
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


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """A function under test. ``inplace`` ones destroy their input and get their own refilled inputs."""

    name: str
    fn: Callable[[Tensor], object]
    inplace: bool = False


def pytorch_ood_version() -> str | None:
    """The installed pytorch-ood's version if ``pytorch_ood.detector.ash`` imports, else ``None``."""
    try:
        import pytorch_ood
        import pytorch_ood.detector.ash
    except Exception:  # noqa: BLE001 - missing or broken: either way not benchmarked
        return None
    return str(getattr(pytorch_ood, "__version__", "unknown"))


_ASH_EXT: dict[str, Callable[..., Tensor]] = {"ash-p": ash_p, "ash-b": ash_b, "ash-s": ash_s}
_FALLBACK: dict[str, Callable[..., Tensor]] = {
    "ash-p": fallback.ash_p,
    "ash-b": fallback.ash_b,
    "ash-s": fallback.ash_s,
}
_REFERENCE: dict[str, Callable[..., Tensor]] = {
    "ash-p": reference.ash_p,
    "ash-b": reference.ash_b,
    "ash-s": reference.ash_s,
}
_REFERENCE_INPLACE: dict[str, Callable[..., Tensor]] = {
    "ash-p": reference.ash_p_inplace,
    "ash-b": reference.ash_b_inplace,
    "ash-s": reference.ash_s_inplace,
}


def implementations(
    variant: str, percentile: float, names: Sequence[str] = IMPLEMENTATIONS
) -> dict[str, Implementation]:
    """The functions timed for ``variant`` at ``percentile``, by name (see :data:`IMPLEMENTATIONS`).

    ``pytorch-ood`` is left out when it cannot be imported. Its functions take 4-D maps only, so
    2-D inputs ``[B, C]`` are passed as ``x.view(B, C, 1, 1)`` (a free view).
    """
    impls: dict[str, Implementation] = {}
    for name in names:
        if name == "reference":
            ref = _REFERENCE_INPLACE[variant]
            impls[name] = Implementation(name, lambda x, f=ref: f(x, percentile), inplace=True)
        elif name == "pytorch-ood":
            if pytorch_ood_version() is None:
                continue
            from pytorch_ood.detector import ash as ood

            f = {"ash-p": ood.ash_p, "ash-b": ood.ash_b, "ash-s": ood.ash_s}[variant]
            impls[name] = Implementation(
                name, lambda x, f=f: f(x if x.dim() == 4 else x.view(x.shape[0], -1, 1, 1), percentile)
            )
        elif name == "fallback":
            impls[name] = Implementation(name, lambda x, f=_FALLBACK[variant]: f(x, percentile))
        elif name == "ash_ext":
            impls[name] = Implementation(name, lambda x, f=_ASH_EXT[variant]: f(x, percentile))
        elif name == "clone":
            impls[name] = Implementation(name, lambda x: x.clone())
        else:
            raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return impls


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What :func:`run` measures and how. ``None`` fields take the suite's defaults (see :func:`suite`).

    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``: :func:`best_device`
    :param min_time: seconds each implementation is timed per case (``None``: 0.02 on a CPU,
        0.05 on a GPU, a fifth of that with ``quick``); reps stop at ``max_reps``
    :param min_reps: fewest timed calls of a fast implementation
    :param slow_min_reps: fewest timed calls of one slower than ``slow_call_s`` per call (the
        reference, pytorch-ood and the fallback on a CPU, mostly)
    :param cache_bytes: last-level cache size (``None``: read from the machine); inputs rotate through
        at least twice this many bytes
    :param memory_budget_bytes: cap on the bytes of each rotation (``None``: 1/8 of the device's memory,
        at most 2 GiB); there are always at least 2 inputs
    :param methods: ``"ash"`` (the ASH variants, :func:`run`'s cases) and/or the family's methods
        (:data:`ash_ext.bench_family.METHODS`, run by :func:`ash_ext.bench_family.run`); ``None``:
        ``["ash"]``. Without ``"ash"`` :meth:`cases` is empty.
    """

    device: str | None = None
    shapes: list[str] | None = None
    batches: list[int] | None = None
    variants: list[str] | None = None
    dtypes: list[str] | None = None
    percentiles: list[float] | None = None
    impls: list[str] = field(default_factory=lambda: list(IMPLEMENTATIONS))
    quick: bool = False
    seed: int = 0
    threads: int | None = None
    min_time: float | None = None
    min_reps: int = 5
    slow_min_reps: int = 3
    slow_call_s: float = 0.004
    max_reps: int = 200
    warmup: int | None = None
    cache_bytes: int | None = None
    memory_budget_bytes: int | None = None
    progress: bool = True
    methods: list[str] | None = None

    def resolved_device(self) -> torch.device:
        """The device to run on."""
        return torch.device(self.device) if self.device else best_device()

    def cases(self) -> list[Case]:
        """The ASH cases this configuration runs (none when ``methods`` leaves out ``"ash"``)."""
        if self.methods is not None and "ash" not in self.methods:
            return []
        return suite(
            self.resolved_device(),
            quick=self.quick,
            shapes=[s for s in self.shapes if s in SHAPES] if self.shapes is not None else None,
            batches=self.batches,
            dtypes=self.dtypes,
            percentiles=self.percentiles,
            variants=self.variants,
        )


# --------------------------------------------------------------------------------------------
# Machine and inputs
# --------------------------------------------------------------------------------------------


def last_level_cache_bytes(device: torch.device | str) -> int:
    """The largest cache of ``device``: the GPU's L2, or the CPU's largest cache from sysfs (default 32 MiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        return size or 50 * 2**20
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size"), encoding="ascii") as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * scale)
    except OSError:
        pass
    return best or 32 * 2**20


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_describe() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """The machine, device and versions, as recorded in the results."""
    from . import __version__

    device = torch.device(device)
    try:
        cpus_usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = None
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable,
        "memory_bytes": _memory_bytes(torch.device("cpu")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "numpy": _module_version("numpy"),
        "ash_ext": __version__,
        "ash_ext_git": _git_describe(),
        "ash_ext_extension_loaded": extension_loaded(),
        "ash_ext_compiled_with_cuda": compiled_with_cuda(),
        "ash_ext_fallback_forced": fallback_forced(),
        "ash_ext_cpu_isa": cpu_isa(),
        "pytorch_ood": pytorch_ood_version(),
        "device": str(device),
        "device_name": _cpu_model(),
        "device_memory_bytes": _memory_bytes(device),
        "last_level_cache_bytes": last_level_cache_bytes(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_multiprocessors"] = props.multi_processor_count
        info["cuda_driver"] = _cuda_driver()
    return info


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def _cuda_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _draw(kind: str, numel: int, generator: torch.Generator, device: torch.device) -> Tensor:
    x = torch.randn(numel, generator=generator, device=device, dtype=torch.float32)
    if kind == "relu":
        x.relu_()
    elif kind == "abs":
        x.abs_()
    return x


def _seed_for(seed: int, *parts: object) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % 2**63


class Rotation:
    """``copies`` distinct inputs of shape ``size``, views of one flat ``buffer``, handed out in turn.

    With a ``source`` rotation (for in-place functions, which destroy their input) the whole buffer
    is refilled from the source's, in one copy, before the first input is handed out and whenever
    the rotation wraps around. The refill happens inside :meth:`take`, outside any timed region,
    and covers at least twice the cache, so the first inputs are out of the cache again when they
    are used. The cursor is never reset: consecutive cases continue the rotation.
    """

    def __init__(self, buffer: Tensor, size: tuple[int, ...], copies: int, source: Rotation | None = None) -> None:
        numel = math.prod(size)
        if buffer.numel() < numel * copies:
            raise ValueError(f"a buffer of {buffer.numel()} values cannot hold {copies} inputs of shape {size}")
        if source is not None and source.buffer.numel() != buffer.numel():
            raise ValueError("a rotation and its source need buffers of the same size")
        self.buffer = buffer
        self.inputs = [buffer[i * numel : (i + 1) * numel].view(size) for i in range(copies)]
        self.source = source
        self.cursor = 0
        self.dirty = source is not None

    def __len__(self) -> int:
        return len(self.inputs)

    def refill(self) -> None:
        """Copy the source's buffer into this rotation's."""
        assert self.source is not None
        self.buffer.copy_(self.source.buffer)
        if self.buffer.device.type == "cuda":
            torch.cuda.synchronize(self.buffer.device)
        self.dirty = False

    def take(self) -> Tensor:
        """The next input."""
        if self.cursor == 0 and self.dirty:
            self.refill()
        x = self.inputs[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.inputs)
        if self.source is not None:
            self.dirty = True
        return x


def make_rotations(
    case: Case,
    device: torch.device | str,
    *,
    seed: int = 0,
    cache_bytes: int | None = None,
    memory_budget_bytes: int | None = None,
    inplace: bool = True,
) -> tuple[Rotation, Rotation | None]:
    """The rotating inputs of ``case``: a shared rotation for out-of-place functions and, when
    ``inplace``, a refilled one for in-place functions (see :class:`Rotation`).

    Each holds ``max(2, ceil(2 * cache / bytes))`` inputs, at most ``memory_budget_bytes`` of them
    (but 2 at least); ``cache_bytes`` defaults to :func:`last_level_cache_bytes`.
    """
    device = torch.device(device)
    cache = cache_bytes or last_level_cache_bytes(device)
    budget = memory_budget_bytes or _default_budget(device)
    copies = _rotation_copies(case.nbytes, cache, budget)
    g = torch.Generator(device=device)
    g.manual_seed(_seed_for(seed, "timing", case.shape, case.batch))
    buffer = _draw(case.spec.data, case.numel * copies, g, device).to(DTYPES[case.dtype])
    shared = Rotation(buffer, case.size, copies)
    own = Rotation(torch.empty_like(buffer), case.size, copies, source=shared) if inplace else None
    return shared, own


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _default_budget(device: torch.device) -> int:
    return min(2 * 2**30, _memory_bytes(device) // 8)


def _rotation_copies(nbytes: int, cache_bytes: int, budget_bytes: int) -> int:
    wanted = max(2, math.ceil(2 * cache_bytes / max(nbytes, 1)))
    return max(2, min(wanted, budget_bytes // max(nbytes, 1)))


def deviation_input(case: Case, device: torch.device | str, seed: int = 0) -> Tensor:
    """An input of ``case`` whose kept set is unique: the shape's data with 1.0 added to the k largest
    of each sample (before the cast to the case's dtype), so ties at the threshold cannot occur."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(_seed_for(seed, "deviation", case.shape, case.batch, case.percentile))
    x = _draw(case.spec.data, case.numel, g, device).view(case.batch, case.spec.sample_size)
    k = case.k
    if 0 < k < x.shape[1]:
        idx = torch.topk(x, k, dim=1, sorted=False).indices
        x.scatter_add_(1, idx, torch.ones_like(idx, dtype=x.dtype))
    return x.view(case.size).to(DTYPES[case.dtype])


def _max_abs(t: Tensor) -> float:
    return float(t.float().abs().max()) if t.numel() else 0.0  # NaN if t has a NaN


def _compare(out: Tensor, ref: Tensor) -> dict[str, Any]:
    ref_finite = math.isfinite(_max_abs(ref))
    out_finite = math.isfinite(_max_abs(out))
    # Positions zero in one output and not in the other (NaN counts as non-zero).
    mismatch = int(((ref != 0) ^ (out != 0)).sum())
    result: dict[str, Any] = {"reference_nonfinite": not ref_finite, "ash_ext_nonfinite": not out_finite}
    if not (ref_finite and out_finite):
        return {"max_abs_dev": math.nan, "max_rel_dev": math.nan, "mask_mismatch": mismatch, **result}
    max_abs = float((out.float() - ref.float()).abs_().max()) if ref.numel() else 0.0
    scale = _max_abs(ref)
    rel = max_abs / scale if scale > 0 else max_abs
    return {"max_abs_dev": max_abs, "max_rel_dev": rel, "mask_mismatch": mismatch, **result}


def deviation(case: Case, device: torch.device | str, seed: int = 0, x: Tensor | None = None) -> dict[str, Any]:
    """ash_ext's deviation from the reference algorithm on ``x`` (default: :func:`deviation_input`).

    Returns ``max_abs_dev`` (max |ash_ext - reference|), ``max_rel_dev`` (that over max |reference|)
    and ``mask_mismatch`` (positions zero in one output and not in the other); NaN or inf in either
    output makes the deviations NaN, and ``reference_nonfinite`` / ``ash_ext_nonfinite`` say which
    (the reference gives NaN for ASH-S with k = 0, where ash_ext documents zeros).

    For float16 and bfloat16 the reference runs on the input in float32 and its output is rounded to
    the dtype (ash_ext accumulates in float32 too; the reference's own half-precision sums lose
    precision and overflow float16 on feature maps); ``same_dtype_reference`` then holds the
    comparison with the reference run in the dtype itself.
    """
    if x is None:
        x = deviation_input(case, device, seed)
    with torch.no_grad():
        out = _ASH_EXT[case.variant](x, case.percentile)
        same = _REFERENCE[case.variant](x, case.percentile)
        half = x.dtype in (torch.float16, torch.bfloat16)
        exact = _REFERENCE[case.variant](x.float(), case.percentile).to(x.dtype) if half else same
    result = _compare(out, exact)
    result["deviation_baseline"] = (
        f"reference in float32, rounded to {case.dtype}" if half else f"reference in {case.dtype}"
    )
    if half:
        result["same_dtype_reference"] = _compare(out, same)
    return result


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class _Timer:
    """Times one call in seconds: CUDA events on a GPU, ``perf_counter`` otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[Tensor], object], x: Tensor) -> float:
        if self.cuda:
            self.start.record()
            out = fn(x)
            self.end.record()
            self.end.synchronize()
            del out
            return self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter()
        out = fn(x)
        t1 = time.perf_counter()
        del out
        return t1 - t0


def summarize(samples_s: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min, max, mean and stdev (ms) of timings in seconds, and the samples."""
    ms = sorted(s * 1e3 for s in samples_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        stdev = statistics.stdev(ms)
    else:
        q1 = q3 = ms[0]
        stdev = 0.0
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "mean_ms": statistics.fmean(ms),
        "stdev_ms": stdev,
        "reps": len(ms),
        "samples_ms": [s * 1e3 for s in samples_s],
    }


def time_interleaved(
    impls: dict[str, Implementation],
    shared: Rotation,
    inplace: Rotation | None,
    device: torch.device,
    *,
    min_time: float,
    min_reps: int,
    slow_min_reps: int,
    slow_call_s: float,
    max_reps: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Time ``impls`` round-robin (the order rotating each round) on rotating inputs; seconds per call.

    Each implementation first runs ``warmup`` untimed calls, the last of which estimates its cost;
    it then gets ``ceil(min_time / estimate)`` timed calls, at least ``min_reps`` (``slow_min_reps``
    when one call takes over ``slow_call_s``) and at most ``max_reps``.
    """
    timer = _Timer(device)
    names = list(impls)

    def take(name: str) -> Tensor:
        return inplace.take() if impls[name].inplace and inplace is not None else shared.take()

    estimate = {}
    for name in names:
        for _ in range(max(1, warmup)):
            estimate[name] = timer(impls[name].fn, take(name))
    reps = {}
    for name in names:
        floor = slow_min_reps if estimate[name] > slow_call_s else min_reps
        reps[name] = max(floor, min(max_reps, math.ceil(min_time / max(estimate[name], 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(reps.values(), default=0)):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            if len(samples[name]) < reps[name]:
                samples[name].append(timer(impls[name].fn, take(name)))
    return samples


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on stderr (``\\r``-updated on a TTY, a line every ~10% or 30 s otherwise)."""

    def __init__(self, weights: list[float], enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.weights = weights
        self.total = sum(weights) or 1.0
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.columns = max(40, shutil.get_terminal_size((100, 20)).columns - 1)
        self.start = time.perf_counter()
        self.done_weight = 0.0
        self.index = 0
        self.last_line = 0.0
        self.last_decile = -1

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.done_weight <= 0:
            return "--:--"
        left = elapsed / self.done_weight * (self.total - self.done_weight)
        return f"{int(left // 60):02d}:{int(left % 60):02d}"

    def update(self, label: str) -> None:
        if not self.enabled:
            return
        n = len(self.weights)
        frac = self.done_weight / self.total
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 24
            filled = round(frac * width)
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {self.index}/{n} {elapsed:5.0f}s eta {self._eta()}  {label}"
            )
            cols = self.columns
            self.stream.write("\r" + line[:cols].ljust(cols))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile > self.last_decile or elapsed - self.last_line > 30:
                self.last_decile = decile
                self.last_line = elapsed
                self.stream.write(f"bench: {self.index}/{n} cases, {elapsed:.0f}s, eta {self._eta()}: {label}\n")
                self.stream.flush()

    def advance(self) -> None:
        self.done_weight += self.weights[self.index]
        self.index += 1

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * self.columns + "\r")
            self.stream.flush()


def _case_weight(case: Case, device: torch.device) -> float:
    # ~ the slow reference and fallback (per value) plus a fixed cost per case
    per_value = 2e-7 if device.type == "cpu" else 2e-9
    return 0.15 + per_value * case.numel * max(1, DTYPES[case.dtype].itemsize // 2)


def _default_min_time(device: torch.device, quick: bool) -> float:
    base = 0.02 if device.type == "cpu" else 0.05
    return base / 5 if quick else base


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark of ``config`` and return ``{"meta": {...}, "results": [...]}``.

    ``meta`` holds the machine, device, versions, configuration and data description; each entry of
    ``results`` one case: its parameters, per-implementation timing summaries (ms), the speed-ups,
    achieved GB/s, percentage of the clone's bandwidth and ash_ext's deviation from the reference.
    A KeyboardInterrupt stops the run early; ``meta["interrupted"]`` is then true.
    """
    device = config.resolved_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    cases = config.cases()
    min_time = config.min_time if config.min_time is not None else _default_min_time(device, config.quick)
    warmup = config.warmup if config.warmup is not None else (3 if device.type == "cuda" else 1)
    cache = config.cache_bytes or last_level_cache_bytes(device)
    budget = config.memory_budget_bytes or _default_budget(device)
    impl_names = [name for name in config.impls if name != "pytorch-ood" or pytorch_ood_version() is not None]

    meta: dict[str, Any] = {
        "tool": "ash_ext bench",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": machine_info(device),
        "config": {**asdict(config), "device": str(device), "min_time": min_time, "warmup": warmup},
        "implementations": {
            "reference": "ash_ext.reference.ash_*_inplace: sorted topk, zero_, scatter_; in place (pytorch-ood 0.3.3)",
            "pytorch-ood": "pytorch_ood.detector.ash.ash_* (out of place; 2-D inputs as [B, C, 1, 1])",
            "fallback": "ash_ext.fallback.ash_* (pure PyTorch, stable sort)",
            "ash_ext": "ash_ext.ash_*(x, p), out of place",
            "clone": "x.clone(): one read + one write, the memory roofline",
        },
        "timed": impl_names,
        "timing": (
            "CUDA events around each call, the GPU idle before it (so the Python launch cost counts)"
            if device.type == "cuda"
            else "time.perf_counter around each call"
        )
        + f"; {warmup} warm-up call(s) per implementation and case; implementations interleaved round-robin; "
        f"each call on the next of >= max(2, ceil(2 * cache / bytes)) distinct inputs (cache {cache} B, "
        f"memory budget {budget} B per rotation); the in-place reference on its own rotation, refilled outside "
        "the timed region when it wraps; outputs freed outside the timed region",
        "data": {name: DATA_KINDS[SHAPES[name].data] for name in SHAPES},
        "deviation_data": DEVIATION_DATA,
        "gbps": "2 * tensor bytes / median time (one read and one write of the tensor)",
        "interrupted": False,
        "load_average_start": _load_average(),
    }
    results: list[dict[str, Any]] = []
    progress = _Progress([_case_weight(c, device) for c in cases], config.progress)
    started = time.perf_counter()
    groups: dict[tuple[str, int], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.shape, case.batch), []).append(case)
    try:
        with torch.no_grad():
            for (shape, batch), group in groups.items():
                _run_group(
                    shape, batch, group, impl_names, device, config, cache, budget, min_time, warmup, results, progress
                )
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        progress.close()
    meta["wall_s"] = time.perf_counter() - started
    meta["load_average_end"] = _load_average()
    meta["machine"]["torch_threads"] = torch.get_num_threads()
    return {"meta": meta, "results": results}


def _run_group(
    shape: str,
    batch: int,
    group: list[Case],
    impl_names: list[str],
    device: torch.device,
    config: BenchConfig,
    cache: int,
    budget: int,
    min_time: float,
    warmup: int,
    results: list[dict[str, Any]],
    progress: _Progress,
) -> None:
    spec = SHAPES[shape]
    size = (batch, *spec.dims)
    numel = math.prod(size)
    smallest_item = min(DTYPES[c.dtype].itemsize for c in group)
    copies = _rotation_copies(numel * smallest_item, cache, budget)
    g = torch.Generator(device=device)
    g.manual_seed(_seed_for(config.seed, "timing", shape, batch))
    base = _draw(spec.data, numel * copies, g, device)
    by_dtype: dict[str, list[Case]] = {}
    for case in group:
        by_dtype.setdefault(case.dtype, []).append(case)
    for dtype_name, dtype_cases in by_dtype.items():
        dtype = DTYPES[dtype_name]
        buffer = base if dtype == torch.float32 else base.to(dtype)
        shared = Rotation(buffer, size, copies)
        needs_inplace = "reference" in impl_names
        inplace = Rotation(torch.empty_like(buffer), size, copies, source=shared) if needs_inplace else None
        deviation_inputs: dict[float, Tensor] = {}
        for case in dtype_cases:
            progress.update(case.id)
            if case.percentile not in deviation_inputs:
                deviation_inputs = {case.percentile: deviation_input(case, device, config.seed)}
            x_dev = deviation_inputs[case.percentile]
            results.append(
                _run_case(case, impl_names, shared, inplace, x_dev, device, config, min_time, warmup, copies)
            )
            progress.advance()
        del shared, inplace, buffer, deviation_inputs
    del base


def _run_case(
    case: Case,
    impl_names: list[str],
    shared: Rotation,
    inplace: Rotation | None,
    x_dev: Tensor,
    device: torch.device,
    config: BenchConfig,
    min_time: float,
    warmup: int,
    copies: int,
) -> dict[str, Any]:
    impls = implementations(case.variant, case.percentile, impl_names)
    samples = time_interleaved(
        impls,
        shared,
        inplace,
        device,
        min_time=min_time,
        min_reps=config.min_reps,
        slow_min_reps=config.slow_min_reps,
        slow_call_s=config.slow_call_s,
        max_reps=config.max_reps,
        warmup=warmup,
    )
    timings = {name: summarize(s) for name, s in samples.items()}
    med = {name: t["median_ms"] for name, t in timings.items()}
    row: dict[str, Any] = {
        "case": case.id,
        "shape": case.shape,
        "model": case.spec.model,
        "size": list(case.size),
        "batch": case.batch,
        "dtype": case.dtype,
        "percentile": case.percentile,
        "variant": case.variant,
        "n": case.spec.sample_size,
        "k": case.k,
        "bytes": case.nbytes,
        "rotation_inputs": copies,
        "ash_ext_implementation": implementation_for(shared.inputs[0]),
        "timings": timings,
    }

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med and med[b] > 0 else None

    row["speedup_vs_reference"] = ratio("reference", "ash_ext")
    row["speedup_vs_pytorch_ood"] = ratio("pytorch-ood", "ash_ext")
    row["speedup_vs_fallback"] = ratio("fallback", "ash_ext")
    row["gbps"] = {name: 2 * case.nbytes / (m * 1e-3) / 1e9 if m > 0 else None for name, m in med.items()}
    row["ash_ext_gbps"] = row["gbps"].get("ash_ext")
    row["clone_gbps"] = row["gbps"].get("clone")
    pct = ratio("clone", "ash_ext")
    row["pct_of_clone"] = 100 * pct if pct is not None else None
    row.update(deviation(case, device, config.seed, x=x_dev))
    return row


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS: tuple[str, ...] = (
    "shape",
    "B",
    "dtype",
    "p",
    "variant",
    "ref ms",
    "pytorch-ood ms",
    "fallback ms",
    "ash_ext ms",
    "±IQR",
    "clone ms",
    "speed-up vs ref",
    "GB/s",
    "% of clone",
    "max dev (rel)",
)


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _fmt_dev(row: dict[str, Any]) -> str:
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return "ref inf/NaN"
    rel = row.get("max_rel_dev")
    text = "nan" if rel is None or math.isnan(rel) else ("0" if rel == 0 else f"{rel:.1e}")
    if row.get("mask_mismatch"):
        text += f" ({row['mask_mismatch']} pos!)"
    return text


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, one list of strings per case (columns: :data:`TABLE_COLUMNS`)."""
    rows = []
    for r in results:
        t = r["timings"]

        med = {name: summary["median_ms"] for name, summary in t.items()}.get

        ext = t.get("ash_ext")
        iqr = f"{100 * ext['iqr_ms'] / ext['median_ms']:.0f}%" if ext and ext["median_ms"] > 0 else "-"
        speed = r.get("speedup_vs_reference")
        gbps = r.get("ash_ext_gbps")
        pct = r.get("pct_of_clone")
        rows.append(
            [
                r["shape"],
                str(r["batch"]),
                r["dtype"],
                f"{r['percentile']:g}",
                r["variant"],
                _fmt_ms(med("reference")),
                _fmt_ms(med("pytorch-ood")),
                _fmt_ms(med("fallback")),
                _fmt_ms(med("ash_ext")),
                iqr,
                _fmt_ms(med("clone")),
                f"{speed:.1f}x" if speed is not None else "-",
                f"{gbps:.1f}" if gbps is not None else "-",
                f"{pct:.0f}%" if pct is not None else "-",
                _fmt_dev(r),
            ]
        )
    return rows


def format_table(results: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table)."""
    return render_table(list(TABLE_COLUMNS), table_rows(results), {0, 2, 4}, markdown)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int], markdown: bool) -> str:
    """``rows`` under ``header`` as aligned text (or Markdown); columns in ``left`` align left."""
    widths = [
        max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(header)]
    if markdown:
        out.append(
            "|"
            + "|".join(("-" * (w + 1) + ":") if i not in left else (":" + "-" * (w + 1)) for i, w in enumerate(widths))
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(row) for row in rows]
    return "\n".join(out)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A few lines under the table: machine, geometric-mean speed-ups, and any case to look at."""
    meta, results = data["meta"], data["results"]
    m = meta["machine"]
    lines = [
        (
            f"device {m['device']} ({m['device_name']}), torch {m['torch']} ({m['torch_threads']} threads), "
            f"ash_ext {m['ash_ext']} (CPU kernel: {m.get('ash_ext_cpu_isa', 'unknown')}), "
            f"pytorch-ood {m['pytorch_ood'] or 'not installed'}; "
            f"{len(results)} cases in {meta.get('wall_s', 0):.0f} s"
        )
    ]
    paths = sorted({r["ash_ext_implementation"] for r in results})
    if paths and paths != ["cpu-kernel"] and paths != ["cuda-kernel"]:
        lines.append(f"note: ash_ext ran as {', '.join(paths)} (the compiled kernel is not in use for every case)")
    speeds = [r["speedup_vs_reference"] for r in results if r.get("speedup_vs_reference")]
    if speeds:
        by_dtype: dict[str, list[float]] = {}
        for r in results:
            if r.get("speedup_vs_reference"):
                by_dtype.setdefault(r["dtype"], []).append(r["speedup_vs_reference"])
        parts = [f"{d} {_geomean(v):.1f}x" for d, v in by_dtype.items()]
        lines.append(
            f"speed-up of ash_ext over the reference: geometric mean {_geomean(speeds):.1f}x ({', '.join(parts)}); "
            f"range {min(speeds):.2f}x .. {max(speeds):.1f}x"
        )
    slower = [r for r in results if r.get("speedup_vs_reference") is not None and r["speedup_vs_reference"] < 1]
    if slower:
        lines.append(
            f"ash_ext is SLOWER than the reference in {len(slower)} case(s): " + _some([r["case"] for r in slower], 8)
        )
    ref_nan = [r["case"] for r in results if r.get("reference_nonfinite") and not r.get("ash_ext_nonfinite")]
    devs = [r for r in results if _dev_too_large(r)]
    if devs:
        lines.append(f"ash_ext DEVIATES from the reference in {len(devs)} case(s): " + _some([r["case"] for r in devs]))
    elif results:
        worst = max(results, key=lambda r: r.get("max_rel_dev") or 0.0)
        lines.append(
            f"largest deviation from the reference: {worst.get('max_rel_dev', 0.0):.1e} of max |reference| "
            f"({worst['case']}); kept sets identical "
            + ("wherever the reference is finite" if ref_nan else "in every case")
        )
    if any("same_dtype_reference" in r for r in results):
        lines.append(
            "half-precision cases compare with the reference run in float32 and rounded to the dtype; "
            "results.json also holds the comparison with the reference run in the dtype itself"
        )
    if ref_nan:
        lines.append(
            f"the reference gives inf/NaN where ash_ext is finite in {len(ref_nan)} case(s) (e.g. ASH-S with "
            "k = 0 divides by a zero kept sum; ash_ext documents zeros there): " + _some(ref_nan)
        )
    broken = [
        r["case"]
        for r in results
        if r.get("same_dtype_reference", {}).get("reference_nonfinite") and r["case"] not in ref_nan
    ]
    if broken:
        lines.append(
            f"the reference run in the dtype itself (not in float32) gives inf/NaN in {len(broken)} case(s), "
            "e.g. when its float16 sums overflow: " + _some(broken)
        )
    noisy = [r for r in results if _noisy(r)]
    if noisy:
        lines.append(
            f"{len(noisy)} case(s) have a spread (IQR) over half the median for ash_ext or the clone: "
            "perhaps other processes were using the device"
        )
    load = meta.get("load_average_start")
    cpus = m.get("cpus_usable") or m.get("cpu_count") or 1
    if m["device"].startswith("cpu") and load and load[0] > max(1.0, 0.5 * cpus):
        lines.append(
            f"the 1-minute load average was {load[0]:.1f} on {cpus} CPUs as the run started: other processes "
            "were probably competing for the CPU (multi-threaded ops then stall), so the times are noisy"
        )
    if meta.get("interrupted"):
        lines.append("interrupted: the results are partial")
    return lines


def _some(names: Sequence[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _noisy(row: dict[str, Any]) -> bool:
    for name in ("ash_ext", "clone"):
        t = row["timings"].get(name)
        if t and t["median_ms"] > 0 and t["iqr_ms"] > 0.5 * t["median_ms"]:
            return True
    return False


def deviation_tolerance(dtype: str) -> float:
    """The largest relative deviation (of max |reference|) of ash_ext from the reference that is not flagged."""
    # relative to max |reference|: a few ulp of the dtype (float32: sum-order effects through exp in ASH-S)
    return {"float64": 1e-10, "float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}.get(dtype, 1e-2)


def _dev_too_large(row: dict[str, Any]) -> bool:
    if row.get("reference_nonfinite") and not row.get("ash_ext_nonfinite"):
        return False  # reported on its own line
    if row.get("mask_mismatch"):
        return True
    rel = row.get("max_rel_dev")
    return rel is None or math.isnan(rel) or rel > deviation_tolerance(row["dtype"])


def _geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else math.nan


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(data: dict[str, Any], path: str) -> None:
    """Write the results of :func:`run` as JSON (NaN and inf become null)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(data), f, indent=1)
        f.write("\n")


CSV_TIMING_FIELDS: tuple[str, ...] = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "mean_ms", "stdev_ms", "reps")


def csv_rows(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The CSV's header and rows: one row per case, timing summaries flattened as ``<impl>_<field>``."""
    base = [
        "case",
        "shape",
        "batch",
        "dtype",
        "percentile",
        "variant",
        "n",
        "k",
        "bytes",
        "rotation_inputs",
        "ash_ext_implementation",
    ]
    tail = [
        "speedup_vs_reference",
        "speedup_vs_pytorch_ood",
        "speedup_vs_fallback",
        "ash_ext_gbps",
        "clone_gbps",
        "pct_of_clone",
        "max_abs_dev",
        "max_rel_dev",
        "mask_mismatch",
        "deviation_baseline",
        "same_dtype_ref_max_rel_dev",
        "same_dtype_ref_mask_mismatch",
        "same_dtype_ref_nonfinite",
        "reference_nonfinite",
        "ash_ext_nonfinite",
    ]
    impls = [name for name in IMPLEMENTATIONS if any(name in r["timings"] for r in data["results"])]
    header = base + [f"{i}_{f}" for i in impls for f in CSV_TIMING_FIELDS] + tail
    m = data["meta"]["machine"]
    header += ["device", "device_name", "torch", "ash_ext", "pytorch_ood"]
    rows = []
    for r in data["results"]:
        row = {key: r.get(key) for key in base + tail}
        same = r.get("same_dtype_reference", {})
        row["same_dtype_ref_max_rel_dev"] = same.get("max_rel_dev")
        row["same_dtype_ref_mask_mismatch"] = same.get("mask_mismatch")
        row["same_dtype_ref_nonfinite"] = same.get("reference_nonfinite")
        for i in impls:
            for f in CSV_TIMING_FIELDS:
                row[f"{i}_{f}"] = r["timings"].get(i, {}).get(f)
        row.update(
            device=m["device"],
            device_name=m["device_name"],
            torch=m["torch"],
            ash_ext=m["ash_ext"],
            pytorch_ood=m["pytorch_ood"],
        )
        rows.append(row)
    return header, rows


def write_csv(data: dict[str, Any], path: str) -> None:
    """Write the results of :func:`run` as CSV, one row per case (the raw samples are in the JSON)."""
    header, rows = csv_rows(data)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def write_plot(data: dict[str, Any], path: str) -> bool:
    """Plot ash_ext's speed-up over the reference against batch size, one panel per shape.

    One line per dtype and variant (geometric mean over the percentiles). Returns ``False``
    without writing anything when matplotlib is not installed or no case has a speed-up.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    results = [r for r in data["results"] if r.get("speedup_vs_reference")]
    if not results:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    cols = min(3, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    styles = {"float32": "-", "float16": "--", "bfloat16": ":", "float64": "-."}
    colors = {"ash-p": "tab:blue", "ash-b": "tab:orange", "ash-s": "tab:green"}
    for ax, shape in zip(axes.flat, shapes):
        lines: dict[tuple[str, str], dict[int, list[float]]] = {}
        for r in results:
            if r["shape"] == shape:
                lines.setdefault((r["dtype"], r["variant"]), {}).setdefault(r["batch"], []).append(
                    r["speedup_vs_reference"]
                )
        for (dtype, variant), points in lines.items():
            xs = sorted(points)
            ax.plot(
                xs,
                [_geomean(points[b]) for b in xs],
                linestyle=styles.get(dtype, "-"),
                color=colors.get(variant),
                marker="o",
                markersize=3,
                label=f"{variant} {dtype}",
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({r["batch"] for r in results if r["shape"] == shape})
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{shape} {list(SHAPES[shape].dims)}", fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over the reference")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    m = data["meta"]["machine"]
    fig.suptitle(
        f"ash_ext {m['ash_ext']} vs the topk+scatter reference on {m['device_name']} ({m['device']}), "
        f"torch {m['torch']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def build_parser(prog: str = "ash-ext bench") -> argparse.ArgumentParser:
    """The ``bench`` subcommand's argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Time ash_ext against the reference algorithm (in place), pytorch-ood, the pure-PyTorch fallback and "
            "x.clone() (the memory roofline) on the shapes ASH is applied to; print a table, write results.json, "
            "results.csv and speedup.png."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            f"  {prog} --quick\n"
            f"  {prog} --shapes resnet50-l4 wrn28-10 --batches 1 64 --dtypes float16 --variants ash-s\n"
            f"  {prog} --device cpu --threads 1 --impls reference ash_ext clone --markdown\n"
            f"  {prog} --methods family --markdown --out family-out\n"
            "\nThe quick suite is float32, p=0.65, all variants, two batch sizes per shape. On a CPU the default\n"
            "suite stops the feature maps at smaller batches than on a GPU (1..256) to stay within minutes; pick\n"
            "any with --batches. Results: OUT/results.json (every sample, the machine and versions),\n"
            "OUT/results.csv (one row per case) and OUT/speedup.png (needs matplotlib).\n"
            "\n--methods family compares SCALE, ReAct+ASH (clip=), LTS, topk_stats, per-sample percentiles and\n"
            "ReAct's fit with their references (pytorch-ood 0.4.0's functions, torch.topk, a torch.sort-based\n"
            "per-sample ASH-S, np.percentile) on their own shapes; --quick, --batches, --dtypes, --percentiles and\n"
            "--shapes apply to them too (LTS keeps p = 0.05, the fit 0.9). Alone they write OUT/results.json and\n"
            "OUT/results.csv; with ash (--methods all) OUT/family-results.json and OUT/family-results.csv."
        ),
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--shapes", nargs="+", metavar="NAME", help=f"shapes (comma or space separated): {', '.join(SHAPES)}; or all"
    )
    parser.add_argument("--batches", nargs="+", metavar="B", help="batch sizes (default: per shape and device)")
    parser.add_argument("--variants", nargs="+", metavar="V", help=f"{', '.join(VARIANTS)}; or all")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        metavar="T",
        help="float32, float16, bfloat16, float64 (default: float32 and the device's half types)",
    )
    parser.add_argument("--percentiles", nargs="+", metavar="P", help="fractions pruned, in [0, 1] (default: 0.65 0.9)")
    parser.add_argument(
        "--impls", nargs="+", metavar="I", help=f"implementations to time: {', '.join(IMPLEMENTATIONS)}"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        help="what to compare with its reference: ash (the ASH variants; the default), scale, react-ash, lts, "
        "topk-stats, per-sample, react-fit; family (all but ash) or all",
    )
    parser.add_argument("--quick", action="store_true", help="the short suite (under a minute on a 2-core CPU)")
    parser.add_argument(
        "--out", default="bench-out", help="directory for results.json, results.csv, speedup.png (default: bench-out)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write speedup.png")
    parser.add_argument("--no-files", action="store_true", help="write nothing, only print the table")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input data (default: 0)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--min-time",
        type=float,
        help="seconds each implementation is timed per case (default 0.02 CPU / 0.05 GPU, /5 with --quick)",
    )
    parser.add_argument(
        "--min-reps", type=int, default=5, help="fewest timed calls per fast implementation and case (default: 5)"
    )
    parser.add_argument(
        "--max-reps", type=int, default=200, help="most timed calls per implementation and case (default: 200)"
    )
    parser.add_argument("--cache-mb", type=float, help="last-level cache size in MiB (default: read from the machine)")
    parser.add_argument(
        "--cpu-isa",
        help="the CPU kernel's ISA build: auto, avx512, avx2 or baseline (default: ASH_EXT_CPU_ISA, else the best)",
    )
    return parser


def _parse_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    device_text = args.device
    if device_text is not None:
        try:
            device = torch.device(device_text)
        except (RuntimeError, ValueError) as error:
            parser.error(f"--device {device_text!r} is not a torch device ({error})")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(
                f"--device {device_text}: CUDA is not available "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})"
            )
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {device_text}: there are {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            parser.error(f"--device {device_text}: MPS is not available")
        if device.type not in ("cpu", "cuda", "mps"):
            parser.error(f"--device {device_text}: only cpu, cuda and mps are supported")
    else:
        device = best_device()

    from . import bench_family

    methods = None
    if args.methods is not None:
        try:
            methods = bench_family.expand_methods(_split(args.methods) or [])
        except ValueError as error:
            parser.error(str(error))
        if not methods:
            parser.error("--methods: no method given")
    known_shapes = list(SHAPES)
    if methods is not None and any(m != "ash" for m in methods):
        known_shapes += [s for s in bench_family.SHAPES if s not in SHAPES]
    shapes = _split(args.shapes)
    if shapes is not None:
        if shapes == ["all"]:
            shapes = list(known_shapes)
        unknown = [s for s in shapes if s not in known_shapes]
        if unknown:
            parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(known_shapes)}")
    batches = None
    if args.batches is not None:
        batches = []
        for text in _split(args.batches) or []:
            if not text.isdigit() or int(text) < 1:
                parser.error(f"--batches: {text!r} is not a positive integer")
            batches.append(int(text))
    variants = _split(args.variants)
    if variants is not None:
        if variants == ["all"]:
            variants = list(VARIANTS)
        variants = [v.lower().replace("_", "-") for v in variants]
        variants = [v if v.startswith("ash-") else f"ash-{v}" for v in variants]
        unknown = [v for v in variants if v not in VARIANT_CODES]
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    dtypes = _split(args.dtypes)
    if dtypes is not None:
        dtypes = [DTYPE_ALIASES.get(d.lower(), d.lower()) for d in dtypes]
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            parser.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
        available = supported_dtypes(device) + ["float64"]
        missing = [d for d in dtypes if d not in available]
        if missing:
            parser.error(f"dtype(s) {', '.join(missing)} not supported on {device}")
    percentiles = None
    if args.percentiles is not None:
        percentiles = []
        for text in _split(args.percentiles) or []:
            try:
                value = float(text)
            except ValueError:
                parser.error(f"--percentiles: {text!r} is not a number")
            if not 0.0 <= value <= 1.0:
                hint = f" (did you mean {value / 100:g}?)" if 1 < value <= 100 else ""
                parser.error(f"--percentiles: {text} is not a fraction in [0, 1]{hint}")
            percentiles.append(value)
    impls = list(IMPLEMENTATIONS)
    if args.impls is not None:
        impls = _split(args.impls) or []
        unknown = [i for i in impls if i not in IMPLEMENTATIONS]
        if unknown:
            parser.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    for name, value in (("--threads", args.threads), ("--min-reps", args.min_reps), ("--max-reps", args.max_reps)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1")
    if args.min_reps > args.max_reps:
        parser.error("--min-reps is larger than --max-reps")
    if args.min_time is not None and not args.min_time > 0:
        parser.error("--min-time must be positive")
    if args.cache_mb is not None and not args.cache_mb > 0:
        parser.error("--cache-mb must be positive")
    return BenchConfig(
        device=str(device),
        shapes=shapes,
        batches=batches,
        variants=variants,
        dtypes=dtypes,
        percentiles=percentiles,
        impls=impls,
        quick=args.quick,
        seed=args.seed,
        threads=args.threads,
        min_time=args.min_time,
        min_reps=args.min_reps,
        slow_min_reps=min(3, args.min_reps),
        max_reps=args.max_reps,
        cache_bytes=int(args.cache_mb * 2**20) if args.cache_mb else None,
        progress=not args.no_progress,
        methods=methods,
    )


def main(argv: Sequence[str] | None = None, prog: str = "ash-ext bench") -> int:
    """Run ``bench`` with command-line arguments ``argv``; returns the exit status."""
    from . import bench_family

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.cpu_isa is not None:
        if not extension_loaded():
            parser.error("--cpu-isa: the extension is not built, so there is no CPU kernel")
        try:
            set_cpu_isa(args.cpu_isa)
        except ValueError as error:
            parser.error(f"--cpu-isa: {error}")
    config = _parse_config(parser, args)
    cases = config.cases()
    family_cases = bench_family.family_cases(config) if config.methods is not None else []
    if not cases and not family_cases:
        parser.error("the selection is empty")
    if not args.no_files:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as error:
            parser.error(f"--out {args.out}: {error}")
    device = config.resolved_device()
    where = (
        f" ({torch.cuda.get_device_name(device)})"
        if device.type == "cuda"
        else f" ({_cpu_model()}, {torch.get_num_threads() if not config.threads else config.threads} threads)"
    )
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    interrupted = False
    if cases:
        interrupted = _main_ash(args, config, cases, device, where, argv_list)
    if family_cases and not interrupted:
        if cases:
            print()
        interrupted = _main_family(args, config, family_cases, device, where, argv_list, prefix="family-" * bool(cases))
    return 130 if interrupted else 0


def _main_ash(
    args: argparse.Namespace,
    config: BenchConfig,
    cases: list[Case],
    device: torch.device,
    where: str,
    argv: list[str],
) -> bool:
    """The ASH part of :func:`main`: run, print, write; returns whether it was interrupted."""
    print(f"ash_ext bench: {len(cases)} cases on {device}" + where, file=sys.stderr)
    if pytorch_ood_version() is None and "pytorch-ood" in config.impls:
        print(
            "ash_ext bench: pytorch-ood is not importable; its column stays empty (pip install pytorch-ood)",
            file=sys.stderr,
        )
    data = run(config)
    data["meta"]["argv"] = argv
    print(format_table(data["results"], markdown=args.markdown))
    print()
    for line in summary_lines(data):
        print(line)
    if not args.no_files:
        json_path = os.path.join(args.out, "results.json")
        csv_path = os.path.join(args.out, "results.csv")
        write_json(data, json_path)
        write_csv(data, csv_path)
        written = [json_path, csv_path]
        if not args.no_plot:
            png = os.path.join(args.out, "speedup.png")
            if write_plot(data, png):
                written.append(png)
            elif importlib_available("matplotlib"):
                print("no speed-up to plot (no case timed both the reference and ash_ext)")
            else:
                print("matplotlib is not installed: skipping the plot (pip install matplotlib, or ash_ext[plot])")
        print("wrote " + ", ".join(written))
    return bool(data["meta"]["interrupted"])


def _main_family(
    args: argparse.Namespace,
    config: BenchConfig,
    cases: list[Any],
    device: torch.device,
    where: str,
    argv: list[str],
    prefix: str,
) -> bool:
    """The family part of :func:`main` (:mod:`ash_ext.bench_family`): run, print, write ``{prefix}results.*``."""
    from . import bench_family

    print(f"ash_ext bench: {len(cases)} family cases on {device}" + where, file=sys.stderr)
    if pytorch_ood_version() is None:
        print(
            "ash_ext bench: pytorch-ood is not importable; its algorithms, copied in torch, stand in as references",
            file=sys.stderr,
        )
    data = bench_family.run(config)
    data["meta"]["argv"] = argv
    print(bench_family.format_table(data["results"], markdown=args.markdown))
    print()
    for line in bench_family.summary_lines(data):
        print(line)
    if not args.no_files:
        json_path = os.path.join(args.out, f"{prefix}results.json")
        csv_path = os.path.join(args.out, f"{prefix}results.csv")
        write_json(data, json_path)
        bench_family.write_csv(data, csv_path)
        print("wrote " + ", ".join([json_path, csv_path]))
    return bool(data["meta"]["interrupted"])


def importlib_available(name: str) -> bool:
    """Whether module ``name`` can be found (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None
