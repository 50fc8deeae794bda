#!/usr/bin/env bash
# The GPU check of plastic_ops, fitted to a GPU machine lent for minutes: one call of about 6 minutes,
# build included, that leaves at most 8 files in $OUT.
#
#   OUT=results/gpu_check bash benchmarks/gpu_check.sh              # repository root, machine with a GPU
#   OUT=/tmp/gc bash benchmarks/gpu_check.sh --dry-run --skip-build  # any machine: tiny CPU forms of the steps
#
# Steps, most valuable first; a step gets min(its cap, the time left of TOTAL_BUDGET) and is skipped when
# too little is left; a failing step does not stop the others:
#   env          machine and versions, and the checkpoint interval the memory policy picks on the GPU
#   build        setup.py build_ext --inplace with the CUDA kernels, then a check that they are registered
#   reference    the fused op on CUDA against plastic_ops.reference over every option, float64 and float32,
#                on both CUDA kernel paths (PLASTIC_OPS_CUDA_KERNELS=v1 and v2; benchmarks/cuda_vs_reference.py):
#                number of mismatches and the worst error, per path
#   paths        forward+backward at N=1000, T=106, B=1, 8, 32, 128 on both kernel paths, side by side, with the
#                speed-up of v2 over v1, and each path replayed from a CUDA graph (cuda_vs_reference.py --only
#                timing --graphs)
#   memcheck     compute-sanitizer memcheck, then racecheck, on two small cases (skipped with a note when
#   racecheck    compute-sanitizer is absent or cannot attach to the GPU)
#   tests        the op tests on CUDA (-k cuda; the default path v2, and both paths against the reference), no -x;
#                zero passed tests is a failure
#   bench        the headline benchmark: fused and eager at N=1001, T=106, B=1 and 32, fused alone at
#                B=128, forward trace bandwidth against a device copy (benchmarks.compare --headline)
#   exp_*        one short run of each experiment on CUDA
# Each step runs under `timeout` in a process group of its own, with a token in its environment; after the
# step every process still carrying the token is killed (benchmark children detach from the step's
# process group), so nothing is left on the GPU once a step's time is up.
#
# Steps write into a scratch folder; after every step benchmarks/gpu_check_report.py packs it into $OUT:
# summary.txt, summary.json, headline.json, headline.csv, headline.md and logs.tar.gz (every log). A run
# stopped from outside still leaves the last packed state. The console summary is printed last; the exit
# status is 0 when every step that ran passed, 1 otherwise, 130 when stopped by a signal.
#
# Options and environment:
#   --dry-run, GPU_CHECK_DRY_RUN=1      every step in a tiny CPU form; GPU-only steps skipped, with the reason
#   --skip-build, GPU_CHECK_SKIP_BUILD=1  use the extension already built in place
#   OUT=dir                  where the packed files go (default results/gpu_check)
#   TOTAL_BUDGET=s           wall-clock budget of the whole check (default 360)
#   GPU_CHECK_STEPS=a,b      run only these steps (e.g. build,reference,tests to rerun after a fix)
#   GPU_CHECK_CAP=s          at most this many seconds for any step (default: each step's own cap)
#   GPU_CHECK_PYTEST_K=expr  -k of the tests step (default "cuda"; dry run "cpu and float32")
#   GPU_CHECK_DRY_BENCH_ARGS="..."  extra arguments of the dry run's benchmark (the last of a repeated one wins)
#   GPU_CHECK_WORK=dir       scratch folder, kept (default: a new one under ${TMPDIR:-/tmp}, removed)
#   PYTHON=python3           the interpreter (torch with CUDA, pytest, ninja)
set -u

DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
SKIP_BUILD="${GPU_CHECK_SKIP_BUILD:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ ! -f setup.py ] || [ ! -d plastic_ops ] || [ ! -f benchmarks/gpu_check_report.py ]; then
  echo "gpu_check: run this from the repository root" >&2
  exit 2
fi

