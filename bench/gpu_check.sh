#!/usr/bin/env bash
# One-shot GPU check: environment, the test suite on compiled CUDA kernels, the benchmarks.
#
#   bash bench/gpu_check.sh [OUTDIR]      # OUTDIR: default $OUT, else bench/results/latest
#
# Run from the repository root; the package is used from source (PYTHONPATH), not installed.
# Every step runs under `timeout`, and a shared deadline (GPU_CHECK_BUDGET_S, default 460 s)
# caps each step's timeout so the whole script stays under 8 minutes. A failing step is
# recorded in OUTDIR/summary.txt and the later steps still run; the script exits 1 if any
# step failed, timed out or was skipped for lack of time.
#
# Outputs in OUTDIR: env.txt, pytest.log, pytest.xml (JUnit), bench_fake_quant.log,
# fake_quant.json, bench_linear.log, linear.json, check.log, check.json, fsdp2.log,
# autotune.log, summary.txt.

set -u

OUTDIR=${1:-${OUT:-bench/results/latest}}
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 1; }
OUTDIR=$(cd "$OUTDIR" && pwd)

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Compiled kernels only: the interpreter would make both the tests and the timings meaningless.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
KILL_GRACE_S=5 # timeout sends KILL this long after TERM; counted against the deadline
MIN_STEP_S=10  # a step that would get less than this is skipped, not started
SUMMARY=$OUTDIR/summary.txt
: >"$SUMMARY"
FAILED=()
STEPS=()

# step_timeout WANTED: WANTED seconds, or less so that the step ends before the deadline.
step_timeout() {
    local left=$((BUDGET_S - SECONDS - KILL_GRACE_S))
    if ((left < $1)); then echo "$left"; else echo "$1"; fi
}

# record NAME RC SECONDS: one line in summary.txt; RC 124/137 is a timeout.
record() {
    local name=$1 rc=$2 secs=$3 status
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        skip) status=SKIPPED ;;
        *) status=FAIL ;;
    esac
    STEPS+=("$name:$status")
    [[ $status == ok ]] || FAILED+=("$name")
    printf '%-18s rc=%-4s %-8s %4ss\n' "$name" "$rc" "$status" "$secs" | tee -a "$SUMMARY"
}

# run_step NAME WANTED_S LOGFILE CMD...: CMD under timeout, output shown and saved to LOGFILE.
run_step() {
    local name=$1 wanted=$2 log=$3
    shift 3
    local t start rc
    t=$(step_timeout "$wanted")
    echo
    echo "=== $name (timeout ${t}s) ==="
    if ((t < MIN_STEP_S)); then
        echo "gpu_check: no time left for $name" | tee "$log"
        record "$name" skip 0
        return
    fi
    start=$SECONDS
    timeout --kill-after="$KILL_GRACE_S" "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $((SECONDS - start))
}

# --- step 1: environment ---------------------------------------------------------------------
env_report() {
    local rc=0
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(
        [[ -n $(git status --porcelain 2>/dev/null) ]] && echo ' (dirty)')"
    echo "--- nvidia-smi -L"
    timeout 15 nvidia-smi -L || rc=1
    echo "--- nvidia-smi --query-gpu"
    timeout 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv || rc=1
    echo "--- python"
    timeout 60 python - <<'EOF' || rc=1
import importlib.util
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda})")
for name in ("triton", "pytest", "pytest_benchmark", "hypothesis"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"{name}: not installed")
        continue
    mod = __import__(name)
    print(f"{name} {getattr(mod, '__version__', '?')}")
print(f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs")
if not torch.cuda.is_available():
    sys.exit(1)
EOF
    return $rc
}
export -f env_report # timeout runs programs, not shell functions
run_step env 30 "$OUTDIR/env.txt" bash -c env_report

# The split of the 460 s budget, most telling first: env 30, compiled-kernel tests 150
# (CPU-only parity files left out), the headline fused-linear benchmark 100, the fake-quant
# bandwidth 65, the check grid 40, FSDP2 vs one process 45, autotuning of the headline shape
# 30 (sum 460). Each step gets at most what the earlier ones leave.

# --- step 2: test suite on compiled CUDA kernels (one GEMM config: TRITON_QAT_AUTOTUNE=0) ----
run_step pytest 150 "$OUTDIR/pytest.log" \
    env TRITON_QAT_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpu \
    python -m pytest tests/test_rounding.py tests/test_kernels.py tests/test_fq_linear.py \
    tests/test_fake_quantize.py tests/test_observe.py tests/test_nn_linear.py tests/test_api.py \
    -q -p no:cacheprovider --junitxml="$OUTDIR/pytest.xml"

# --- step 3: benchmarks --------------------------------------------------------------------------
# The fused linear. Its own --budget-s, 20 s under the step's timeout, stops it starting new
# shapes in time to print its table and exit; linear.json is rewritten after every shape.
linear_t=$(step_timeout 100)
run_step bench_linear 100 "$OUTDIR/bench_linear.log" \
    python bench/bench_linear.py --out "$OUTDIR" --budget-s $((linear_t > 40 ? linear_t - 20 : 20))
run_step bench_fake_quant 65 "$OUTDIR/bench_fake_quant.log" \
    python bench/bench_fake_quant.py --out "$OUTDIR" --quick

# --- step 4: every kernel against the reference at real sizes --------------------------------
run_step check 40 "$OUTDIR/check.log" \
    python -m triton_qat check --quick --device cuda --json "$OUTDIR/check.json"

# --- step 5: FSDP2 (fully_shard) with tq layers against one process; one rank per GPU --------
run_step fsdp2 45 "$OUTDIR/fsdp2.log" \
    env TRITON_QAT_AUTOTUNE=0 python bench/fsdp2_check.py --device cuda

# --- step 6: autotune the headline shape ---------------------------------------------------------
run_step autotune 30 "$OUTDIR/autotune.log" \
    python -m triton_qat autotune --shapes 8192x4096x4096 --dtype bf16

# --- summary -------------------------------------------------------------------------------------
echo
line="gpu_check: $((${#STEPS[@]} - ${#FAILED[@]}))/${#STEPS[@]} steps ok [${STEPS[*]}] in ${SECONDS}s; results in $OUTDIR"
echo "$line" | tee -a "$SUMMARY"
((${#FAILED[@]} == 0)) || exit 1
exit 0
