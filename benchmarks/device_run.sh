#!/usr/bin/env bash
# One prepared GPU run for a fresh device machine (torch, triton, transformers, pytest-benchmark, scipy, sklearn,
# matplotlib preinstalled; no internet), in at most 8 minutes:
#
#   bash benchmarks/device_run.sh     # outputs in $OUT when set, else in benchmarks/results/device-run
#
#   1. pip install --no-deps -e .           (and wheels from .whl/ when a carried folder holds some)
#   2. what issue 18 could not observe on a CPU, most informative first (run_hazard_steps below):
#      seeds 1 and 16k through the real JIT and the bitwise claims under the compiled code; the device guard and
#      PATS on non-contiguous and resized parameters; captures of whole LNSR, HyPe and PATS steps
#   3. compute-sanitizer memcheck and racecheck over benchmarks/sanitizer_smoke.py (every fused op once, one
#      PATS step), with torch's caching allocator off so that memcheck sees every allocation's bounds
#   4. the static model under this machine's Triton (benchmarks/sass_roofline.py --json): compiles every kernel
#      for sm_90 as the launchers run it and checks the targets; its JSON feeds step 7
#   5. the test suite on CUDA (tests/test_kernels_compile.py is step 4's work, so it is deselected)
#   6. pytest benchmarks --benchmark-json benchmarks/results/<gpu-name>.json
#   7. the Markdown table: each kernel's measured fraction of the measured copy bandwidth beside the static
#      prediction, and the measured issue efficiency (the model's issue time / the measured time: what
#      sass_roofline.py --efficiency stands in for) (benchmarks/device_table.py), <gpu-name>-vs-static.md
#   8. extra GPU checks (run_extra_steps below: later issues add theirs there)
#
# Each step has a time cap inside an overall 8-minute budget; a failed or timed-out step is recorded and the run
# goes on, so one broken step never costs the others' results; steps that find no time left are recorded as
# skipped (the later ones first: the order is the order of importance). The exit status is 0 only when every
# step passed. Written for Triton 3.6 / torch 2.11 (the GPU machine) as well as later versions.
# A carried folder may hold GLUE files (data/glue), a float16 MiniLM copy (models/) or wheels (.whl/).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BUDGET_S=${DEVICE_RUN_BUDGET_S:-480}
OUT_DIR=${OUT:-benchmarks/results/device-run}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device_run.log"
SUMMARY="$OUT_DIR/summary.txt"
START_S=$SECONDS
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
FAILED=0

log() { echo "[device_run +$((SECONDS - START_S))s] $*" | tee -a "$LOG"; }

# step NAME CAP_S COMMAND...: run COMMAND for at most min(CAP_S, budget left - 10 s), log it, record the outcome.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S) - 10))
    if ((left < 15)); then
        log "SKIP $name: the time budget is spent"
        echo "SKIP $name (no time left)" >>"$SUMMARY"
        FAILED=1
        return 1
    fi
    ((cap > left)) && cap=$left
    log "START $name (cap ${cap}s): $*"
    local begin=$SECONDS
    # SIGINT first: pytest then ends the session normally and pytest-benchmark still writes its JSON.
    timeout --signal=INT --kill-after=20 "$cap" "$@" >>"$LOG" 2>&1
    local status=$?
    local took=$((SECONDS - begin))
    if ((status == 0)); then
        echo "ok   $name (${took}s)" >>"$SUMMARY"
    else
        ((status == 124)) && status="timeout after ${cap}s"
        echo "FAIL $name (${took}s): exit $status" >>"$SUMMARY"
        FAILED=1
    fi
    log "END $name: exit $status after ${took}s"
    return 0
}

# shellcheck disable=SC2329  # run through `bash -c` by step (exported below)
do_install() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl || return 1
    fi
    # no internet: no build isolation (it would download setuptools)
    python -m pip install -q --no-deps --no-build-isolation -e .
}

# shellcheck disable=SC2329  # run through `bash -c` by step (exported below)
show_environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python - <<'EOF'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
}

# shellcheck disable=SC2329  # run through `bash -c` by step (exported below)
# pytest over the given test files / node ids that exist in this checkout (a file another branch adds may be
# missing here), with -k EXPR when the first argument is -k.
existing_tests() {
    local args=() spec
    if [[ ${1:-} == -k ]]; then
        args+=(-k "$2")
        shift 2
    fi
    local found=0
    for spec in "$@"; do
        [[ -f ${spec%%::*} ]] && args+=("$spec") && found=1
    done
    if ((!found)); then
        echo "none of $* is in this checkout: nothing to run"
        return 0
    fi
    python -m pytest -q -rfEs -p no:cacheprovider "${args[@]}"
}

