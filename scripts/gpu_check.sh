#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU (the lent H100/H200 box), in ONE command that
# must end inside the device tool's 600-s limit. Steps, in order, each time-boxed so that a hang in
# one leaves the others' results (and the whole run inside GPU_CHECK_BUDGET seconds, 400 by default:
# a third of the 600 s to spare):
#   env        GPU, driver, torch, nvcc, the fastreg revision (FASTREG_GIT_REV, else git, else
#              .fastreg-git-rev: `make gpu-rev` writes it before the tree is copied), exported
#              as FASTREG_GIT_REV for the tests and benchmarks
#   toolchain  torch sees a GPU, torch >= 2.10 with CUDA, a CUDA toolkit (scripts/find_cuda_home.sh)
#              whose nvcc has torch's CUDA major version
#   build      python3 setup.py build_ext --inplace for this GPU's arch only (detected; or
#              FASTREG_CUDA_ARCHS), MAX_JOBS = the CPU count; then `python -m fastreg --ops
#              --require-cuda` (archs, a CUDA kernel for every operator)
#   tests:*    the CUDA test files, first and each alone (GPU_TEST_FILES), junit to $OUT as each ends
#   cases      the device-parametrised CUDA cases of the other test files (GPU_CASES_ARGS)
#   bench:*    the GPU benchmarks (--bars, then the loss and optimizer sweeps) in what is left
# Logs and results go to ${OUT:-out}/ as they are written (the device tool brings back at most 8
# files: gpu_check.log, summary.txt -- rewritten after every step --, build.log, one junit-*.xml per
# test step, gpu-results.tar.gz at the end) and to benchmarks/results/gpu-<UTC date>/ (the tarball
# holds that folder with its repository path: `tar xzf` it at the repository root and commit it).
#
# --dry-run (what tests/test_gpu_check.py runs on a CPU machine in `make test`): the same steps and
# bookkeeping, with the CUDA steps skipped with a line saying so: no toolchain check and no build
# (the existing build must import), the CUDA test files run and skip themselves on the CPU, the
# benchmark command lines are only parsed; results go to a temporary folder (or GPU_RESULTS_DIR).
#
# The box has no internet: nothing is downloaded. Competitors' wheels carried in .wheels/ (`make
# gpu-wheels`) are installed with --no-index into a private folder.
#
# Environment: OUT, GPU_PYTHON (python3), GPU_CHECK_BUDGET (s, 400), MAX_JOBS (CPU count),
# FASTREG_CUDA_ARCHS (this GPU's), BUILD_TIMEOUT (300), TEST_TIMEOUT (per CUDA test file, 120),
# CASES_TIMEOUT (120),
# BENCH_TIMEOUT (per benchmark step, 120), GPU_TEST_FILES, GPU_CASES_ARGS, BENCH_ARGS (added to
# every benchmark command), GPU_RESULTS_DIR, SKIP_TESTS=1, SKIP_BENCH=1. More test steps than the
# default three would pass the device tool's 8-file limit on $OUT.
# Exit status: 0 only if every step that ran succeeded and none was cut by its time box.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

