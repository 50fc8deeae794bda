#!/usr/bin/env bash
# The GPU check of plastic_ops, in one script: build the extension in place with the CUDA
# kernels, then a CUDA-vs-reference smoke check, the tests on CUDA and the GPU benchmarks.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# Everything goes under $OUT (default results/gpu_check). Each step has a time cap and the
# whole run stays inside TOTAL_BUDGET seconds (default 540); a failing step does not stop the
# ones after it. The last lines printed are a table of every step's exit status.
#
# Environment:
#   OUT=dir           where the logs go (default results/gpu_check)
#   TOTAL_BUDGET=s    wall-clock budget of the whole script (default 540)
#   DRY_RUN=1         skip the build (check the script itself on a machine without a GPU)
#   PYTHON=python3    the interpreter (torch with CUDA, pytest, ninja)
set -u

OUT="${OUT:-results/gpu_check}"
TOTAL_BUDGET="${TOTAL_BUDGET:-540}"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts under $OUT import the in-place build
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if [ ! -f setup.py ] || [ ! -d plastic_ops ]; then
  echo "gpu_check: run this from the repository root" >&2
  exit 2
fi

# run_step NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND with stdout+stderr to LOGFILE
# (and the tail to the console) under min(CAP, time left); records rc and seconds.
run_step() {
  local name="$1" cap="$2" log="$3"
  shift 3
  local now left limit t0 rc dt
  now=$(date +%s)
  left=$((TOTAL_BUDGET - (now - START) - 15))
  if [ "$left" -lt 20 ]; then
    printf '%-14s %6s %6s  %s\n' "$name" "skip" "0" "out of time budget" >> "$SUMMARY"
    echo "== $name: skipped (out of time budget)"
    return 0
  fi
  limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s) -> $log"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  tail -n 15 "$log"
  local note="$(basename "$log")"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="$note (timed out)"
  printf '%-14s %6s %6s  %s\n' "$name" "$rc" "$dt" "$note" >> "$SUMMARY"
  return 0
}

skip_step() {
  printf '%-14s %6s %6s  %s\n' "$1" "skip" "0" "$2" >> "$SUMMARY"
  echo "== $1: skipped ($2)"
}

# ---- 1. the machine and the versions -------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "nproc: $(nproc)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  (command -v nvcc >/dev/null && nvcc --version) || { [ -x /usr/local/cuda/bin/nvcc ] && /usr/local/cuda/bin/nvcc --version; } \
    || echo "nvcc: not found"
  gcc --version 2>&1 | head -n 1
  "$PYTHON" - <<'EOF'
import sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "capability %d.%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
              "memory %.1f GiB" % (p.total_memory / 2**30))
except Exception as exc:  # report, keep going
    print("torch: not importable:", exc)
for mod in ("pytest", "ninja", "numpy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception:
        print(mod, "missing")
EOF
} 2>&1 | tee "$OUT/env.txt"

ARCH="$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(0); print(f"{m}.{n}")' 2>/dev/null)"
ARCH="${ARCH:-9.0}"
echo "TORCH_CUDA_ARCH_LIST=$ARCH" | tee -a "$OUT/env.txt"

# ---- 2. build the extension in place (CPU and CUDA kernels) --------------------------------
if [ "$DRY_RUN" = "1" ]; then
  skip_step build "DRY_RUN=1"
else
  run_step build 330 "$OUT/build.log" env MAX_JOBS=16 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
    "$PYTHON" setup.py build_ext --inplace
  ls -la plastic_ops/_C*.so >> "$OUT/build.log" 2>&1
fi

# ---- 3. a direct CUDA-vs-reference check: every rule, activation, clip, both forms --------
cat > "$OUT/smoke.py" <<'EOF'
import itertools, sys
import torch
import plastic_ops
from plastic_ops import reference

