"""What was built and what is running: `python -m plastic_ops.info`, or plastic_ops.info.collect().

Reports the package version; whether the compiled extension loads and, if not, why; whether its
CUDA kernels were built and for which GPU architectures, and which of their two paths a call takes;
the torch and CUDA versions it was built against and those running; and which kernels each op has
registered per dispatch key.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from . import __version__, _extension

# Dispatch keys worth reporting: the device kernels, the fake kernel (Meta, used by torch.compile)
# and the autograd formula.
DISPATCH_KEYS = ("CPU", "CUDA", "Meta", "Autograd")

#: Picks the CUDA kernels at each call (docs/cuda.md, "Two paths"): unset or "v2", the fused kernels;
#: "v1", the previous ones. The compiled op reads it itself and refuses any other value.
CUDA_KERNELS_VAR = "PLASTIC_OPS_CUDA_KERNELS"
CUDA_KERNEL_PATHS = {"v2": "the fused kernels (default)", "v1": "the previous kernels"}


def cuda_kernels() -> str:
    """The CUDA kernel path a call takes now: "v2" or "v1", from PLASTIC_OPS_CUDA_KERNELS.

    Raises ValueError, naming the variable, for a value the compiled op would refuse.
    """
    value = os.environ.get(CUDA_KERNELS_VAR, "")
    if value in ("", "v2"):
        return "v2"
    if value == "v1":
        return "v1"
    raise ValueError(f"{CUDA_KERNELS_VAR} must be 'v2' (the fused kernels, the default) or 'v1' "
                     f"(the previous kernels), got {value!r}")


def _architectures(flags: list) -> list:
    """nvcc -gencode flags -> ["sm_80", ..., "compute_90 (PTX)"]."""
    out = []
    for flag in flags:
        m = re.search(r",code=\[?([\w,]+)\]?", flag)
        for code in (m.group(1).split(",") if m else []):
            out.append(f"{code} (PTX)" if code.startswith("compute_") else code)
    return sorted(out, key=lambda a: (a.endswith("(PTX)"), a))


def _runs_on(capability: tuple, archs: list) -> str:
    """How a GPU of this compute capability gets machine code from the built architectures."""
    major, minor = capability
    cubins = []  # a cubin runs on GPUs of its major version and an equal or higher minor one
    for a in archs:
        m = re.fullmatch(r"sm_(\d+?)(\d)a?", a)
        if m and int(m.group(1)) == major and int(m.group(2)) <= minor:
            cubins.append((int(m.group(2)), a))
    if cubins:
        return f"yes ({max(cubins)[1]} code)"
    for a in archs:  # PTX is compiled at load time for any GPU at least as new
        m = re.fullmatch(r"compute_(\d+?)(\d)a? \(PTX\)", a)
        if m and (int(m.group(1)), int(m.group(2))) <= capability:
            return f"yes (PTX compute_{m.group(1)}{m.group(2)}, compiled at load time)"
    return f"no kernel for sm_{major}{minor}: rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"


def registered_kernels() -> dict:
    """{op name: [dispatch keys with a kernel]} for every plastic_ops op known to torch."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("plastic_ops::"))
    return {n: [k for k in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(n, k)] for n in names}


def collect() -> dict:
    """Everything `python -m plastic_ops.info` prints, as a dict."""
    import plastic_ops  # noqa: F401  (loads the extension, registering the ops)

    built = _extension.build_info()
    err = _extension.error()
    archs = _architectures(built.get("nvcc_arch_flags", [])) if built else []
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}",
                         "runs": _runs_on(cap, archs) if built and built.get("with_cuda") else "no CUDA kernels built"})
    return {
        "version": __version__,
        "package": str(_extension.PACKAGE_DIR),
        "extension_loaded": err is None,
        "extension_error": None if err is None else str(err),
        "built": built,
        "cuda_kernels_built": None if built is None else bool(built.get("with_cuda")),
        "cuda_architectures": archs,
        "running": {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "cuda_available": torch.cuda.is_available(), "gpus": gpus},
        "kernels": registered_kernels(),
        "cuda_kernel_path": _cuda_kernel_path(),
        # an unbuilt checkout imported from its own root hides an installed copy: say what that one holds
        "shadowed_copies": [] if err is None else [_copy_info(path) for path in _extension._installed_copies()],
    }


