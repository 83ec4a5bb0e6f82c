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