assert torch.cuda.is_available(), "no CUDA device"
torch.manual_seed(0)
failures = 0
def run(fn, args, kw, dev, dt):
    ts = [a.to(dev, dt).detach().requires_grad_(True) for a in args]
    y, h = fn(*ts, **kw)
    gen = torch.Generator().manual_seed(1)  # the same upstream gradients for the op and the reference
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dev, dt)
    gh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(dev, dt)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), ts)
    return [t.detach().cpu() for t in (y, h, *grads)]
for form, rule, act, clip, dt in itertools.product(("linear", "rnn"), ("hebb", "oja"),
        ("tanh", "sigmoid", "relu", "identity", "softmax"), (None, 0.2), (torch.float64, torch.float32)):
    T, B, n_in, n_out = 7, 3, 45, 150
    if form == "rnn":
        n_in = n_out = 70
        args = [torch.randn(T, B, n_out) * 0.5, torch.randn(n_in, n_out) * 0.5 / n_in ** 0.5,
                torch.randn(n_in, n_out) * 0.3, torch.tensor(0.1), torch.randn(B, n_in, n_out) * 0.2,
                torch.randn(B, n_out) * 0.5]
        names = ["u", "w", "alpha", "eta", "trace", "y0"]
        f_op, f_ref = plastic_ops.plastic_rnn, reference.plastic_rnn
    else:
        args = [torch.randn(T, B, n_in) * 0.5, torch.randn(n_in, n_out) / n_in ** 0.5,
                torch.randn(n_in, n_out) * 0.3, torch.tensor(0.1), torch.randn(B, n_in, n_out) * 0.2,
                torch.randn(n_out) * 0.1]
        names = ["x", "w", "alpha", "eta", "trace", "bias"]
        f_op, f_ref = plastic_ops.plastic_linear, reference.plastic_linear
    kw = dict(rule=rule, activation=act, clip=clip, checkpoint_every=3)
    try:
        got = run(f_op, args, kw, "cuda", dt)
        ref = run(f_ref, args, kw, "cpu", torch.float64)
        tol = 1e-9 if dt == torch.float64 else 2e-4
        errs = {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
                for n, a, b in zip(["y", "trace_T"] + ["d" + n for n in names], got, ref)}
        worst = max(errs.values())
        ok = worst <= tol
    except Exception as exc:  # report and go on
        ok, worst, errs = False, float("nan"), repr(exc)
    failures += not ok
    print(("ok  " if ok else "FAIL"), form, rule, act, "clip=%s" % clip, str(dt).replace("torch.", ""),
          "worst rel err %.2e" % worst, "" if ok else errs, flush=True)
print("smoke:", "all ok" if failures == 0 else "%d failed" % failures)
sys.exit(1 if failures else 0)
EOF
run_step smoke 120 "$OUT/smoke.log" "$PYTHON" "$OUT/smoke.py"

# ---- 4. the CUDA tests, the headline benchmark, the whole suite, the quick benchmark ---------
# (in this order so that a short budget cuts the least informative steps)
run_step tests_cuda 150 "$OUT/tests_cuda.log" "$PYTHON" -m pytest tests -q -rfE -k cuda
run_step bench 200 "$OUT/bench.log" "$PYTHON" -m benchmarks.compare --device cuda --headline --out "$OUT/bench"
run_step tests 200 "$OUT/tests.log" "$PYTHON" -m pytest tests -x -q -rfE
run_step bench_quick 120 "$OUT/bench_quick.log" "$PYTHON" -m benchmarks.compare --device cuda --quick \
  --out "$OUT/bench_quick"

# ---- summary --------------------------------------------------------------------------------
echo
echo "pytest -k cuda: $(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/tests_cuda.log" 2>/dev/null | tail -n 1)"
echo "pytest (all):   $(grep -E '(passed|failed|error|skipped)' "$OUT/tests.log" 2>/dev/null | tail -n 1)"
echo "total: $(($(date +%s) - START))s, logs in $OUT"
printf '%-14s %6s %6s  %s\n' "step" "rc" "sec" "log"
cat "$SUMMARY"
