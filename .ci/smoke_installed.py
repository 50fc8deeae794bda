"""Smoke test of an installed plastic_ops, run from outside the source tree (`make sdist-check`).

Checks that the installed copy (not a checkout) is imported, that its compiled extension loads
and reports what was built, that the library requires torch alone, and that the fused op matches
the reference, outputs and gradients, in float64.
"""
import importlib.metadata
import os
import sys

import torch

import plastic_ops
from plastic_ops import info, reference

source_tree = os.path.realpath(sys.argv[1]) if len(sys.argv) > 1 else None
where = os.path.realpath(plastic_ops.__file__)
print(info.format_report(info.collect()))
checkout_package = os.path.join(source_tree, "plastic_ops") if source_tree else None
assert os.path.dirname(where) != checkout_package, f"imported the source tree: {where}"
assert plastic_ops.extension_available(), "the installed compiled extension does not load"
runtime = [r for r in importlib.metadata.requires("plastic_ops") or [] if "extra ==" not in r]
assert [r.replace(" ", "") for r in runtime] == ["torch>=2.4"], f"runtime requirements: {runtime}"

torch.manual_seed(0)
T, B, N = 7, 3, 5
args = dict(u=torch.randn(T, B, N, dtype=torch.float64), w=0.3 * torch.randn(N, N, dtype=torch.float64),
            alpha=0.3 * torch.randn(N, N, dtype=torch.float64), eta=torch.tensor(0.1, dtype=torch.float64))
leaves = [a.requires_grad_() for a in args.values()]
results = []
for fn in (plastic_ops.plastic_rnn, reference.plastic_rnn):
    y, trace = fn(**args, rule="oja", clip=0.5)
    grads = torch.autograd.grad(y.sin().sum() + trace.pow(2).sum(), leaves)
    results.append((y, trace) + grads)
for got, want in zip(*results):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
print(f"smoke test passed: plastic_ops {plastic_ops.__version__} from {os.path.dirname(where)}, "
      f"torch {torch.__version__}")
