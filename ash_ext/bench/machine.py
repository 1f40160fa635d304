"""Facts about the machine the bench runs on: caches, memory, CPU, versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch

from .._ops import compiled_with_cuda, extension_loaded, fallback_forced
from ..cpu_dispatch import cpu_isa
from .impls import pytorch_ood_version


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


def memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: the GPU's, or the machine's RAM (default 16 GiB when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_describe() -> str | None:
    # ash_ext/bench/machine.py -> the repository root, when ash_ext runs from a checkout
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(root, ".git")) and not os.path.isfile(os.path.join(root, ".git")):
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


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """The machine, device and versions, as recorded in the results."""
    from .. import __version__

    device = torch.device(device)
    try:
        cpus_usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = None
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable,
        "memory_bytes": memory_bytes(torch.device("cpu")),
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
        "device_name": cpu_model(),
        "device_memory_bytes": memory_bytes(device),
        "last_level_cache_bytes": last_level_cache_bytes(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_multiprocessors"] = props.multi_processor_count
        info["cuda_driver"] = _cuda_driver()
    return info


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, rounded, or ``None`` where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None
