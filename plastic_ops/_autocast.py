"""torch.autocast for the plastic op: it is cast like a matmul (docs/op_spec.md, "Dtypes").

Under an enabled autocast region of the inputs' device, the floating inputs other than float64
are cast to the region's dtype (bfloat16 on the CPU, float16 on CUDA by default), as autocast
does for torch.mm, and the op runs with autocast disabled. The trace keeps its own dtype: it is
state carried between calls, stored in float32 unless trace_dtype asks for bfloat16. This is done
here, in Python, because torch.library.register_autocast does not exist in torch 2.4.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


def region_dtype(x) -> Optional[torch.dtype]:
    """The dtype of the autocast region enabled for x's device type, or None."""
    if not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4: one API for every device type
        try:
            return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        except RuntimeError:  # a device type autocast does not know
            return None
        except TypeError:  # no device_type argument: the per-device functions below
            pass
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def cast(dtype: torch.dtype, *tensors):
    """The tensors autocast would cast for a matmul (floating, not float64) cast to dtype; the rest as they are."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def disabled(x: torch.Tensor):
    """A context in which autocast is off for x's device type."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