OUT_DIR=${OUT:-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DAY=$(date -u +%Y-%m-%d)
if [ -n "${GPU_RESULTS_DIR:-}" ]; then
  RES_DIR=$GPU_RESULTS_DIR
elif [ "$DRY_RUN" = 1 ]; then
  RES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry-run.XXXXXX")
else
  RES_DIR=$ROOT/benchmarks/results/gpu-$DAY
fi
mkdir -p "$RES_DIR"
RES_DIR=$(cd "$RES_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.txt
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${GPU_PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-400}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
MIN_STEP=10  # a step that would get less than this is skipped, not started
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

elapsed() { echo $(($(date +%s) - T0)); }
step() { echo; echo "=== [gpu-check +$(elapsed)s of ${BUDGET}s] $*"; }
ENV_LINES=""
ORDER=()
declare -A STATUS
write_summary() {
  {
    printf '%s\n' "$ENV_LINES"
    echo "dry_run: $([ "$DRY_RUN" = 1 ] && echo yes || echo no)"
    echo "elapsed_s: $(elapsed) (budget ${BUDGET}s)"
    for k in "${ORDER[@]}"; do echo "$k: ${STATUS[$k]}"; done
  } >"$SUMMARY.tmp"
  mv "$SUMMARY.tmp" "$SUMMARY"
}
record() {
  [ -n "${STATUS[$1]+x}" ] || ORDER+=("$1")
  STATUS[$1]=$2
  echo "--- $1: $2"
  write_summary
}

# timebox NAME CAP CMD...: runs CMD with at most min(CAP, what the budget has left) seconds; SIGINT
# at the limit (pytest then still writes its junit), SIGKILL 15 s later. Sets TB_RC (124 = timed
# out, 125 = not started for lack of budget) and TB_LIMIT.
timebox() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  TB_LIMIT=$((cap < left ? cap : left))
  if [ "$TB_LIMIT" -lt "$MIN_STEP" ]; then
    echo "$name: not started, ${left}s of the budget left"
    TB_RC=125
    return
  fi
  echo "\$ (time box ${TB_LIMIT}s) $*"
  timeout -s INT -k 15 "$TB_LIMIT" "$@"
  TB_RC=$?
}
# status_of RC [detail]: the words record() stores for a time-boxed step
status_of() {
  case "$1" in
    0) echo "ok${2:+ ($2)}" ;;
    124 | 137) echo "FAILED (timed out after ${TB_LIMIT}s${2:+; $2})" ;;
    125) echo "NOT RUN (budget spent)" ;;
    *) echo "FAILED (exit $1${2:+; $2})" ;;
  esac
}
# junit_counts FILE: "N passed, N failed, N errors, N skipped" from a pytest junit file
junit_counts() {
  "$PY" - "$1" <<'PY' 2>/dev/null || echo "no junit"
import sys, xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
      f"{n['errors']} errors, {n['skipped']} skipped")
PY
}

# ---------------------------------------------------------------- env
step "environment"
REV=${FASTREG_GIT_REV:-}
if [ -z "$REV" ] && git rev-parse --verify -q HEAD >/dev/null 2>&1; then
  REV=$(git rev-parse --short=12 HEAD)$( (git status --porcelain --untracked-files=no 2>/dev/null | grep -q .) && echo -dirty)
fi
if [ -z "$REV" ] && [ -s .fastreg-git-rev ]; then REV=$(head -n 1 .fastreg-git-rev); fi
if [ -z "$REV" ]; then
  echo "warning: no revision (no .git here): pass FASTREG_GIT_REV=\$(git rev-parse --short=12 HEAD) or carry .fastreg-git-rev (make gpu-rev)"
  REV=unknown
fi
export FASTREG_GIT_REV=$REV
GPU_CAP=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability()) if torch.cuda.is_available() else None' 2>/dev/null | grep -E '^[0-9]+$' || true)
ENV_LINES=$(
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname) ($(nproc) CPUs)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | paste -sd ';')"
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  echo "python: $("$PY" --version 2>&1) at $(command -v "$PY")"
  echo "torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
  echo "nvcc: $( (command -v nvcc >/dev/null && nvcc --version | tail -n 2 | paste -sd ' ') || echo 'not found')"
  echo "git_rev: $REV"
)
echo "$ENV_LINES"
echo "$ENV_LINES" >"$RES_DIR/env.txt"
write_summary

# ---------------------------------------------------------------- toolchain
step "toolchain"
if [ "$DRY_RUN" = 1 ]; then
  record toolchain "skipped (dry run: CUDA steps are not run; no GPU needed)"