# shellcheck disable=SC2329  # run through `bash -c` by step (exported below)
# compute-sanitizer TOOL over the smoke script: one launch of every fused kernel and one PATS step.
sanitize() {
    local tool=$1 sanitizer
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [[ ! -x $sanitizer ]]; then
        echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin): the $tool check did not run"
        return 1
    fi
    local extra=()
    [[ $tool == racecheck ]] && extra=(--racecheck-report analysis)
    # The smoke script's kernels compile first (warm-up run, no sanitizer), so the sanitized run spends its time
    # on the launches; no caching allocator, so a read past a tensor's end or of freed memory is an error.
    python benchmarks/sanitizer_smoke.py >/dev/null || return 1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" "${extra[@]}" --error-exitcode 1 \
        --print-limit 20 python benchmarks/sanitizer_smoke.py
}

# timeout runs programs, not shell functions: the steps below that are functions run in a child bash.
export -f do_install show_environment existing_tests sanitize

# Issue 18: what a CPU cannot show, most informative first. Each line names the tests by file, node id or -k;
# files missing from this checkout are left out (existing_tests).
run_hazard_steps() {
    # seeds 1, 16, 17, 42 and 64-bit ones through the real JIT: one compiled kernel per op, and seed=1 compiles
    # (it did not: the JIT made it a constant); the uniform noise, philox words and counters bitwise the reference's
    # under the compiled code (FMA contraction off where a claim needs it)
    step hazards-seeds-bitwise 90 bash -c 'existing_tests tests/test_compile_layer.py \
        tests/test_ops.py::test_uniform_kernel_is_bitwise_reference_in_float32 \
        tests/test_ops.py::test_counters_past_2_to_the_32_blocks tests/test_rng.py \
        tests/test_graph_offsets.py::test_host_path_is_unchanged_and_takes_no_ticket \
        tests/test_noisytune.py::test_kernel_stats_merge_over_chunks_and_lanes tests/test_compiled_forms.py'
    # every launch on its tensors' GPU (two-GPU checks skipped, with their reason, on one GPU); PATS with a
    # transposed gradient beside a bf16 bucket (copies freed before the update read them), resized and
    # non-contiguous parameters; NoisyTune/PATS on views of one storage; host tables held by a capture
    step hazards-devices-pats 90 bash -c 'existing_tests tests/test_device_guard.py tests/test_capture_hazards.py \
        tests/test_gpu_only_paths.py; first=$?
        existing_tests -k "kernel_matches_reference or gradient_copies or resiz" tests/test_pats.py || exit 1
        exit $first'
    # whole captured steps: HyPe and LNSR training steps, NEFTune, a PATS step (capturable=True) replayed N times
    step hazards-captures 120 bash -c 'existing_tests tests/test_cuda_graphs.py tests/test_pats_cuda_graph.py'
    step memcheck 75 bash -c 'sanitize memcheck'
    step racecheck 75 bash -c 'sanitize racecheck'
}

# Later issues add their GPU checks here (CUDA-graph replays of the fused ops, a launch-bound BERT step, ...):
# one `step NAME CAP_S COMMAND...` line each, writing any file they produce under "$OUT_DIR" (at most 8 files come
# back from $OUT: this script writes 7).
run_extra_steps() {
    # (issue 13's CUDA-graph checks, tests/test_cuda_graphs.py and tests/test_pats_cuda_graph.py, run first now:
    # run_hazard_steps' hazards-captures)
    :
}

step environment 30 bash -c show_environment
step install 90 bash -c do_install
GPU=$(python -c "import sys, torch; sys.path.insert(0, 'benchmarks'); from device_table import gpu_slug; \
print(gpu_slug(torch.cuda.get_device_name()))" 2>>"$LOG") || GPU=gpu
# the static model's device constants (SMs, clock, copy bandwidth) for this GPU, so that the table's issue
# efficiency (the model's issue time / the measured time) is this device's
case "$GPU" in
    *h200*) DEVICE=h200 ;;
    *h20) DEVICE=h20 ;;
    *) DEVICE=h100 ;;
esac
STATIC_JSON="$OUT_DIR/static-$GPU.json"
BENCH_JSON="benchmarks/results/$GPU.json"
log "gpu: $GPU (static model constants: $DEVICE)"

run_hazard_steps

step static-model 90 python benchmarks/sass_roofline.py --device "$DEVICE" --json "$STATIC_JSON" \
    --md "$OUT_DIR/static-$GPU.md"
step tests 170 python -m pytest tests -q -rfEs -p no:cacheprovider --deselect tests/test_kernels_compile.py \
    --junitxml="$OUT_DIR/tests-$GPU.xml"
step benchmarks 150 python -m pytest benchmarks -q -p no:cacheprovider --benchmark-json "$BENCH_JSON"
if [[ -f "$BENCH_JSON" && -f "$STATIC_JSON" ]]; then
    step table 20 python benchmarks/device_table.py "$BENCH_JSON" "$STATIC_JSON" --out "$OUT_DIR/$GPU-vs-static.md"
    cp "$BENCH_JSON" "$OUT_DIR/" 2>/dev/null
else
    log "no table: missing $BENCH_JSON or $STATIC_JSON"
    echo "FAIL table (inputs missing)" >>"$SUMMARY"
    FAILED=1
fi
run_extra_steps

log "done in $((SECONDS - START_S))s"
cat "$SUMMARY" | tee -a "$LOG"
exit $FAILED
