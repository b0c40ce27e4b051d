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
# Steps come in two groups. "core" (the default): tests, autotune, benchmarks, check, report.
# "reliability": FSDP2 (fully_shard) training against one process (fsdp2), bitwise
# repeatability and checkpoint resume on the GPU (determinism), tensors past 2**31 elements
# (scale), hypothesis fuzzing of the compiled kernels with statistics (fuzz), and the
# 2,000-step fused-vs-eager QAT run (stability). Each group fits one call:
#   GPU_CHECK_STEPS=reliability bash bench/gpu_check.sh OUTDIR
# "models": the LLM path (embedding and compile benchmarks, the model-level tests), one call:
#   GPU_CHECK_STEPS=models bash bench/gpu_check.sh OUTDIR
# "formats": the float formats (FP8, MX, NVFP4) tests on compiled kernels, and the FP8 fused
# linear against bf16 F.linear (OUTDIR/fp8/linear.json), one call:
#   GPU_CHECK_STEPS=formats bash bench/gpu_check.sh OUTDIR
# "training": a whole AdamW step of a Llama with Llama-3-8B's layer shapes (2 layers, seq
# 2048, bf16), float vs triton_qat vs torchao QAT, eager and compiled (OUTDIR/model_step.json),
# one call. torchao is not on the GPU machines: carry its wheel (bench/README.md) and put it on
# PYTHONPATH first, or its rows say "torchao missing":
#   GPU_CHECK_STEPS=training bash bench/gpu_check.sh OUTDIR
# GPU_CHECK_STEPS takes "core", "reliability", "models", "formats", "training", "all" or step
# names (env always runs).
#
# Outputs in OUTDIR: env.txt, pytest.log, pytest.xml (JUnit), autotune.log,
# autotune_cache/autotune.json (the tuned configs), bench_linear.log, linear.json,
# bench_int.log, int_linear.json, bench_fake_quant.log, fake_quant.json, check.log,
# check.json, report.log, README.md (the rendered summary) and <card>/linear.png (with
# matplotlib), summary.txt; reliability: fsdp2.log, determinism.log, scale.log, fuzz.log,
# stability.log, stability.json, stability.png.

set -u

OUTDIR=${1:-${OUT:-bench/results/latest}}
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 1; }
OUTDIR=$(cd "$OUTDIR" && pwd)

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Compiled kernels only: the interpreter would make both the tests and the timings meaningless.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
# triton_qat's autotune cache lives with the results: the autotune step fills it, and the
# benchmarks' first calls on the same shapes then load the winners instead of tuning again.
export TRITON_QAT_CACHE_DIR=$OUTDIR/autotune_cache

BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-core}
RELIABILITY_STEPS="fsdp2 determinism scale fuzz stability"
MODEL_STEPS="bench_embedding bench_compile tests_models"
FORMAT_STEPS="tests_formats bench_fp8"
TRAINING_STEPS="model_step"
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

# selected NAME: whether GPU_CHECK_STEPS asks for step NAME (by its name or its group).
selected() {
    local group=core want
    [[ $1 == env ]] && return 0
    [[ " $RELIABILITY_STEPS " == *" $1 "* ]] && group=reliability
    [[ " $MODEL_STEPS " == *" $1 "* ]] && group=models
    [[ " $FORMAT_STEPS " == *" $1 "* ]] && group=formats
    [[ " $TRAINING_STEPS " == *" $1 "* ]] && group=training
    for want in $GPU_CHECK_STEPS; do
        [[ $want == all || $want == "$group" || $want == "$1" ]] && return 0
    done
    return 1
}