PYTHON="${PYTHON:-python3}"
TOTAL_BUDGET="${TOTAL_BUDGET:-360}"
STEPS="${GPU_CHECK_STEPS:-}"
RESERVE=8     # seconds kept for the last packing and the summary
MIN_STEP=15   # a step that would get less is skipped
START=$(date +%s)
OUT="${OUT:-results/gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK="$GPU_CHECK_WORK"; KEEP_WORK=1
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; KEEP_WORK=0
fi
mkdir -p "$WORK/logs" && WORK="$(cd "$WORK" && pwd)"
: > "$WORK/steps.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, from any working directory
export PYTHONUNBUFFERED=1

if [ "$DRY_RUN" = "1" ]; then
  DEV=cpu
  PYTEST_K="${GPU_CHECK_PYTEST_K:-cpu and float32}"
else
  DEV=cuda
  PYTEST_K="${GPU_CHECK_PYTEST_K:-cuda}"
fi
SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
export SANITIZER

# ---- bookkeeping -------------------------------------------------------------------------------
record() {  # name kind state rc seconds cap artifact note -> one line of steps.tsv
  local IFS=$'\t'
  echo "$*" | tr -d '\n' >> "$WORK/steps.tsv"
  echo >> "$WORK/steps.tsv"
}

pack() {  # the packed files in $OUT, from what the steps wrote so far
  "$PYTHON" benchmarks/gpu_check_report.py pack --work "$WORK" --out "$OUT" --budget "$TOTAL_BUDGET" \
    --started "$START" $([ "$DRY_RUN" = "1" ] && echo --dry-run) "$@"
}

kill_leftovers() {  # kills every process whose environment carries token $1; prints how many
  local n=0 f pid
  for f in $(grep -lsa "GPU_CHECK_TOKEN=$1" /proc/[0-9]*/environ 2>/dev/null); do
    pid="${f#/proc/}"; pid="${pid%/environ}"
    [ "$pid" = "$$" ] && continue
    kill -KILL "$pid" 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}

wanted() { [ -z "$STEPS" ] || [[ ",$STEPS," == *",$1,"* ]]; }

skip_step() {  # name kind reason
  record "$1" "$2" skip - 0 - - "$3"
  echo "== $1: skipped ($3)"
}

