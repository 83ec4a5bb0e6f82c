#!/usr/bin/env bash
# `make test-aarch64`: fastreg's CPU tests on Linux aarch64, emulated by qemu-user on this x86-64 box.
#
#   sysroot  Debian's arm64 python3.11 (+ the C/C++ runtime libraries it and torch need), unpacked
#            from apt-get download'ed packages into .aarch64/sysroot (apt's arm64 architecture is
#            added when missing)
#   site     torch 2.13.0's manylinux aarch64 wheel from PyPI + numpy, pytest, hypothesis and torch's
#            pure-Python dependencies, unpacked into .aarch64/site. The PyPI aarch64 wheel is a CUDA
#            build whose libraries link the CUDA runtime, so the CUDA libraries' aarch64 wheels come
#            too (only loaded, never called: there is no GPU). libcupti has no aarch64 wheel on PyPI:
#            a placeholder libcupti.so.13 whose 21 functions abort is built in its place (torch calls
#            CUPTI only from the CUDA profiler).
#   build    the extension cross-compiled with aarch64-linux-gnu-g++ and the real build's flags
#            (setup.CXX_FLAGS + OpenMP), into .aarch64/build/fastreg next to a copy of fastreg/*.py
#   run      qemu-aarch64-static -L sysroot python3.11 -m pytest on TESTS below
# Everything is downloaded once (~3 GB) and kept in .aarch64/ (git-ignored); later runs rebuild
# only the extension. Without qemu or the cross compiler it says so and exits 0, unless
# FASTREG_REQUIRE_PORT_TOOLS=1. PYTEST_ARGS are passed on to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
A=${FASTREG_AARCH64_DIR:-$ROOT/.aarch64}
SYSROOT=$A/sysroot SITE=$A/site BUILD=$A/build
VPY=${VPY:-.venv/bin/python}
CXX_AARCH64=${CXX_AARCH64:-aarch64-linux-gnu-g++}
QEMU=${QEMU:-qemu-aarch64-static}

# The CPU tests of both ops: every dtype (fp64/fp32/bf16/fp16), option (reduction, label smoothing,
# softcap, z-loss, class weights, bias, ignore_index, chunking) and optimizer configuration;
# test_matches_reference on two of its six shapes (a chunk that does not divide N, and V = 1000:
# full 16-lane vectors plus a tail). Left out: torch.compile (inductor would need a C++ compiler
# inside the emulated system), the tests that start a second Python (no binfmt_misc here), opcheck
# (registration, not arithmetic: checked on x86-64) and the CUDA-only ones.
TESTS=(tests/test_lce.py tests/test_mse.py tests/test_optim.py)
DESELECT="not compile and not logits_never_materialised and not cuda_graph and not opcheck"
DESELECT+=" and not (test_matches_reference and not (N37-D19-V53-c10 or N64-D33-V1000-c7))"
# The emulated CPU: a Neoverse N1 (Graviton2; NEON, no SVE). qemu 7.2 passes the host's x86
# /proc/cpuinfo through, on which torch's cpuinfo crashes: the sysroot gets an N1's (qemu -L
# serves /proc/cpuinfo from there).
export QEMU_CPU=neoverse-n1

for tool in "$QEMU" "$CXX_AARCH64"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "test-aarch64: SKIPPED: $tool not found (scripts/port_tools.sh --qemu installs it)"
    [ "${FASTREG_REQUIRE_PORT_TOOLS:-0}" = "1" ] && exit 1
    exit 0
  fi
done

# ---- sysroot: Debian arm64 python3.11 --------------------------------------------------------------
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev libc6 libexpat1 zlib1g
      libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libgcc-s1
      libstdc++6 libgomp1 libcrypt1 libnsl2 libtirpc3 libdb5.3 libgssapi-krb5-2 libkrb5-3 libk5crypto3
      libcom-err2 libkrb5support0 libkeyutils1)
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  echo "test-aarch64: unpacking Debian's arm64 python3.11 into $SYSROOT"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -qq
  fi
  mkdir -p "$A/debs" "$SYSROOT"
  (cd "$A/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}" 2>&1 | grep -v "unsandboxed" || true)
  for deb in "$A"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
fi
mkdir -p "$SYSROOT/proc"
for cpu in 0 1; do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' $cpu
done > "$SYSROOT/proc/cpuinfo"

