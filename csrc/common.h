// Small definitions shared by every fastreg kernel, C++ and CUDA alike.
#pragma once

// Marks a function usable from host C++ and from CUDA device code (inlined either way).
#ifndef FASTREG_HD
#if defined(__CUDACC__)
#define FASTREG_HD __host__ __device__ __forceinline__
#else
#define FASTREG_HD inline
#endif
#endif

// ---- CPU code paths (host C++ only) -----------------------------------------------------------
// The CPU kernels are written once, on GCC/clang vector extensions (vector_size types: + - * /,
// compares and selects in portable C++), and compiled per target:
//   x86-64 (GCC, clang)  FASTREG_X86_ISAS: functions may carry target("avx512f"/"avx2") attributes
//                        and pick one at load time (__builtin_cpu_supports). FASTREG_CPU_CLONES
//                        compiles a function three times via target_clones (AVX-512, AVX2,
//                        baseline), resolved at load through an ifunc -- ELF only, so an Intel Mac
//                        runs the baseline clone of those functions.
//   aarch64              the same vector code compiles to NEON (128-bit, on every AArch64 CPU);
//                        FASTREG_CPU_CLONES is empty. SVE is not used: NEON is baseline and the
//                        kernels are memory-bound, where wider vectors would not pay.
//   anything else        the same vector code, for whatever the target has.
#if !defined(__CUDACC__)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTREG_X86_ISAS 1
#endif
#if defined(FASTREG_X86_ISAS) && defined(__ELF__)
#define FASTREG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTREG_CPU_CLONES
#endif

#include <string>
namespace fastreg {
// The CPU code path picked at load, e.g. "x86_64-avx512f" or "aarch64-neon" (csrc/optim/optim_cpu.cpp).
std::string cpu_code_path();
}  // namespace fastreg
#endif  // !__CUDACC__
