#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU (the lent H100/H200 box), in one command:
#   1. record the environment (GPU name, driver, torch, nvcc, git revision)
#   2. a fresh venv that reuses the machine's torch (python3 -m venv --system-site-packages)
#   3. build fastreg with its CUDA kernels: pip install --no-build-isolation --no-deps -e .
#      (MAX_JOBS=16, FASTREG_REQUIRE_NVCC=1, archs = this GPU's unless FASTREG_CUDA_ARCHS is set)
#   4. pytest -q tests   (every device-parametrised test runs on CUDA too)
#   5. the GPU benchmarks: python -m fastreg.bench --device cuda $BENCH_ARGS (skipped with a
#      message when fastreg.bench has no command-line entry point yet)
# Logs and results go to ${OUT:-out}/ (the device tool brings that folder back: at most 8 files,
# so it holds gpu_check.log, summary.txt, junit.xml and gpu-results.tar.gz) and to
# benchmarks/results/gpu-<UTC date>/ (commit that folder; the tarball holds the same files, with
# the repository-relative path, for `tar xzf` at the repository root).
#
# The device box has no internet: nothing is downloaded (pip runs with --no-index). Its working
# tree has no .git, so pass the revision in: FASTREG_GIT_REV=$(git rev-parse HEAD) make gpu-check.
#
# Environment: OUT, GPU_VENV (default /tmp/fastreg-gpu-venv), MAX_JOBS (16), FASTREG_CUDA_ARCHS,
# PYTEST_ARGS, PYTEST_TIMEOUT (s, 300), BENCH_ARGS, BENCH_TIMEOUT (s, 150), SKIP_TESTS=1, SKIP_BENCH=1.
# The defaults keep build + tests + benchmarks inside the device tool's 10-minute command limit.
# Exit status: 0 only if the build, the tests and (when present) the benchmarks all succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT_DIR=${OUT:-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
DAY=$(date -u +%Y-%m-%d)
RES_REL=benchmarks/results/gpu-$DAY
RES_DIR=$ROOT/$RES_REL
mkdir -p "$RES_DIR"
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/summary.txt
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

T0=$(date +%s)
step() { echo; echo "=== [gpu-check +$(($(date +%s) - T0))s] $*"; }
declare -A STATUS
ORDER=()
record() { STATUS[$1]=$2; ORDER+=("$1"); echo "--- $1: $2"; }

# ---------------------------------------------------------------- 1. environment
step "environment"
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | paste -sd ';')"
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  echo "python: $(python3 --version 2>&1) at $(command -v python3)"
  echo "torch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
  echo "nvcc: $( (command -v nvcc >/dev/null && nvcc --version | tail -n 2 | paste -sd ' ') || echo 'not found')"
  rev=${FASTREG_GIT_REV:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
  dirty=$( (git status --porcelain 2>/dev/null | grep -q .) && echo " (+local changes)" || true)
  echo "git_rev: $rev$dirty"
} | tee "$RES_DIR/env.txt"
cp "$RES_DIR/env.txt" "$SUMMARY"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  record environment "FAILED (no usable CUDA GPU for torch)"
fi
if ! command -v nvcc >/dev/null 2>&1; then
  record environment "FAILED (nvcc not found: FASTREG_REQUIRE_NVCC=1)"
fi

