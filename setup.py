"""Builds ash_ext's compiled module, ash_ext._C, with torch.utils.cpp_extension.

The C++ CPU kernel is always built. The CUDA kernels are added when torch is a CUDA build and a
CUDA toolkit is found (no GPU is needed to build); ASH_EXT_NO_CUDA=1 turns them off.
TORCH_CUDA_ARCH_LIST is respected; unset, it defaults to sm_80, sm_86, sm_89 and sm_90.
Setting ASH_EXT_NO_EXTENSION=1 installs the pure-PyTorch package without any compiled module.
"""

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _locate_cuda_home() -> None:
    # torch guesses /usr/local when nvcc is not on PATH, and the link then fails on -lcudart.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _pip_cuda_include_dirs() -> list:
    # torch's CUDA headers include cuSPARSE/cuBLAS headers that only the pip CUDA packages carry.
    found = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        found += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(found))


def _extensions() -> list:
    if _flag("ASH_EXT_NO_EXTENSION"):
        return []
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    use_cuda = (
        not _flag("ASH_EXT_NO_CUDA")
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp it runs serially.
    # -ffp-contract=off: the CPU kernel's ISA builds must round alike, so a * b + c stays two
    # roundings where FMA is available (GCC contracts by default).
    # -Wno-psabi: the kernel passes 16-lane vectors between its inline functions, never across an ABI.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-Wno-psabi", "-fopenmp"]
    cxx_flags += os.environ.get("ASH_EXT_EXTRA_CXXFLAGS", "").split()
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not use_cuda:
        print("ash_ext: building the CPU kernel only", file=sys.stderr)
        return [
            CppExtension(
                "ash_ext._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"ash_ext: building the CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += _pip_cuda_include_dirs()
    return [
        CUDAExtension(
            "ash_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags + ["-DASH_EXT_WITH_CUDA"],
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DASH_EXT_WITH_CUDA"],
            },
        )
    ]


def _cmdclass() -> dict:
    if _flag("ASH_EXT_NO_EXTENSION"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="ash_ext",
    version="0.1.0",
    description="Fused ASH (activation shaping) for out-of-distribution detection: C++/CUDA kernels for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ash_ext", "ash_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "plot": ["matplotlib"],
        # ONNX export (ash_ext.onnx_translation_table) and running the exported models
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "ruff"],
    },
    entry_points={"console_scripts": ["ash-ext = ash_ext.__main__:main"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
