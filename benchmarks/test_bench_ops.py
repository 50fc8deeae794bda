"""Time forward and forward+backward of plastic_linear and plastic_rnn, fused vs eager reference.

Groups (one per case) put the implementations side by side in pytest-benchmark's report, e.g.

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Nothing here asserts on a time; the numbers are reported only.
"""
from __future__ import annotations

import pytest

from benchmarks import _harness as H

# (N, B, T): small enough for the suite to finish in a couple of minutes on a 2-core CPU.
SIZES = [(64, 1, 10), (64, 8, 10), (256, 8, 20)]


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("n,batch,steps", SIZES, ids=[f"N{n}-B{b}-T{t}" for n, b, t in SIZES])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_plastic_op(benchmark, impl_step, form, mode, n, batch, steps, impl):
    case = H.Case(form=form, n=n, batch=batch, steps=steps, mode=mode)
    step = impl_step(impl, case)
    benchmark.group = f"{form} {mode} N={n} B={batch} T={steps}"
    benchmark.extra_info.update(case.to_dict(), impl=impl)
    benchmark(step)


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("rule,activation", [("oja", "tanh"), ("hebb", "softmax"), ("hebb", "relu")])
def test_plastic_rnn_rules(benchmark, impl_step, rule, activation, impl):
    case = H.Case(form="rnn", n=128, batch=8, steps=10, rule=rule, activation=activation, mode="fwdbwd")
    step = impl_step(impl, case)
    benchmark.group = f"rnn fwdbwd N=128 B=8 T=10 {rule}/{activation}"
    benchmark.extra_info.update(case.to_dict(), impl=impl)
    benchmark(step)