CUR_TOKEN=""
CUR_STEP=""
CUR_STEP_INFO=""  # kind, start time, cap and artifact of the running step, for on_signal
# run_step NAME KIND CAP ARTIFACT COMMAND...: COMMAND's output goes to logs/NAME.log; KIND tells the
# report how to judge it (plain, pytest, reference, sanitizer, bench); ARTIFACT is its result file in WORK.
run_step() {
  local name="$1" kind="$2" cap="$3" artifact="$4"
  shift 4
  if ! wanted "$name"; then
    skip_step "$name" "$kind" "not in GPU_CHECK_STEPS"
    return 0
  fi
  local left limit t0 rc dt killed note=""
  left=$((TOTAL_BUDGET - ($(date +%s) - START) - RESERVE))
  if [ "$left" -lt "$MIN_STEP" ]; then
    skip_step "$name" "$kind" "out of time: ${left} s left of the ${TOTAL_BUDGET} s budget"
    pack > /dev/null 2>> "$WORK/logs/pack.log"
    return 0
  fi
  limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  [ -n "${GPU_CHECK_CAP:-}" ] && [ "$GPU_CHECK_CAP" -lt "$limit" ] && limit=$GPU_CHECK_CAP
  echo "== $name (cap ${limit} s)"
  CUR_TOKEN="$$-$name-$RANDOM$RANDOM"
  CUR_STEP="$name"
  t0=$(date +%s)
  CUR_STEP_INFO="$kind $t0 $limit $artifact"
  # In the background with `wait`, so that a signal to this script is handled at once (trap below).
  env GPU_CHECK_TOKEN="$CUR_TOKEN" timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 &
  wait $!
  rc=$?
  dt=$(($(date +%s) - t0))
  killed=$(kill_leftovers "$CUR_TOKEN")
  [ "$killed" -gt 0 ] && note="killed $killed processes left over after the step"
  if [ "$DEV" = cuda ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$WORK/logs/$name.gpu_after.txt" 2>&1
  fi
  CUR_TOKEN=""
  CUR_STEP=""
  record "$name" "$kind" ran "$rc" "$dt" "$limit" "$artifact" "$note"
  echo "   exit status $rc after $dt s${note:+; $note}"
  if [ "$rc" -ne 0 ]; then tail -n 5 "$WORK/logs/$name.log" | sed 's/^/   | /'; fi
  pack > /dev/null 2>> "$WORK/logs/pack.log"
  return 0
}

on_signal() {
  trap - INT TERM
  echo "gpu_check: stopped by a signal${CUR_STEP:+ during $CUR_STEP}"
  if [ -n "$CUR_TOKEN" ]; then
    kill_leftovers "$CUR_TOKEN" > /dev/null
    local kind t0 limit artifact
    read -r kind t0 limit artifact <<< "$CUR_STEP_INFO"
    record "$CUR_STEP" "$kind" ran 130 "$(($(date +%s) - t0))" "$limit" "$artifact" "stopped by a signal"
  fi
  pack --print
  exit 130
}
trap on_signal INT TERM

# ---- the steps, most valuable first -------------------------------------------------------------
if [ "$DRY_RUN" = "1" ]; then
  echo "gpu_check: DRY RUN on the CPU (nothing here exercises the CUDA kernels); scratch $WORK"
else
  echo "gpu_check: budget ${TOTAL_BUDGET} s; scratch $WORK"
fi

run_step env plain 45 env.json bash -c '
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$0" benchmarks/gpu_check_report.py env "$1"' "$PYTHON" "$WORK/env.json"
ARCH="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("arch") or "")' \
  "$WORK/env.json" 2>/dev/null)"
ARCH="${ARCH:-9.0}"

# The kernels must be registered for CUDA (dry run: the extension must load).
VERIFY_BUILD='
import sys, plastic_ops
from benchmarks.cuda_vs_reference import cuda_kernels_registered
print("extension loaded:", plastic_ops.extension_available(), "- CUDA kernels registered:", cuda_kernels_registered())
sys.exit(0 if plastic_ops.extension_available() and (sys.argv[1] == "cpu" or cuda_kernels_registered()) else 1)'
if [ "$SKIP_BUILD" = "1" ]; then
  skip_step build plain "skip-build: the extension already built in place is used"
elif [ "$DRY_RUN" = "1" ]; then
  run_step build plain 240 - bash -c '
    PLASTIC_OPS_CPU_ONLY=1 "$0" setup.py build_ext --inplace && "$0" -c "$1" cpu' "$PYTHON" "$VERIFY_BUILD"
else
  run_step build plain 200 - bash -c '
    MAX_JOBS="$(nproc)" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$2" "$0" setup.py build_ext --inplace \
      && ls -la plastic_ops/_C*.so && "$0" -c "$1" cuda' "$PYTHON" "$VERIFY_BUILD" "$ARCH"
fi

# Both CUDA kernel paths against one reference (on the CPU the variable changes nothing: one path).
if [ "$DRY_RUN" = "1" ]; then
  run_step reference reference 60 reference.json \
    "$PYTHON" -m benchmarks.cuda_vs_reference --device cpu --quick --paths v2 --json "$WORK/reference.json"
else
  run_step reference reference 75 reference.json \
    "$PYTHON" -m benchmarks.cuda_vs_reference --device cuda --paths v1,v2 --json "$WORK/reference.json"
fi

# Both kernel paths timed side by side, interleaved.
if [ "$DRY_RUN" = "1" ]; then
  run_step paths timing 60 paths.json "$PYTHON" -m benchmarks.cuda_vs_reference --device cpu --only timing \
    --paths v1,v2 --n 24 --steps 5 --batches 1 2 --rounds 2 --json "$WORK/paths.json"
else
  run_step paths timing 90 paths.json "$PYTHON" -m benchmarks.cuda_vs_reference --device cuda --only timing \
    --paths v1,v2 --graphs --json "$WORK/paths.json"
fi

# compute-sanitizer: without the caching allocator every tensor is its own allocation, so memcheck sees
# an access past the end of a tensor.
if [ "$DRY_RUN" = "1" ]; then
  skip_step memcheck sanitizer "dry run: no GPU"
  skip_step racecheck sanitizer "dry run: no GPU"
elif [ -z "$SANITIZER" ]; then
  skip_step memcheck sanitizer "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
  skip_step racecheck sanitizer "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
else
  for tool in memcheck racecheck; do
    if [ "$tool" = racecheck ] && grep -qsi "device not supported" "$WORK/logs/memcheck.log"; then
      skip_step racecheck sanitizer "memcheck found the device not supported by compute-sanitizer here"
      continue
    fi
    run_step "$tool" sanitizer 50 - env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
      --error-exitcode 9 --print-limit 20 "$PYTHON" -m benchmarks.cuda_vs_reference --device cuda --only sanitizer
  done
fi

run_step tests pytest 100 tests.junit.xml "$PYTHON" -m pytest tests/test_op_vs_reference.py \
  tests/test_gradcheck.py tests/test_registration.py tests/test_cuda_kernel_switch.py tests/test_cuda_graphs.py \
  -q -rfEs -k "$PYTEST_K" \
  -o faulthandler_timeout=60 --junitxml "$WORK/tests.junit.xml"

if [ "$DRY_RUN" = "1" ]; then
  run_step bench bench 90 bench/results.json "$PYTHON" -m benchmarks.compare --device cpu --sizes 24 \
    --batches 1 2 --steps 5 --impls fused,eager --mode fwdbwd --budget 0.3 --min-rounds 2 --max-rounds 3 \
    --case-timeout 60 --no-plot --out "$WORK/bench" ${GPU_CHECK_DRY_BENCH_ARGS:-}
else
  run_step bench bench 110 bench/results.json "$PYTHON" -m benchmarks.compare --device cuda --headline \
    --budget 4 --max-rounds 15 --case-timeout 45 --no-plot --out "$WORK/bench"
fi

# One short run of each experiment (synthetic data where it needs a data set; nothing is downloaded).
if [ "$DRY_RUN" = "1" ]; then
  PM_ARGS="--pattern-size 12 --num-patterns 3 --pres-steps 2 --gap-steps 1 --test-steps 2 --episodes 4
           --batch-size 2 --eval-episodes 4 --eval-batch 4 --threads 1"
  CL_ARGS="--train-limit 60 --test-limit 20 --channels 4 8 --hidden 16 --streams 4 --seq-len 5 --epochs 1
           --eval-subset 20 --threads 1"
  DN_ARGS="--synthetic 24 --batch-size 2 --pretrain-steps 2 --pretrain-batch 4 --k 2 --t-ns 1 --t-zs 1
           --steps-per-epoch 2 --test-episodes 3 --val-episodes 2 --sigmas 0.5 --grid-examples 1 --code 8
           --width 4 --epochs 1 --threads 1"
  EXP_CAP=60
else
  PM_ARGS="--episodes 64 --batch-size 32 --eval-episodes 32 --eval-batch 32"
  CL_ARGS="--train-limit 2000 --test-limit 500 --epochs 1"
  DN_ARGS="--synthetic 256 --batch-size 16 --pretrain-steps 10 --steps-per-epoch 10 --test-episodes 16
           --val-episodes 8 --sigmas 0.5 --grid-examples 1 --epochs 1"
  EXP_CAP=40
fi
# shellcheck disable=SC2086  # the argument lists above are meant to split
run_step exp_pattern plain "$EXP_CAP" - "$PYTHON" -m experiments.pattern_memorization --device "$DEV" \
  --no-progress --out "$WORK/exp/pattern" $PM_ARGS
# shellcheck disable=SC2086
run_step exp_classification plain "$EXP_CAP" - "$PYTHON" -m experiments.classification --synthetic \
  --device "$DEV" --no-progress --out "$WORK/exp/classification" $CL_ARGS
# shellcheck disable=SC2086
run_step exp_denoising plain "$EXP_CAP" - "$PYTHON" -m experiments.denoising_autoencoder --datasets mnist \
  --device "$DEV" --quiet --out "$WORK/exp/denoising" $DN_ARGS

# ---- the summary, printed last --------------------------------------------------------------------
pack --print
status=$?
[ "$KEEP_WORK" = "1" ] || rm -rf "$WORK"
exit "$status"
