#!/usr/bin/env bash
# One prepared GPU run for a fresh device machine (torch, triton, transformers, pytest-benchmark, scipy, sklearn,
# matplotlib preinstalled; no internet), in at most 8 minutes:
#
#   bash benchmarks/device_run.sh     # outputs in $OUT when set, else in benchmarks/results/device-run
#
#   1. pip install --no-deps -e .           (and wheels from .whl/ when a carried folder holds some)
#   2. the static model under this machine's Triton (benchmarks/sass_roofline.py --json): compiles every kernel
#      for sm_90 as the launchers run it and checks the targets; its JSON feeds step 5
#   3. the test suite on CUDA (tests/test_kernels_compile.py is step 2's work, so it is deselected)
#   4. pytest benchmarks --benchmark-json benchmarks/results/<gpu-name>.json
#   5. the Markdown table: each kernel's measured fraction of the measured copy bandwidth beside the static
#      prediction, and the measured issue efficiency (the model's issue time / the measured time: what
#      sass_roofline.py --efficiency stands in for) (benchmarks/device_table.py), <gpu-name>-vs-static.md
#   6. extra GPU checks (run_extra_steps below: later issues add theirs there)
#
# Each step has a time cap inside an overall 8-minute budget; a failed or timed-out step is recorded and the run
# goes on, so one broken step never costs the others' results. The exit status is 0 only when every step passed.
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

# timeout runs programs, not shell functions: the steps below that are functions run in a child bash.
export -f do_install show_environment

# Later issues add their GPU checks here (CUDA-graph replays of the fused ops, a launch-bound BERT step, ...):
# one `step NAME CAP_S COMMAND...` line each, writing any file they produce under "$OUT_DIR" (at most 8 files come
# back from $OUT: this script writes 7).
run_extra_steps() {
    # issue 13: a captured PATSAdamax step (capturable=True) replayed N times equals N eager steps
    step pats-cuda-graph 60 python -m pytest tests/test_pats_cuda_graph.py -q -rfEs -p no:cacheprovider
    # issue 13: replays of captured noise ops draw new noise and equal eager calls at the same (seed, offset)
    step cuda-graphs 120 python -m pytest tests/test_cuda_graphs.py -q -rfEs -p no:cacheprovider
    # issue 18 item 1: every launch on its tensors' GPU (launches on cuda:1 while cuda:0 is current; skipped, with
    # its reason, on a one-GPU machine)
    step device-guard 30 python -m pytest tests/test_device_guard.py -q -rfEs -p no:cacheprovider
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
