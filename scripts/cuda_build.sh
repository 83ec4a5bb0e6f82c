#!/usr/bin/env bash
# `make cuda-build` (and `make test-cuda-build`): build fastreg with its CUDA kernels on a machine
# without a GPU, against the next torch release's CUDA build, and check what can be checked here.
#   1. $CUDA_VENV (.venv-cuda, git-ignored): torch==$CUDA_TORCH (2.14.1, a CUDA 13 build; ~5.5 GB
#      with its NVIDIA wheels) + the build and test tools of scripts/bootstrap.sh. Made once.
#   2. $CUDA_TREE (.cuda-build, git-ignored): a copy of the tree (scripts/mirror_tree.py), so the
#      in-place CUDA extension never replaces the CPU build that .venv uses in the checkout.
#   3. build there: setup.py build_ext --inplace, FASTREG_FORCE_CUDA=1, FASTREG_CUDA_ARCHS (80;90),
#      MAX_JOBS (2), the CUDA toolkit of scripts/find_cuda_home.sh; incremental on later runs. Timed.
#   4. check: import fastreg without a GPU, `python -m fastreg --ops --require-cuda`: the CUDA archs
#      compiled, and a CUDA kernel (or a composite one) registered for every fastreg operator.
# With --tests [pytest args] it then runs the CPU test suite on that build (default: all of tests/,
# ~25 min on 2 cores) and writes the logs of both to benchmarks/results/cuda-build/ (commit them;
# docs/gpu-check.md records the last run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TREE=${CUDA_TREE:-.cuda-build}
CUDA_TORCH=${CUDA_TORCH:-2.14.1}
export FASTREG_CUDA_ARCHS=${FASTREG_CUDA_ARCHS:-80;90}
export MAX_JOBS=${MAX_JOBS:-2}
export FASTREG_FORCE_CUDA=1
RESULTS=$ROOT/benchmarks/results/cuda-build

RUN_TESTS=0
if [ "${1:-}" = "--tests" ]; then
  RUN_TESTS=1
  shift
fi
now() { date +%s; }
T0=$(now)
say() { echo "[cuda-build +$(($(now) - T0))s] $*"; }

# ---------------------------------------------------------------- 1. venv with torch's CUDA build
VPY=$ROOT/$CUDA_VENV/bin/python
if [ ! -f "$CUDA_VENV/.deps-ok" ]; then
  say "creating $CUDA_VENV with torch==$CUDA_TORCH (CUDA build)"
  [ -x "$VPY" ] || "$PY" -m venv "$CUDA_VENV"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==$CUDA_TORCH"
  "$VPY" -m pip install -q "setuptools>=64" wheel ninja pytest hypothesis numpy matplotlib tqdm scikit-learn
  touch "$CUDA_VENV/.deps-ok"
fi
TORCH_CUDA=$("$VPY" -c 'import torch; print(torch.version.cuda or "")')
say "torch $("$VPY" -c 'import torch; print(torch.__version__)') (CUDA ${TORCH_CUDA:-none}) in $CUDA_VENV"
if [ -z "$TORCH_CUDA" ]; then
  echo "error: $CUDA_VENV holds a CPU-only torch; remove $CUDA_VENV and rerun with CUDA_TORCH=<a CUDA build>" >&2
  exit 1
fi

# ---------------------------------------------------------------- 2. CUDA toolkit
if ! CUDA_HOME=$(scripts/find_cuda_home.sh); then
  echo "error: no CUDA toolkit found (bin/nvcc + include/cuda_runtime.h); install CUDA ${TORCH_CUDA%%.*}.x or set CUDA_HOME" >&2
  exit 1
fi
export CUDA_HOME
NVCC=$CUDA_HOME/bin/nvcc
NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
say "nvcc $NVCC_VERSION at $NVCC (CUDA_HOME=$CUDA_HOME)"
if [ "${NVCC_VERSION%%.*}" != "${TORCH_CUDA%%.*}" ]; then
  echo "error: nvcc $NVCC_VERSION and torch's CUDA $TORCH_CUDA differ in their major version" >&2
  exit 1
fi

# ---------------------------------------------------------------- 3. build in the copy
mkdir -p "$CUDA_TREE"
"$PY" scripts/mirror_tree.py "$CUDA_TREE"
cd "$CUDA_TREE"
mkdir -p build
BUILD_LOG=build/cuda-build.log
say "building with CUDA: FASTREG_CUDA_ARCHS=$FASTREG_CUDA_ARCHS MAX_JOBS=$MAX_JOBS (log: $CUDA_TREE/$BUILD_LOG)"
B0=$(now)
if ! "$VPY" setup.py build_ext --inplace >"$BUILD_LOG" 2>&1; then
  tail -n 60 "$BUILD_LOG"
  echo "error: the CUDA build failed (full log: $CUDA_TREE/$BUILD_LOG)" >&2
  exit 1
fi
BUILD_S=$(($(now) - B0))
say "build ok in ${BUILD_S}s: $(ls fastreg/_C*.so)"
grep -iE "(^|[^a-z])warning" "$BUILD_LOG" | sort -u | head -n 20 || true

# ---------------------------------------------------------------- 4. import + kernels for every op
say "import (no GPU here) and a CUDA kernel for every operator"
CUDA_VISIBLE_DEVICES="" "$VPY" -m fastreg --ops --require-cuda
say "cuda-build ok (torch $("$VPY" -c 'import torch; print(torch.__version__)'), archs $FASTREG_CUDA_ARCHS, build ${BUILD_S}s)"

# ---------------------------------------------------------------- 5. (--tests) the CPU suite on this build
if [ "$RUN_TESTS" = 1 ]; then
  mkdir -p "$RESULTS"
  cp "$BUILD_LOG" "$RESULTS/build.log"
  ARGS=("$@")
  [ ${#ARGS[@]} -gt 0 ] || ARGS=(tests)
  say "pytest -q ${ARGS[*]} on the CUDA build (log: benchmarks/results/cuda-build/pytest.log)"
  {
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "torch: $("$VPY" -c 'import torch; print(torch.__version__)') | nvcc $NVCC_VERSION | archs $FASTREG_CUDA_ARCHS | build ${BUILD_S}s (MAX_JOBS=$MAX_JOBS)"
    echo "command: pytest -q -p no:cacheprovider ${ARGS[*]}"
  } >"$RESULTS/pytest.log"
  set +e
  "$VPY" -m pytest -q -p no:cacheprovider "${ARGS[@]}" 2>&1 | tee -a "$RESULTS/pytest.log"
  rc=${PIPESTATUS[0]}
  set -e
  say "pytest exit $rc"
  exit "$rc"
fi