# Fail early, before a long build, on a toolchain fastreg's CUDA build cannot use: the stable ABI
# it targets needs torch >= 2.10, and nvcc must be of the CUDA major version torch was built with.
TOOLCHAIN_ERR=$(python3 - "$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1.\2/p' | head -n 1)" <<'PY'
import sys
try:
    import torch
except Exception as e:
    print(f"torch is not importable ({e})"); sys.exit()
ver = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if ver < (2, 10):
    print(f"torch {torch.__version__} is too old: fastreg's CUDA kernels need torch >= 2.10 (LibTorch stable ABI)")
    sys.exit()
nvcc, cuda = sys.argv[1], torch.version.cuda
if not cuda:
    print(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
elif not nvcc:
    print("cannot read nvcc's version (nvcc --version)")
elif nvcc.split(".")[0] != cuda.split(".")[0]:
    print(f"nvcc {nvcc} and torch's CUDA {cuda} differ in their major version: the extension would not load "
          f"(install a CUDA {cuda.split('.')[0]}.x toolkit or the matching torch)")
PY
)
if [ -n "$TOOLCHAIN_ERR" ]; then
  echo "gpu-check: $TOOLCHAIN_ERR"
  record toolchain "FAILED ($TOOLCHAIN_ERR)"
  echo "result: FAIL (toolchain: $TOOLCHAIN_ERR)" >>"$SUMMARY"
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  exit 1
fi
record toolchain ok

# ---------------------------------------------------------------- 2. venv
step "venv"
VENV=${GPU_VENV:-/tmp/fastreg-gpu-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV" || record venv FAILED
fi
PY=$VENV/bin/python
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
"$PY" -c 'import torch, pytest; print("venv ok: torch", torch.__version__, "| pytest", pytest.__version__)' || record venv "FAILED (torch/pytest not importable)"

# Competitors carried from a machine with internet (`make gpu-wheels`, then carry ".wheels"):
# Liger-Kernel is pure Python on Triton, which the box has.
if ls .wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index .wheels/*.whl && echo "installed carried wheels: $(ls .wheels)" \
    || echo "could not install the carried wheels in .wheels/"
else
  echo "no .wheels/ carried: Liger-Kernel / cut-cross-entropy comparisons will be n/a"
fi

# ---------------------------------------------------------------- 3. build
step "build"
export MAX_JOBS=${MAX_JOBS:-16}
export FASTREG_REQUIRE_NVCC=1
if [ -z "${FASTREG_CUDA_ARCHS:-}" ]; then
  FASTREG_CUDA_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  FASTREG_CUDA_ARCHS=${FASTREG_CUDA_ARCHS:-80;90}
fi
export FASTREG_CUDA_ARCHS
echo "MAX_JOBS=$MAX_JOBS FASTREG_CUDA_ARCHS=$FASTREG_CUDA_ARCHS"
BUILD_LOG=$RES_DIR/build.log
if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$BUILD_LOG" 2>&1; then
  echo "pip install -e . ok"
else
  echo "pip install -e . FAILED (tail of $RES_REL/build.log below); trying setup.py build_ext --inplace"
  tail -n 40 "$BUILD_LOG"
  "$PY" setup.py build_ext --inplace >>"$BUILD_LOG" 2>&1 || true
fi
# The editable install may have built the extension elsewhere; make sure the in-tree package has it.
if ! "$PY" -c 'import fastreg._C' >/dev/null 2>&1; then
  "$PY" setup.py build_ext --inplace >>"$BUILD_LOG" 2>&1 || true
fi
grep -iE "warning|error" "$BUILD_LOG" | grep -v "^running" | head -n 40 || true
if "$PY" -c 'import sys, fastreg; print("fastreg", fastreg.__version__, "| cuda kernels:", fastreg.has_cuda_kernels()); sys.exit(0 if fastreg.has_cuda_kernels() else 1)'; then
  record build ok
else
  tail -n 60 "$BUILD_LOG"
  record build "FAILED (fastreg not importable or built without its CUDA kernels; see $RES_REL/build.log)"
fi

# ---------------------------------------------------------------- 4. tests
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  record tests skipped
elif [ "${STATUS[build]:-}" != ok ]; then
  record tests "not run (build failed)"
else
  step "pytest -q tests ${PYTEST_ARGS:-}"
  # shellcheck disable=SC2086
  timeout "${PYTEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/junit.xml" \
    ${PYTEST_ARGS:-} tests 2>&1 | tee "$RES_DIR/pytest.log"
  rc=${PIPESTATUS[0]}
  cp "$OUT_DIR/junit.xml" "$RES_DIR/junit.xml" 2>/dev/null || true
  if [ "$rc" = 0 ]; then record tests ok; else record tests "FAILED (pytest exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"; fi
fi

# ---------------------------------------------------------------- 5. benchmarks
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  record bench skipped
elif [ "${STATUS[build]:-}" != ok ]; then
  record bench "not run (build failed)"
elif ! "$PY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("fastreg.bench.__main__") else 1)' 2>/dev/null; then
  echo "fastreg.bench has no command-line entry point (fastreg/bench/__main__.py) yet: GPU benchmarks skipped"
  record bench "skipped (python -m fastreg.bench not available)"
else
  BENCH_CMD=("$PY" -m fastreg.bench --device cuda)
  # Hand the bench our results folder when it takes one.
  if "$PY" -m fastreg.bench --help 2>/dev/null | grep -q -- "--out"; then
    BENCH_CMD+=(--out "$RES_DIR")
  fi
  export FASTREG_BENCH_OUT=$RES_DIR
  # shellcheck disable=SC2206
  BENCH_CMD+=(${BENCH_ARGS:-})
  step "${BENCH_CMD[*]}"
  timeout "${BENCH_TIMEOUT:-150}" "${BENCH_CMD[@]}" 2>&1 | tee "$RES_DIR/bench.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then record bench ok; else record bench "FAILED (exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"; fi
fi

# ---------------------------------------------------------------- summary + results
step "summary"
overall=0
{
  echo
  echo "elapsed_s: $(($(date +%s) - T0))"
  for k in "${ORDER[@]}"; do
    echo "$k: ${STATUS[$k]}"
    case "${STATUS[$k]}" in ok | skipped* ) ;; *) overall=1 ;; esac
  done
  echo "result: $([ $overall = 0 ] && echo PASS || echo FAIL)"
} >>"$SUMMARY"
cat "$SUMMARY"
cp "$SUMMARY" "$RES_DIR/summary.txt"
tail -n +1 "$LOG" >"$RES_DIR/gpu_check.log" 2>/dev/null || true
tar czf "$OUT_DIR/gpu-results.tar.gz" -C "$ROOT" "$RES_REL" 2>/dev/null || true
echo "results: $RES_REL/ and $OUT_DIR/ (gpu_check.log, summary.txt, junit.xml, gpu-results.tar.gz)"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || true  # let tee finish writing the log before we return
exit $overall
