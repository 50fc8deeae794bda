"""Process-wide state that a test could change and that every later test would inherit."""
import torch

from plastic_ops import ops


def _flushes_denormals() -> bool:
    # torch has no getter for set_flush_denormal: a subnormal that survives a multiply says it is off
    return float(torch.tensor([5e-324], dtype=torch.float64).mul(1.0)[0]) == 0.0


def _dynamo_config() -> dict:
    config = torch._dynamo.config
    names = ("cache_size_limit", "suppress_errors", "capture_scalar_outputs", "capture_dynamic_output_shape_ops",
             "assume_static_by_default", "automatic_dynamic_shapes")
    return {name: getattr(config, name) for name in names if hasattr(config, name)}


def snapshot_global_state() -> dict:
    return {
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "anomaly_enabled": torch.is_anomaly_enabled(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "flush_denormal": _flushes_denormals(),
        "dynamo_config": _dynamo_config(),
        "keep_traces_bytes": (ops._LIMIT_OVERRIDE, ops._LIMIT_ERROR),
    }


def restore_global_state(state: dict) -> None:
    torch.set_default_dtype(state["default_dtype"])
    torch.set_num_threads(state["num_threads"])
    torch.set_grad_enabled(state["grad_enabled"])
    torch.autograd.set_detect_anomaly(state["anomaly_enabled"])
    torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    torch.set_flush_denormal(state["flush_denormal"])
    for name, value in state["dynamo_config"].items():
        setattr(torch._dynamo.config, name, value)
    ops._LIMIT_OVERRIDE, ops._LIMIT_ERROR = state["keep_traces_bytes"]
