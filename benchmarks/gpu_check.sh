#!/usr/bin/env bash
# The one-shot GPU check: the script to run first, in one call, on a machine with a GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on a CUDA machine (~9 minutes, no network needed)
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # the same steps on CPU with tiny sizes (CI runs this)
#
# Steps (each time-boxed with `timeout`; a failing step is recorded and the next one runs):
#   env        nvidia-smi, library versions, `python -m gpt2fast info`
#   build      python setup.py build_ext --inplace (+ benchmarks/ptxas_check.py when it exists)
#   tests_gpu  pytest -m gpu                        (junit xml)
#   tests_all  pytest -m "not gpu" with CUDA present (junit xml)
#   memcheck   compute-sanitizer --tool memcheck over the CUDA backend's GPU tests
#   racecheck  compute-sanitizer --tool racecheck over the same tests
#   kernels    gpt2fast bench kernels --quick  (JSON written as it goes: a time-out keeps what ran)
#   e2e        gpt2fast bench e2e --size gpt2 --batch 1,8,64 --prompt 128 --new 128
#   train      gpt2fast bench train --size gpt2 --shape 8x1024 (training step per provider, loss head, attn bwd)
#   report     markdown tables + PNG plots from the JSON
#
# OUT_DIR receives at most 7 files, none in sub-folders (a remote run brings back at most 8):
#   summary.md  status.json  kernels.json  e2e.json  train.json  logs.tar.gz  plots.tar.gz
#
# Exit status: 0 when no step FAILED or TIMED OUT (skipped steps, e.g. for lack of a GPU, are fine).
# Environment: PYTHON (interpreter), GPU_CHECK_BUDGET_S (total seconds, default 540 on GPU).
set -u -o pipefail

DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "unknown option: $arg" >&2; exit 2 ;;
        *) if [ -n "$OUT" ]; then echo "only one OUT_DIR, got '$OUT' and '$arg'" >&2; exit 2; fi; OUT="$arg" ;;
    esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then OUT="$ROOT/out/gpu_check_dry_run"; else echo "usage: $0 OUT_DIR | --dry-run [OUT_DIR]" >&2; exit 2; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2

# The interpreter: $PYTHON, else the repo's venv when it has torch, else python3.  Never a new venv.
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing here may reach the network

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/plots"
trap 'rm -rf "$WORK"' EXIT

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    BUDGET="${GPU_CHECK_BUDGET_S:-300}"  # generous: a time-out fails CI; the dry run takes about a minute
    MODE="dry-run (CPU, tiny sizes)"
else
    BUDGET="${GPU_CHECK_BUDGET_S:-540}"
    MODE="GPU"
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
STEPS=()  # "name|status|seconds|note"

# run_step NAME TIMEOUT RESERVE CMD...: run CMD with its output in logs/NAME.log, at most TIMEOUT seconds and
# never past the point that leaves RESERVE seconds for the steps after it.  Status: PASS, FAIL, TIMEOUT, SKIP
# (the command exits 77 to say "skipped"; its last output line is the reason).
run_step() {
    local name="$1" limit="$2" reserve="$3"
    shift 3
    local now left t0 rc status note
    reserve=$((reserve * BUDGET / 540))  # reserves are written for the 540 s GPU budget
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    if [ "$left" -lt "$limit" ]; then limit="$left"; fi
    if [ "$limit" -lt 5 ]; then
        STEPS+=("$name|TIMEOUT|0|no time left in the ${BUDGET}s budget")
        echo "== $name: no time left" | tee -a "$LOGS/steps.log"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOGS/steps.log"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    case "$rc" in
        0) status=PASS; note="" ;;
        77) status=SKIP; note="$(tail -n 1 "$LOGS/$name.log")" ;;
        124|137) status=TIMEOUT; note="killed after ${limit}s" ;;
        *) status=FAIL; note="exit $rc: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-160)" ;;
    esac
    note="$(printf '%s' "${note//|//}" | tr -d '\000-\037')"  # one table cell: no pipes, no control characters
    STEPS+=("$name|$status|$(($(date +%s) - t0))|$note")
    echo "   $status $note" | tee -a "$LOGS/steps.log"
}

