"""The functions the bench times for the ASH variants: the reference, pytorch-ood, the fallback,
ash_ext and the clone (the memory roofline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .. import fallback, reference
from ..functional import ash_b, ash_p, ash_s

#: The implementations, in the order of the table.
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "pytorch-ood", "fallback", "ash_ext", "clone")

#: What each implementation is, written into the results.
DESCRIPTIONS: dict[str, str] = {
    "reference": "ash_ext.reference.ash_*_inplace: sorted topk, zero_, scatter_; in place (pytorch-ood 0.3.3)",
    "pytorch-ood": "pytorch_ood.detector.ash.ash_* (out of place; 2-D inputs as [B, C, 1, 1])",
    "fallback": "ash_ext.fallback.ash_* (pure PyTorch, stable sort)",
    "ash_ext": "ash_ext.ash_*(x, p), out of place",
    "clone": "x.clone(): one read + one write, the memory roofline",
}


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


#: ash_ext's functions, by variant.
ASH_EXT: dict[str, Callable[..., Tensor]] = {"ash-p": ash_p, "ash-b": ash_b, "ash-s": ash_s}
#: The pure-PyTorch fallback's functions, by variant.
FALLBACK: dict[str, Callable[..., Tensor]] = {
    "ash-p": fallback.ash_p,
    "ash-b": fallback.ash_b,
    "ash-s": fallback.ash_s,
}
#: The reference algorithm, out of place (for the deviation check), by variant.
REFERENCE: dict[str, Callable[..., Tensor]] = {
    "ash-p": reference.ash_p,
    "ash-b": reference.ash_b,
    "ash-s": reference.ash_s,
}
#: The reference algorithm in place (what is timed), by variant.
REFERENCE_INPLACE: dict[str, Callable[..., Tensor]] = {
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
            ref = REFERENCE_INPLACE[variant]
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
            impls[name] = Implementation(name, lambda x, f=FALLBACK[variant]: f(x, percentile))
        elif name == "ash_ext":
            impls[name] = Implementation(name, lambda x, f=ASH_EXT[variant]: f(x, percentile))
        elif name == "clone":
            impls[name] = Implementation(name, lambda x: x.clone())
        else:
            raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return impls
