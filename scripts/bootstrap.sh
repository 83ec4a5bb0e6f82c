#!/usr/bin/env bash
# Create .venv (once), install torch + tools into it, and build fastreg's extension in place.
# Re-running it only rebuilds what changed.
#  - If the system python3 already has torch >= 2.10, the venv reuses it (--system-site-packages)
#    instead of reinstalling it.
#  - Otherwise it installs torch==2.13.0 (the CPU wheel on CPU-only machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 10) else 1)' 2>/dev/null; then
    echo "[bootstrap] reusing the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
if [ ! -f "$VENV/.deps-ok" ]; then
  "$VPY" -m pip install -q --upgrade pip
  if ! "$VPY" -c 'import torch' 2>/dev/null; then
    "$VPY" -m pip install -q torch==2.13.0
  fi
  # build + test + benchmark tools (torch is already there: never let pip replace it)
  "$VPY" -m pip install -q "setuptools>=77" wheel ninja pytest hypothesis numpy matplotlib tqdm scikit-learn
  # the editable install only maps the package (FASTREG_NO_EXT): the extension is built below, once
  FASTREG_NO_EXT=1 "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  touch "$VENV/.deps-ok"
fi
# wheel building (`python -m build`, tests/test_wheel.py) and the Hugging Face integration's tests
# (the optional `fastreg[transformers]` extra); checked apart so an existing venv picks them up too
if ! "$VPY" -c 'import build, transformers, accelerate' 2>/dev/null; then
  "$VPY" -m pip install -q build "transformers>=4.46" "accelerate>=0.26"
fi
# incremental (re)build of fastreg._C in place
"$VPY" setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying|building|creating|Emitting ninja)" || true
"$VPY" -c 'import fastreg, torch; print("[bootstrap] fastreg", fastreg.__version__, "| torch", torch.__version__, "| cuda kernels:", fastreg.has_cuda_kernels())'