def _copy_info(path: str) -> dict:
    try:
        built = json.loads((Path(path) / "_build_info.json").read_text())
    except (OSError, ValueError):
        built = None
    return {"path": path, "built": built}


def _describe_build(built: dict) -> str:
    cuda = (f"CUDA kernels for {built.get('cuda_arch_list') or 'the default architectures'} (CUDA "
            f"{built.get('cuda_toolkit')} toolkit)" if built.get("with_cuda")
            else f"no CUDA kernels ({built.get('no_cuda_reason')})")
    return f"built against torch {built.get('torch')}, Python {built.get('python')}: CPU kernels and {cuda}"


def _cuda_kernel_path() -> dict:
    value = os.environ.get(CUDA_KERNELS_VAR)
    try:
        return {"path": cuda_kernels(), "variable": value, "error": None}
    except ValueError as exc:
        return {"path": None, "variable": value, "error": str(exc)}


def format_report(info: dict) -> str:
    built = info["built"]
    running = info["running"]
    lines = [f"plastic_ops {info['version']} ({info['package']})"]
    if info["extension_loaded"]:
        lines.append("compiled extension: loaded")
    else:
        lines.append(f"compiled extension: NOT AVAILABLE: {info['extension_error']}")
        lines.append(f"  {_extension.BUILD_HINT}.")
    for copy in info.get("shadowed_copies", []):
        what = _describe_build(copy["built"]) if copy["built"] else "build unknown (no _build_info.json)"
        lines.append(f"installed copy, hidden by this folder: {copy['path']}: {what}. Run from another folder "
                     f"(e.g. `cd /tmp && python -m plastic_ops.info`) to use it, or build this checkout in place.")
    if built is None:
        lines.append("build: unknown (no _build_info.json beside the compiled module)")
    else:
        lines.append(f"built against: torch {built.get('torch')}, CUDA {built.get('torch_cuda') or 'none'} "
                     f"(torch's), Python {built.get('python')}")
        if built.get("with_cuda"):
            lines.append(f"CUDA kernels: built with the CUDA {built.get('cuda_toolkit')} toolkit for "
                         f"{', '.join(info['cuda_architectures']) or built.get('cuda_arch_list')}")
        else:
            lines.append(f"CUDA kernels: not built ({built.get('no_cuda_reason')})")
    path = info.get("cuda_kernel_path")
    if path is not None:
        how = f"{CUDA_KERNELS_VAR}={path['variable']}" if path["variable"] is not None else f"{CUDA_KERNELS_VAR} unset"
        if path["path"] is None:
            lines.append(f"CUDA kernel path: INVALID ({path['error']})")
        else:
            lines.append(f"CUDA kernel path: {path['path']}, {CUDA_KERNEL_PATHS[path['path']]} ({how})")
    lines.append(f"running with: torch {running['torch']}, CUDA {running['torch_cuda'] or 'none'} (torch's), "
                 f"GPU {'available' if running['cuda_available'] else 'not available'}")
    for i, gpu in enumerate(running["gpus"]):
        lines.append(f"  cuda:{i} {gpu['name']} (compute capability {gpu['capability']}): {gpu['runs']}")
    lines.append("registered kernels:")
    if not info["kernels"]:
        lines.append("  none (the compiled extension is not loaded)")
    for name, keys in info["kernels"].items():
        lines.append(f"  {name}: {', '.join(keys) or '-'}")
    return "\n".join(lines)


def main() -> None:
    print(format_report(collect()))


if __name__ == "__main__":
    main()
