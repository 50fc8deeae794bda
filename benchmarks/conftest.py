"""pytest-benchmark suite of the plastic op: ``pytest benchmarks/`` (kept apart from tests/).

Small sizes, so the whole suite takes a couple of minutes on a laptop CPU. Options:
  --bench-device cpu|cuda   device of the benchmarks (default cpu)
  --bench-impls LIST        comma-separated among fused,eager,compile (default fused,eager)
Fused benchmarks are skipped, with the reason, when the compiled extension is not built.
Compare implementations with pytest-benchmark's grouping: each group is one case.
"""
from __future__ import annotations

import pytest
import torch

import plastic_ops
from benchmarks import _harness as H


def pytest_addoption(parser):
    group = parser.getgroup("plastic_ops benchmarks")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"),
                    help="device of the plastic_ops benchmarks (default cpu)")
    group.addoption("--bench-impls", default="fused,eager",
                    help="comma-separated implementations among fused,eager,compile (default fused,eager)")


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    device = request.config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: torch sees no CUDA device")
    return device


@pytest.fixture(scope="session")
def bench_impls(request) -> list:
    impls = [s.strip() for s in request.config.getoption("--bench-impls").split(",") if s.strip()]
    bad = [i for i in impls if i not in H.ALL_IMPLS]
    if bad:
        raise pytest.UsageError(f"--bench-impls: unknown {bad}; choose from {H.ALL_IMPLS}")
    return impls


@pytest.fixture
def impl_step(bench_device, bench_impls):
    """``impl_step(impl, case)`` -> a warmed-up step of that implementation on that case, or a skip."""
    def make(impl: str, case: H.Case):
        if impl not in bench_impls:
            pytest.skip(f"{impl} not selected (--bench-impls {','.join(bench_impls)})")
        if impl == "fused" and not plastic_ops.extension_available():
            pytest.skip("the compiled extension plastic_ops._C is not built, so there is no fused op to time")
        if impl == "compile":
            torch._dynamo.reset()  # one compiled graph per case, no recompilation limit
        case = H.Case(**dict(case.to_dict(), device=bench_device))
        step = H.make_step(case, H.op_function(impl, case.form), H.make_inputs(case))
        step()  # first call (compilation for compile) outside the timing
        return step
    return make