skip() { echo "$*"; exit 77; }
export -f skip

# ---- the steps --------------------------------------------------------------------------------
step_env() {
    date -u
    uname -a
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    command -v nvcc >/dev/null && nvcc --version
    "$PYTHON" - <<'EOF'
import importlib, sys
print("python", sys.version)
for m in ("torch", "triton", "transformers", "pybind11", "ninja", "matplotlib", "pytest", "hypothesis", "flash_attn"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as exc:
        print(m, "unavailable:", exc)
import torch
print("cuda available:", torch.cuda.is_available(), "torch.version.cuda:", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", p.total_memory // 2**20, "MiB",
          "L2", getattr(p, "L2_cache_size", "?"))
EOF
    "$PYTHON" -m gpt2fast info
}

step_build() {
    [ "$DRY" = 1 ] && skip "dry run: the extension is not built here (nvcc compiles are checked by benchmarks/compile_check.py)"
    [ -f setup.py ] || skip "no setup.py: nothing to build"
    GPT2FAST_BUILD_JOBS="${GPT2FAST_BUILD_JOBS:-$(nproc)}" "$PYTHON" setup.py build_ext --inplace || return 1
    "$PYTHON" -c "import gpt2fast._C as c; print('built', c.__file__)" || return 1
    if [ -f benchmarks/ptxas_check.py ]; then
        echo "---- benchmarks/ptxas_check.py"
        "$PYTHON" benchmarks/ptxas_check.py --arch 90a --jobs "$(nproc)" --json "$LOGS/ptxas.json" || return 1
    fi
}

pytest_step() {  # pytest_step JUNIT_NAME ARGS...: pytest exit 5 (nothing collected) counts as skipped
    local junit="$1"
    shift
    "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$LOGS/$junit.xml" "$@"
    local rc=$?
    [ "$rc" = 5 ] && skip "pytest collected no tests for: $*"
    return "$rc"
}

# Test steps on the GPU: fixed Triton configs (autotuning every shape class would eat the budget; the tests
# that cover autotuning force it on themselves) and the "quick" hypothesis profile (10 examples per test).
# The benchmarks keep autotuning on.
test_env() { export GPT2FAST_AUTOTUNE="${GPT2FAST_AUTOTUNE:-0}" HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-quick}"; }

step_tests_gpu() { test_env; pytest_step junit_gpu -m gpu tests; }

step_tests_all() {
    test_env
    [ "$DRY" = 1 ] && { pytest_step junit_bench tests/test_bench.py -k "sweeps or counts or schema"; return; }
    pytest_step junit_all -m "not gpu" tests
}

sanitizer() {
    local tool="$1"
    test_env
    [ "$DRY" = 1 ] && skip "dry run: compute-sanitizer needs a GPU"
    local cs
    cs="$(command -v compute-sanitizer || true)"
    [ -z "$cs" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && cs=/usr/local/cuda/bin/compute-sanitizer
    [ -z "$cs" ] && skip "compute-sanitizer not found"
    # Probe: does the tool work at all on this machine (driver, permissions)?
    if ! timeout 40 "$cs" --tool "$tool" "$PYTHON" -c "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"; then
        skip "compute-sanitizer --tool $tool does not work here (probe failed)"
    fi
    # The caching allocator would hide out-of-bounds accesses inside its blocks.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 3 \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider -m gpu -k "cuda" tests
    local rc=$?
    [ "$rc" = 5 ] && skip "no GPU tests match -k cuda"
    return "$rc"
}

step_kernels() {
    if [ "$DRY" = 1 ]; then
        "$PYTHON" -m gpt2fast bench kernels --device cpu --json "$WORK/kernels.json"
    else
        "$PYTHON" -m gpt2fast bench kernels --quick --dtype fp16 --json "$WORK/kernels.json"
    fi
}

step_e2e() {
    if [ "$DRY" = 1 ]; then
        "$PYTHON" -m gpt2fast bench e2e --device cpu --size tiny --batch 1,2 --prompt 8 --new 4 --reps 1 \
            --json "$WORK/e2e.json"
    else
        "$PYTHON" -m gpt2fast bench e2e --size gpt2 --batch 1,8,64 --prompt 128 --new 128 --reps 2 \
            --hf-compile-batches 1 --json "$WORK/e2e.json"
    fi
}

step_train() {
    if [ "$DRY" = 1 ]; then
        "$PYTHON" -m gpt2fast bench train --device cpu --steps 1 --warmup 0 --json "$WORK/train.json"
    else  # one size and shape here; the full sweep (gpt2, gpt2-medium x 8x1024, 32x512) is the plain command
        "$PYTHON" -m gpt2fast bench train --size gpt2 --shape 8x1024 --steps 5 --warmup 2 --json "$WORK/train.json"
    fi
}

step_report() {
    local docs=()
    [ -f "$WORK/kernels.json" ] && docs+=("$WORK/kernels.json")
    [ -f "$WORK/e2e.json" ] && docs+=("$WORK/e2e.json")
    [ -f "$WORK/train.json" ] && docs+=("$WORK/train.json")
    [ "${#docs[@]}" = 0 ] && { echo "no results JSON to report on"; return 1; }
    "$PYTHON" -m gpt2fast.bench.report "${docs[@]}" -o "$WORK/results.md" || return 1
    if [ -f "$WORK/kernels.json" ]; then "$PYTHON" -m gpt2fast.bench.plots "$WORK/kernels.json" "$WORK/plots" || return 1; fi
}

export DRY PYTHON LOGS WORK
export -f test_env step_env step_build pytest_step step_tests_gpu step_tests_all sanitizer step_kernels step_e2e step_train
export -f step_report

# Budgets (GPU): 30 + 150 + 90 + 100 + 60 + 40 + 180 + 150 + 120 + 30 s at most, cut further by the total budget;
# RESERVE keeps time for the benchmarks and the report whatever the earlier steps do.
run_step env 30 420 bash -c step_env
run_step build 150 400 bash -c step_build
run_step tests_gpu 90 360 bash -c step_tests_gpu
run_step tests_all 100 330 bash -c step_tests_all
run_step memcheck 60 300 bash -c "sanitizer memcheck"
run_step racecheck 40 290 bash -c "sanitizer racecheck"
run_step kernels 180 270 bash -c step_kernels
run_step e2e 150 140 bash -c step_e2e
run_step train 120 20 bash -c step_train
run_step report 30 0 bash -c step_report

# ---- pack OUT_DIR -----------------------------------------------------------------------------
FAILED=0
{
    echo "# gpt2fast GPU check — $MODE"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'),"
    echo "python: $PYTHON, budget ${BUDGET}s, took $(($(date +%s) - START))s."
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---|---|"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name status secs note <<<"$s"
        echo "| $name | $status | $secs | $note |"
        case "$status" in FAIL|TIMEOUT) FAILED=1 ;; esac
    done
    echo
    echo "Logs (per step), junit XML: logs.tar.gz.  Plots: plots.tar.gz.  Raw results: kernels.json, e2e.json, train.json."
    echo
    [ -f "$WORK/results.md" ] && cat "$WORK/results.md"
} >"$OUT/summary.md"

json_str() { local v="${1//\\/\\\\}"; v="${v//\"/\\\"}"; printf '"%s"' "${v//$'\t'/ }"; }
{
    echo '{"steps": ['
    sep=""
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name status secs note <<<"$s"
        printf '%s {"step": %s, "status": %s, "seconds": %s, "note": %s}' "$sep" "$(json_str "$name")" \
            "$(json_str "$status")" "$secs" "$(json_str "$note")"
        sep=$',\n'
    done
    printf '\n], "ok": %s}\n' "$([ "$FAILED" = 0 ] && echo true || echo false)"
} >"$OUT/status.json"

for f in kernels.json e2e.json train.json; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"; done
# Keep each log's tail so the tarball stays far below the 16 MiB a file may have.
for f in "$LOGS"/*.log; do
    if [ "$(stat -c %s "$f")" -gt 3000000 ]; then tail -c 3000000 "$f" >"$f.tail" && mv "$f.tail" "$f"; fi
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
tar -czf "$OUT/plots.tar.gz" -C "$WORK" plots

cat "$OUT/summary.md" | sed -n '1,20p'
echo "results in $OUT"
exit "$FAILED"