else
  CUDA_HOME=$(scripts/find_cuda_home.sh) && export CUDA_HOME && echo "CUDA_HOME=$CUDA_HOME"
  TOOLCHAIN_ERR=$("$PY" - "$("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1.\2/p' | head -n 1)" <<'PY'
import sys
try:
    import torch
except Exception as e:
    print(f"torch is not importable ({e})"); sys.exit()
ver = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
nvcc, cuda = sys.argv[1], torch.version.cuda
if ver < (2, 10):
    print(f"torch {torch.__version__} is too old: fastreg's CUDA kernels need torch >= 2.10 (LibTorch stable ABI)")
elif not cuda:
    print(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
elif not torch.cuda.is_available():
    print("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
elif not nvcc:
    print("no CUDA toolkit found (bin/nvcc + include/cuda_runtime.h in CUDA_HOME, CUDA_PATH, above nvcc, /usr/local/cuda)")
elif nvcc.split(".")[0] != cuda.split(".")[0]:
    print(f"nvcc {nvcc} and torch's CUDA {cuda} differ in their major version: the extension would not load")
PY
)
  if [ -n "$TOOLCHAIN_ERR" ]; then
    record toolchain "FAILED ($TOOLCHAIN_ERR)"
  else
    record toolchain ok
  fi
fi

# Competitors carried from a machine with internet: pure-Python wheels into a private folder.
if ls .wheels/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/fastreg-gpu-site
  if "$PY" -m pip install -q --no-deps --no-index --target "$SITE" .wheels/*.whl; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "installed the carried wheels: $(ls .wheels | paste -sd ' ')"
  else
    echo "could not install the carried wheels in .wheels/"
  fi
else
  echo "no .wheels/ carried: the Liger-Kernel comparisons will be n/a"
fi

# ---------------------------------------------------------------- build
step "build"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTREG_CUDA_ARCHS=${FASTREG_CUDA_ARCHS:-${GPU_CAP:-80;90}}
export FASTREG_FORCE_CUDA=1  # fail the build, rather than build without CUDA, if CUDA_HOME is not found
BUILD_CMD=("$PY" setup.py build_ext --inplace)
echo "MAX_JOBS=$MAX_JOBS FASTREG_CUDA_ARCHS=$FASTREG_CUDA_ARCHS ($([ -n "$GPU_CAP" ] && echo "this GPU's arch" || echo "no GPU seen: default"))"
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: CUDA build skipped (would run: ${BUILD_CMD[*]}); checking that the existing build imports"
  if "$PY" -m fastreg --ops; then
    record build "skipped (dry run: no CUDA build; the existing build imports)"
  else
    record build "FAILED (dry run: the existing build does not import)"
  fi
elif [[ "${STATUS[toolchain]}" != ok ]]; then
  record build "not run (toolchain)"
else
  B0=$(date +%s)
  timebox build "${BUILD_TIMEOUT:-300}" "${BUILD_CMD[@]}" >"$OUT_DIR/build.log" 2>&1
  rc=$TB_RC
  cp "$OUT_DIR/build.log" "$RES_DIR/build.log" 2>/dev/null
  grep -iE "(^|[^a-z])(warning|error)" "$OUT_DIR/build.log" | sort -u | head -n 30
  if [ "$rc" = 0 ]; then
    echo "built in $(($(date +%s) - B0))s"
    if "$PY" -m fastreg --ops --require-cuda; then
      record build "ok ($(($(date +%s) - B0))s, MAX_JOBS=$MAX_JOBS, archs $FASTREG_CUDA_ARCHS)"
    else
      record build "FAILED (built, but not every operator has a CUDA kernel)"
    fi
  else
    tail -n 40 "$OUT_DIR/build.log"
    record build "$(status_of "$rc" "see build.log")"
  fi
fi
BUILT=0
case "${STATUS[build]}" in ok* | skipped*) BUILT=1 ;; esac

# ---------------------------------------------------------------- tests
# pytest_step NAME CAP ARGS...: one pytest run, alone, time-boxed, its junit straight into $OUT
pytest_step() {
  local name=$1 cap=$2
  shift 2
  local junit=$OUT_DIR/junit-$name.xml
  step "tests: $name"
  # pytest.main under a SIGINT handler of its own: a SIGINT ignored by whatever started this script
  # would otherwise leave the time box only its SIGKILL, and pytest no chance to write its junit
  timebox "tests:$name" "$cap" "$PY" -c \
    'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))' \
    -q -p no:cacheprovider -rfE --junitxml="$junit" "$@"
  local rc=$TB_RC
  [ -f "$junit" ] && cp "$junit" "$RES_DIR/"
  [ "$rc" = 5 ] && rc=0  # no test collected: every case deselected, e.g. no CUDA case in a file
  record "tests:$name" "$(status_of "$rc" "$([ -f "$junit" ] && junit_counts "$junit" || echo "no junit")")"
}
GPU_TEST_FILES=${GPU_TEST_FILES:-tests/test_lce_cuda.py tests/test_optim_cuda.py}
# the other files' CUDA cases: the `device` fixture's "cuda" parameter, the CUDA determinism probe
GPU_CASES_ARGS=${GPU_CASES_ARGS:-tests/test_lce.py tests/test_lce_features.py tests/test_mse.py tests/test_optim.py tests/test_optim_bf16.py tests/test_memory.py tests/test_reliability.py tests/test_build_info.py -k cuda}
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  record tests skipped
elif [ "$BUILT" != 1 ]; then
  record tests "not run (build)"
else
  [ "$DRY_RUN" = 1 ] && echo "dry run: the CUDA tests run on the CPU, where they skip themselves"
  for f in $GPU_TEST_FILES; do
    n=$(basename "$f" .py)
    pytest_step "${n#test_}" "${TEST_TIMEOUT:-120}" "$f"
  done
  # shellcheck disable=SC2086
  [ -n "$GPU_CASES_ARGS" ] && pytest_step cases "${CASES_TIMEOUT:-120}" $GPU_CASES_ARGS
fi

# ---------------------------------------------------------------- benchmarks
# bench_step NAME ARGS...: python -m fastreg.bench --device cuda ARGS, results into $RES_DIR
bench_step() {
  local name=$1
  shift
  # shellcheck disable=SC2206
  local args=(--device cuda --no-plots --no-progress --out "$RES_DIR" "$@" ${BENCH_ARGS:-})
  step "bench: $name"
  if [ "$DRY_RUN" = 1 ]; then
    local cpu_args=("${args[@]/#cuda/cpu}")
    echo "dry run: GPU benchmark skipped (would run: python -m fastreg.bench ${args[*]}); parsing its arguments"
    if "$PY" -c 'import sys; from fastreg.bench.__main__ import build_parser; build_parser().parse_args(sys.argv[1:])' "${cpu_args[@]}"; then
      record "bench:$name" "skipped (dry run: arguments parse)"
    else
      record "bench:$name" "FAILED (dry run: python -m fastreg.bench rejects its arguments)"
    fi
    return
  fi
  timebox "bench:$name" "${BENCH_TIMEOUT:-120}" "$PY" -m fastreg.bench "${args[@]}"
  record "bench:$name" "$(status_of "$TB_RC")"
}
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  record bench skipped
elif [ "$BUILT" != 1 ]; then
  record bench "not run (build)"
else
  bench_step bars --bars          # the pass/fail targets of the performance issues
  bench_step lce --ops lce --max-time 2
  bench_step optim --ops optim --max-time 2
fi

# ---------------------------------------------------------------- summary + results
step "summary"
overall=0
for k in "${ORDER[@]}"; do
  case "${STATUS[$k]}" in ok* | skipped*) ;; *) overall=1 ;; esac
done
{
  cat "$SUMMARY"
  echo "result: $([ $overall = 0 ] && echo PASS || echo FAIL)"
} >"$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
cat "$SUMMARY"
cp "$SUMMARY" "$RES_DIR/summary.txt"
cp "$LOG" "$RES_DIR/gpu_check.log" 2>/dev/null
if [[ "$RES_DIR" == "$ROOT"/* ]]; then
  tar czf "$OUT_DIR/gpu-results.tar.gz" -C "$ROOT" "${RES_DIR#"$ROOT"/}"
else
  tar czf "$OUT_DIR/gpu-results.tar.gz" -C "$(dirname "$RES_DIR")" "$(basename "$RES_DIR")"
fi
echo "results: $RES_DIR and $OUT_DIR (gpu_check.log, summary.txt, build.log, junit-*.xml, gpu-results.tar.gz)"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || true  # let tee finish writing the log before we return
exit $overall
