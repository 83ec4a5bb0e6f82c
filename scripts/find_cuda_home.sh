#!/usr/bin/env bash
# Prints the CUDA toolkit folder to build fastreg with: the first of $CUDA_HOME, $CUDA_PATH, the
# folder above the first nvcc on PATH (links resolved), /usr/local/cuda that holds both bin/nvcc
# and include/cuda_runtime.h. Exits 1, printing nothing, when none does.
# Why not torch's own guess: it takes the folder above the first nvcc on PATH, which is wrong where
# that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc).
nvcc_on_path=$(command -v nvcc 2>/dev/null || true)
above_nvcc=""
[ -n "$nvcc_on_path" ] && above_nvcc=$(dirname "$(dirname "$(readlink -f "$nvcc_on_path")")")
for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$above_nvcc" /usr/local/cuda; do
  if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
    readlink -f "$cand"
    exit 0
  fi
done
exit 1
