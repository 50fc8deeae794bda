"""Builds plastic_ops._C: the op schema, the C++ CPU kernels and, when possible, the CUDA kernels.

Metadata lives in pyproject.toml. Environment:
  PLASTIC_OPS_CPU_ONLY=1   build the CPU kernels only (a CppExtension).
  FORCE_CUDA=1             build the CUDA kernels even when no GPU is visible; a missing or
                           mismatched CUDA toolkit is then an error instead of a CPU-only build.
  TORCH_CUDA_ARCH_LIST     GPU architectures. Unset: the visible GPUs' own, else DEFAULT_ARCH_LIST.
  CUDA_HOME                the CUDA toolkit; /usr/local/cuda when unset and present.

Every build writes plastic_ops/_build_info.json beside the compiled module: what was built and
against which torch (read by `python -m plastic_ops.info` and by the import-time checks).
"""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

# torch.utils.cpp_extension reads CUDA_HOME when imported: set it first. A wrapper
# script at /usr/local/bin/nvcc would otherwise make torch guess /usr/local.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ImportError as exc:  # pip's isolated build environment has no torch
    raise SystemExit("plastic_ops builds against the installed torch: install torch (>= 2.4) first, then "
                     "`pip install --no-build-isolation .`") from exc
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# Builds without a visible GPU: A100 (8.0), RTX 30xx / A10 / A40 (8.6), L4 / L40 / RTX 40xx (8.9),
# H100 / H200 (9.0), and PTX for 9.0 so that newer cards compile the kernels at load time.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
INFO_FILE = "_build_info.json"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _version_tuple(text):
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def toolkit_version():
    """The CUDA toolkit's version from `nvcc --version` ("13.0"), or None when there is no working nvcc."""
    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan():
    """(build the CUDA kernels?, why not, toolkit version).

    A toolkit matches torch when it has torch's CUDA major version and is not older: nvcc must
    compile the headers of the CUDA libraries torch was built with, and the kernels run on torch's
    CUDA runtime. Anything else gives a CPU-only build, or an error under FORCE_CUDA=1.
    """
    if _flag("PLASTIC_OPS_CPU_ONLY"):
        return False, "PLASTIC_OPS_CPU_ONLY=1", None
    toolkit = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        problem = "no CUDA toolkit was found (set CUDA_HOME)"
    else:
        toolkit = toolkit_version()
        want, have = _version_tuple(torch.version.cuda), _version_tuple(toolkit)
        if have is None:
            problem = f"no working nvcc in CUDA_HOME={CUDA_HOME}"
        elif have[0] != want[0] or have[1] < want[1]:
            problem = (f"the CUDA toolkit in {CUDA_HOME} is {toolkit}, but torch {torch.__version__} was built "
                       f"with CUDA {torch.version.cuda}: install a {want[0]}.x toolkit not older than "
                       f"{torch.version.cuda} and point CUDA_HOME at it")
        else:
            problem = None
    if problem is None:
        return True, None, toolkit
    if _flag("FORCE_CUDA"):
        raise SystemExit(f"plastic_ops: FORCE_CUDA=1 but the CUDA kernels cannot be built: {problem}.")
    return False, problem, toolkit


BUILD_CUDA, NO_CUDA_REASON, TOOLKIT = cuda_plan()


def set_default_arch_list():
    """TORCH_CUDA_ARCH_LIST wins; else torch compiles for the visible GPUs; without one, DEFAULT_ARCH_LIST."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def cuda_include_dirs():
    """The compiling toolkit's headers first, then the CUDA math libraries' that ATen's headers need.

    A CUDA build of torch from pip brings cuBLAS/cuSPARSE headers in the nvidia-* wheels, next to
    that CUDA version's runtime headers; a minimal toolkit (nvcc and the runtime only) lacks them.
    The toolkit's own include folder goes first so that nvcc never picks another version's runtime.
    """
    own = os.path.join(CUDA_HOME, "include")
    if os.path.exists(os.path.join(own, "cusparse.h")):
        return [own]
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return [own] + found


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    link = ["-fopenmp"]
    if BUILD_CUDA:
        set_default_arch_list()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "plastic_ops._C", sources,
            include_dirs=cuda_include_dirs(),
            define_macros=[("PLASTIC_OPS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link)
    return CppExtension("plastic_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


def build_info():
    """What this build compiles and against what: written beside the compiled module."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
        "python": "%d.%d" % sys.version_info[:2],
        "with_cuda": BUILD_CUDA,
        "no_cuda_reason": NO_CUDA_REASON,
        "cuda_toolkit": TOOLKIT,
        "cuda_arch_list": None,
        "nvcc_arch_flags": [],
    }
    if BUILD_CUDA:
        from torch.utils import cpp_extension
        info["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        try:  # the -gencode flags torch passes to nvcc: exactly which machine code the module holds
            info["nvcc_arch_flags"] = cpp_extension._get_cuda_arch_flags()
        except Exception:  # a private helper: fine to miss in some torch version
            pass
    return info


class BuildWithInfo(BuildExtension):
    """torch's BuildExtension, which also writes the build info, and rebuilds when it changed.

    Without ninja, setuptools skips a module that is newer than its sources, even one built for
    another torch or without the CUDA kernels; a changed build info forces the rebuild.
    """

    def run(self):
        if NO_CUDA_REASON and not _flag("PLASTIC_OPS_CPU_ONLY"):  # once per build, not per setup.py call
            print(f"WARNING: plastic_ops: building the CPU kernels only: {NO_CUDA_REASON}.", file=sys.stderr)
        super().run()

    def build_extension(self, ext):
        target = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), INFO_FILE)
        info = build_info()
        try:
            with open(target) as f:
                changed = json.load(f) != info
        except (OSError, ValueError):
            changed = True
        if changed:
            self.force = True
        super().build_extension(ext)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)

    def copy_extensions_to_source(self):  # --inplace and editable installs: the info goes along
        super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("plastic_ops")
        self.copy_file(os.path.join(self.build_lib, "plastic_ops", INFO_FILE), os.path.join(package_dir, INFO_FILE),
                       level=self.verbose)


setup(
    license="MIT",  # here rather than in pyproject.toml: setuptools < 77 and >= 77 want different forms there
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithInfo},
)