# run_step NAME WANTED_S LOGFILE CMD...: CMD under timeout, output shown and saved to LOGFILE;
# nothing at all when the step is not selected.
run_step() {
    local name=$1 wanted=$2 log=$3
    shift 3
    local t start rc
    selected "$name" || return 0
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
run_step env 20 "$OUTDIR/env.txt" bash -c env_report

# The split of the 460 s budget (wanted seconds per step; each gets at most what the earlier
# ones leave): env 20, pytest 150, autotune 90, bench_linear 85, bench_int 45,
# bench_fake_quant 30, check 25, report 10 = 455. Most telling first: compiled-kernel tests
# (CPU-only parity files and the property tests, which the reliability group's fuzz step
# runs, left out), then tuning the headline shapes, whose cached winners spare bench_linear
# its tuning of those shapes, then the benchmarks, the check grid and the rendered report.
# The reliability group: fsdp2 45, determinism 60, scale 60, fuzz 120, stability 150 = 435.

# --- step 2: test suite on compiled CUDA kernels (one GEMM config: TRITON_QAT_AUTOTUNE=0) ----
run_step pytest 150 "$OUTDIR/pytest.log" \
    env TRITON_QAT_TEST_DEVICE=cuda \
    python -m pytest tests/test_rounding.py tests/test_kernels.py tests/test_fq_linear.py \
    tests/test_per_token.py tests/test_int_matmul.py tests/test_observe.py \
    tests/test_learnable.py tests/test_fake_quantize.py tests/test_nn_linear.py \
    tests/test_api.py -k "not property" \
    -q -p no:cacheprovider --junitxml="$OUTDIR/pytest.xml"

# --- step 3: autotune the headline shapes into OUTDIR/autotune_cache -------------------------
# forward, dX and dW of 8192x4096x4096 and 8192x14336x4096, bf16, int8 per-channel weights.
run_step autotune 90 "$OUTDIR/autotune.log" \
    python -m triton_qat autotune --shapes 8192x4096x4096 8192x14336x4096 --dtype bf16 \
    --granularity per_channel

# --- step 4: benchmarks --------------------------------------------------------------------------
# The fused linear. Its own --budget-s, 20 s under the step's timeout, stops it starting new
# shapes in time to print its table and exit; linear.json is rewritten after every shape.
linear_t=$(step_timeout 85)
run_step bench_linear 85 "$OUTDIR/bench_linear.log" \
    python bench/bench_linear.py --out "$OUTDIR" --budget-s $((linear_t > 40 ? linear_t - 20 : 20))
# The integer GEMMs at 8192x4096x4096 bf16; --budget-s 10 s under the step's timeout.
int_t=$(step_timeout 45)
run_step bench_int 45 "$OUTDIR/bench_int.log" \
    python bench/bench_int.py --out "$OUTDIR" --quick --budget-s $((int_t > 20 ? int_t - 10 : 10))
run_step bench_fake_quant 30 "$OUTDIR/bench_fake_quant.log" \
    python bench/bench_fake_quant.py --out "$OUTDIR" --quick

# --- step 5: every kernel against the reference at real sizes --------------------------------
run_step check 25 "$OUTDIR/check.log" \
    python -m triton_qat check --quick --device cuda --json "$OUTDIR/check.json"

# --- step 6: the report: OUTDIR/README.md and OUTDIR/<card>/linear.png -----------------------
run_step report 10 "$OUTDIR/report.log" python bench/report.py --results "$OUTDIR"

# --- reliability (GPU_CHECK_STEPS=reliability) ---------------------------------------------------
# FSDP2 (fully_shard) with tq layers against one process; one rank per GPU.
run_step fsdp2 45 "$OUTDIR/fsdp2.log" \
    env TRITON_QAT_AUTOTUNE=0 python bench/fsdp2_check.py --device cuda
# Bitwise repeatability (for one GEMM config, as the autotuner fixes it) and mid-QAT checkpoints
# resumed in a new process, on the GPU.
run_step determinism 60 "$OUTDIR/determinism.log" \
    env TRITON_QAT_TEST_DEVICE=cuda \
    python -m pytest tests/test_determinism.py tests/test_checkpoint.py -q -p no:cacheprovider
run_step scale 60 "$OUTDIR/scale.log" python bench/scale_check.py
# Hypothesis on compiled kernels: every property test, the "gpu" profile (400 examples each);
# the statistics (examples tried, passing, failing) go to fuzz.log.
run_step fuzz 120 "$OUTDIR/fuzz.log" \
    env TRITON_QAT_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpu \
    python -m pytest tests -k property -q -p no:cacheprovider --hypothesis-show-statistics
run_step stability 150 "$OUTDIR/stability.log" \
    python bench/stability.py --steps 2000 --out "$OUTDIR"

# --- models (GPU_CHECK_STEPS=models) -------------------------------------------------------------
# The LLM path on compiled kernels: QAT embedding against torch.ao's and torchao's, a training
# step compiled vs eager, and the model-level tests (selection, embedding, precision,
# checkpointing and LoRA interop, torch.compile, reload and export) on the GPU.
run_step bench_embedding 60 "$OUTDIR/bench_embedding.log" \
    python bench/bench_embedding.py --device cuda --num 128000 --dim 4096 --tokens 8192
run_step bench_compile 150 "$OUTDIR/bench_compile.log" \
    python bench/bench_compile.py --device cuda --backend inductor
run_step tests_models 200 "$OUTDIR/tests_models.log" \
    env TRITON_QAT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
    tests/test_embedding.py tests/test_prepare.py tests/test_precision.py \
    tests/test_interop.py tests/test_compile.py tests/test_serialize.py tests/test_export.py

# --- float formats (GPU_CHECK_STEPS=formats) ----------------------------------------------------
# The FP8 / MX / NVFP4 tests on compiled kernels (float8 in Triton: sm_89 and up), then the FP8
# fused linear (tq.fp8_linear) beside bf16 F.linear and torch.compile of the FP8 composition,
# 8192x4096x4096 bf16; targets fp8_dynamic forward <= 0.6x, forward + backward <= 1.0x.
run_step tests_formats 150 "$OUTDIR/tests_formats.log" \
    env TRITON_QAT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
    tests/test_float8_kernels.py tests/test_float_formats.py tests/test_microscaling.py \
    tests/test_microscaling_kernels.py tests/test_float8_convert.py tests/test_microscaling_convert.py
fp8_t=$(step_timeout 120)
run_step bench_fp8 120 "$OUTDIR/bench_fp8.log" \
    python bench/bench_linear.py --out "$OUTDIR/fp8" --quick --qconfig fp8_dynamic \
    --qconfig fp8_weight_only --budget-s $((fp8_t > 40 ? fp8_t - 20 : 20))

# --- training (GPU_CHECK_STEPS=training) ---------------------------------------------------------
# The number users judge by: tokens per second and peak memory of a whole training step, eager
# rows first, then compiled (each compiled row compiles twice: the first step, then once more
# when per-group buffers have their shapes). Its --budget-s, 100 s under the step's timeout,
# stops it starting a row that could not finish; model_step.json is rewritten after every row.
step_t=$(step_timeout 440)
run_step model_step 440 "$OUTDIR/model_step.log" \
    python bench/bench_model_step.py --device cuda --out "$OUTDIR" \
    --budget-s $((step_t > 130 ? step_t - 100 : 30))

# --- summary -------------------------------------------------------------------------------------
echo
line="gpu_check: $((${#STEPS[@]} - ${#FAILED[@]}))/${#STEPS[@]} steps ok [${STEPS[*]}] in ${SECONDS}s; results in $OUTDIR"
echo "$line" | tee -a "$SUMMARY"
((${#FAILED[@]} == 0)) || exit 1
exit 0
