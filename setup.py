"""Builds plastic_ops._C: the op schema, the C++ CPU kernels and, when possible, the CUDA kernels.

Environment:
  PLASTIC_OPS_CPU_ONLY=1   build the CPU kernels only (a CppExtension).
  FORCE_CUDA=1             build the CUDA kernels even when no GPU is visible.
  TORCH_CUDA_ARCH_LIST     GPU architectures; default 9.0 (H100/H200) when no GPU is visible.
  CUDA_HOME                the CUDA toolkit; /usr/local/cuda when unset and present.
"""
import glob
import importlib.util
import os

# torch.utils.cpp_extension reads CUDA_HOME when imported: set it first. A wrapper
# script at /usr/local/bin/nvcc would otherwise make torch guess /usr/local.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ImportError as exc:  # pip's isolated build environment has no torch
    raise SystemExit("plastic_ops builds against the installed torch: install torch (>= 2.4) first, then "
                     "`pip install --no-build-isolation .`") from exc
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_ARCH_LIST = "9.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if _flag("PLASTIC_OPS_CPU_ONLY"):
        return False
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if _flag("FORCE_CUDA"):
        if not has_toolkit:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
        return True
    return has_toolkit


def cuda_library_headers() -> list:
    """Headers of the CUDA math libraries (cuBLAS, cuSPARSE) that ATen's CUDA headers include.

    A CUDA build of torch from pip brings them in the nvidia-* wheels; a minimal toolkit
    (nvcc and the runtime only) lacks them, so look there when CUDA_HOME has none.
    """
    if os.path.exists(os.path.join(CUDA_HOME or "", "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return found


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    link = ["-fopenmp"]
    if want_cuda():
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "plastic_ops._C", sources,
            include_dirs=cuda_library_headers(),
            define_macros=[("PLASTIC_OPS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link)
    return CppExtension("plastic_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="plastic_ops",
    version="0.1.0",
    description="Fused differentiable Hebbian plasticity (CPU and CUDA) for PyTorch",
    packages=find_packages(include=["plastic_ops", "plastic_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"experiments": ["torchvision", "tqdm", "matplotlib"],
                    "test": ["pytest", "pytest-benchmark"]},
)
