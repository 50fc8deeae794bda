"""PLASTIC_OPS_CUDA_KERNELS: the CUDA kernels have two paths, picked at each call (docs/cuda.md, "Two paths").

The variable's rules (plastic_ops.info.cuda_kernels) are checked on every build. The op itself is checked on
every device whose kernels are the CUDA code: "cuda" when a GPU is present, and "cpu" in a build that
registers the CUDA code for the CPU dispatch key (an emulated build). On a plain CPU build those tests are
skipped: the CPU kernel does not read the variable.
"""
import os
import re

import pytest
import torch

import plastic_ops
from plastic_ops import info, reference

from _inputs import grad_inputs, make_inputs


def devices_running_cuda_code():
    """Devices whose plastic_ops kernels were registered from csrc/cuda (the file name says so)."""
    try:
        dump = torch._C._dispatch_dump("plastic_ops::plastic_linear_forward")
    except Exception:
        return []
    found = []
    for key, where in re.findall(r"^(CPU|CUDA): registered at (\S+)", dump, flags=re.M):
        if "plastic_cuda" in os.path.basename(where) and (key == "CPU" or torch.cuda.is_available()):
            found.append(key.lower())
    return found


CUDA_CODE_DEVICES = devices_running_cuda_code()
needs_cuda_code = pytest.mark.skipif(not CUDA_CODE_DEVICES, reason="no device runs the CUDA kernels here")


@pytest.mark.parametrize("value, path", [(None, "v2"), ("", "v2"), ("v2", "v2"), ("v1", "v1")])
def test_values_and_default(monkeypatch, value, path):
    if value is None:
        monkeypatch.delenv(info.CUDA_KERNELS_VAR, raising=False)
    else:
        monkeypatch.setenv(info.CUDA_KERNELS_VAR, value)
    assert info.cuda_kernels() == path
    assert info.collect()["cuda_kernel_path"]["path"] == path
    assert f"CUDA kernel path: {path}" in info.format_report(info.collect())


@pytest.mark.parametrize("value", ["v3", "V2", "fused", " v1"])
def test_unknown_value_refused(monkeypatch, value):
    monkeypatch.setenv(info.CUDA_KERNELS_VAR, value)
    with pytest.raises(ValueError, match=info.CUDA_KERNELS_VAR):
        info.cuda_kernels()
    got = info.collect()["cuda_kernel_path"]  # the report says so rather than failing
    assert got["path"] is None and info.CUDA_KERNELS_VAR in got["error"]
    assert "CUDA kernel path: INVALID" in info.format_report(info.collect())


def _run(form, device, K, with_grad_hT):
    args, mod = make_inputs(form, 5, 3, 9, 11, modulation="per_output", device=device, seed=7)
    fn = plastic_ops.plastic_rnn if form == "rnn" else plastic_ops.plastic_linear
    y, h = fn(*args, rule="oja", activation="softmax", clip=0.4, modulation=mod, checkpoint_every=K)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)).sum()
    if with_grad_hT:
        loss = loss + (h * h).sum()
    grads = torch.autograd.grad(loss, grad_inputs(args, mod))
    return [t.detach().cpu() for t in (y, h, *grads)], (args, mod)


@needs_cuda_code
@pytest.mark.parametrize("device", CUDA_CODE_DEVICES)
def test_op_refuses_unknown_value(monkeypatch, device):
    monkeypatch.setenv(info.CUDA_KERNELS_VAR, "v3")
    args, _ = make_inputs("linear", 3, 2, 4, 5, device=device)
    with pytest.raises(ValueError, match=info.CUDA_KERNELS_VAR):
        plastic_ops.plastic_linear(*args)


@needs_cuda_code
@pytest.mark.parametrize("device", CUDA_CODE_DEVICES)
@pytest.mark.parametrize("form", ["linear", "rnn"])
@pytest.mark.parametrize("K, with_grad_hT", [(1, True), (2, False), (3, True)])
def test_both_paths_match_the_reference(monkeypatch, device, form, K, with_grad_hT):
    got = {}
    for path in ("v1", "v2"):
        monkeypatch.setenv(info.CUDA_KERNELS_VAR, path)
        got[path], (args, mod) = _run(form, device, K, with_grad_hT)
    monkeypatch.delenv(info.CUDA_KERNELS_VAR)
    default, _ = _run(form, device, K, with_grad_hT)
    for a, b in zip(default, got["v2"]):  # the default is the fused path, and it is deterministic
        assert torch.equal(a, b)
    # the reference, on the same inputs, through autograd
    fn = reference.plastic_rnn if form == "rnn" else reference.plastic_linear
    leaves = [None if a is None else a.detach().cpu().requires_grad_() for a in args]
    mod_l = mod.detach().cpu().requires_grad_()
    y, h = fn(*leaves, rule="oja", activation="softmax", clip=0.4, modulation=mod_l)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    if with_grad_hT:
        loss = loss + (h * h).sum()
    want = [y.detach(), h.detach(), *torch.autograd.grad(loss, grad_inputs(leaves, mod_l))]
    for path in ("v1", "v2"):
        for i, (a, b) in enumerate(zip(got[path], want)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{path}, tensor {i}: {m}")
