"""The CPU kernel's two builds of its row loops (baseline x86-64 and AVX2) give the same traces."""
import json

from _child import run_child

SNIPPET = """
import json, torch, plastic_ops
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)
T, B, n = 7, 3, 37  # n not a multiple of any SIMD width: remainders run too
out = {}
for rule, clip in (("hebb", None), ("oja", 0.2)):
    u, w, a, h = r(T, B, n), (0.3 * r(n, n)).requires_grad_(), (0.3 * r(n, n)).requires_grad_(), 0.2 * r(B, n, n)
    eta = torch.tensor(0.2, requires_grad=True)
    y, hT = plastic_ops.plastic_rnn(u, w, a, eta, h, rule=rule, clip=clip, checkpoint_every=3)
    (y.square().sum() + hT.square().sum()).backward()
    out[rule] = {"y": y.tolist(), "hT": hT.tolist(), "gw": w.grad.tolist(), "ga": a.grad.tolist()}
print(json.dumps(out))
"""


def test_baseline_and_avx2_row_loops_agree(monkeypatch):
    monkeypatch.delenv("PLASTIC_OPS_NO_AVX2", raising=False)
    default = json.loads(run_child(SNIPPET).strip().splitlines()[-1])
    monkeypatch.setenv("PLASTIC_OPS_NO_AVX2", "1")
    baseline = json.loads(run_child(SNIPPET).strip().splitlines()[-1])
    for rule in default:
        # the trace and y go through the same IEEE operations lane by lane: the same bits
        assert default[rule]["y"] == baseline[rule]["y"], rule
        assert default[rule]["hT"] == baseline[rule]["hT"], rule
        # gradients sum in another order with another SIMD width: close, not equal
        for key in ("gw", "ga"):
            a = [v for row in default[rule][key] for v in row]
            b = [v for row in baseline[rule][key] for v in row]
            assert max(abs(x - z) / (1 + abs(z)) for x, z in zip(a, b)) < 1e-4, (rule, key)