# ---- site: torch's aarch64 wheel and the test dependencies -------------------------------------
PLAT=(--platform manylinux2014_aarch64)
for v in 17 27 28; do PLAT+=(--platform "manylinux_2_${v}_aarch64"); done
WHEELS=(torch==2.13.0 nvidia-cuda-runtime nvidia-cublas nvidia-cufft nvidia-cusparse nvidia-curand
        nvidia-cuda-nvrtc nvidia-cufile nvidia-nvjitlink nvidia-nccl-cu13 nvidia-cudnn-cu13 nvidia-cusparselt-cu13
        nvidia-nvshmem-cu13 numpy pytest hypothesis filelock typing-extensions sympy mpmath networkx jinja2
        markupsafe fsspec iniconfig packaging pluggy pygments attrs sortedcontainers)
if [ ! -f "$SITE/.complete" ]; then
  echo "test-aarch64: downloading torch 2.13.0 (aarch64) and the test dependencies into $A/wheels"
  "$VPY" -m pip download -q --no-deps --dest "$A/wheels" --only-binary=:all: "${PLAT[@]}" --python-version 3.11 \
    --implementation cp "${WHEELS[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$VPY" - "$A/wheels" "$SITE" <<'EOF'
import glob, sys, zipfile
wheels, site = sys.argv[1:]
for w in sorted(glob.glob(f"{wheels}/*.whl")):
    if "nvidia_cuda_cupti" in w or "cusolver" in w:  # placeholder / not needed to load torch
        continue
    with zipfile.ZipFile(w) as z:
        z.extractall(site)
EOF
  # The executable bits zipfile drops: the loader does not need them for shared libraries.
  # libcupti.so.13: the symbols libtorch_cpu.so imports from it, each aborting if ever called.
  syms=$(readelf --dyn-syms -W "$SITE/torch/lib/libtorch_cpu.so" | awk '$7 == "UND" && $8 ~ /@libcupti\.so\.13/ {sub(/@.*/, "", $8); print $8}' | sort -u)
  { echo '#include <stdlib.h>'; for s in $syms; do echo "void $s(void) { abort(); }"; done; } > "$A/cupti_placeholder.c"
  echo "libcupti.so.13 { global: *; };" > "$A/cupti.map"
  aarch64-linux-gnu-gcc -shared -fPIC -o "$SITE/nvidia/cu13/lib/libcupti.so.13" "$A/cupti_placeholder.c" \
    -Wl,-soname,libcupti.so.13 -Wl,--version-script,"$A/cupti.map"
  touch "$SITE/.complete"
fi

# ---- build: the extension, cross-compiled --------------------------------------------------------
mkdir -p "$BUILD/obj" "$BUILD/fastreg"
CXXFLAGS=$("$VPY" -c 'import sys; sys.path.insert(0, "scripts"); from cuda_check import load_setup_module; s = load_setup_module(); print(" ".join(s.CXX_FLAGS + [f"-D{k}={v}" for k, v in s.cpu_defines()]))')
TI=$SITE/torch/include
FLAGS=($CXXFLAGS -fopenmp -fPIC -DNDEBUG -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       -I"$ROOT/csrc" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$SYSROOT/usr/include/python3.11" -I"$SYSROOT/usr/include")
objs=()
pids=()
for src in $(cd "$ROOT" && find csrc -name '*.cpp' | sort); do
  obj=$BUILD/obj/${src//\//_}.o
  objs+=("$obj")
  if [ ! -f "$obj" ] || [ -n "$(find "$ROOT/csrc" -newer "$obj" -name '*.[ch]*' | head -1)" ]; then
    echo "test-aarch64: compiling $src"
    "$CXX_AARCH64" "${FLAGS[@]}" -c "$ROOT/$src" -o "$obj" &
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
SO=$BUILD/fastreg/_C.cpython-311-aarch64-linux-gnu.so
"$CXX_AARCH64" -shared -o "$SO" "${objs[@]}" -fopenmp -L"$SITE/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -Wl,-rpath,"$SITE/torch/lib" -Wl,--allow-shlib-undefined
# the package and the tests run from $BUILD, so that the checkout's x86-64 fastreg is not imported
(cd "$ROOT" && find fastreg tests -name '*.py' -print0 | xargs -0 -I{} install -D -m 644 {} "$BUILD/{}")

# ---- run -----------------------------------------------------------------------------------------
echo "test-aarch64: pytest under $QEMU ($(uname -m) host), ${TESTS[*]}"
cd "$BUILD"
PYTHONHOME=$SYSROOT/usr PYTHONPATH=$BUILD:$SITE PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=2 \
  "$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -m pytest -q -ra -p no:cacheprovider -k "$DESELECT" \
  ${PYTEST_ARGS:-} "${TESTS[@]}"
